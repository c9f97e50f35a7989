"""MethodAdapter: a method on a user's own model, in a user's own loop, exactly as the trainer
runs it on ours."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError
from mmbalance.methods import (
    EpochContext,
    Method,
    MethodAdapter,
    ModelInfo,
    Phase,
    StepContext,
    build_method,
)
from mmbalance.methods.adapter import FunctionFusion
from mmbalance.methods.protocol import StepModule
from mmbalance.models import MultimodalModel, build_encoder, build_fusion

MODS = ("a", "b")


def _model(fusion: str = "concat_mlp", heads: bool = True) -> MultimodalModel:
    torch.manual_seed(0)
    encoders = {m: build_encoder("mlp", (6,), {"hidden": [8], "out_dim": 5}) for m in MODS}
    head = build_fusion(fusion, dict.fromkeys(MODS, 5), 3, {"hidden": 7} if "mlp" in fusion else {})
    return MultimodalModel(encoders, head, unimodal_heads=heads)


def _batches(steps: int, seed: int = 1) -> list[tuple[dict[str, Tensor], Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(3, (16,), generator=gen)
        x = {
            m: torch.randn(16, 6, generator=gen) + y[:, None] * (1.5 if m == "a" else 0.3)
            for m in MODS
        }
        out.append((x, y))
    return out


def test_function_fusion_stops_gradients_of_the_named_latents_only() -> None:
    linear = nn.Linear(4, 3)
    fusion = FunctionFusion(lambda z: linear(torch.cat([z["a"], z["b"]], 1)))
    za = torch.randn(5, 2, requires_grad=True)
    zb = torch.randn(5, 2, requires_grad=True)
    free = fusion({"a": za, "b": zb}).logits
    stopped = fusion({"a": za, "b": zb}, ("a",)).logits
    assert torch.equal(free, stopped)  # values never depend on stop_grad
    stopped.square().sum().backward()
    assert za.grad is None
    assert zb.grad is not None and zb.grad.abs().sum() > 0
    assert linear.weight.grad is not None  # the fusion's own weights still learn
    assert list(fusion.parameters()) == []  # a plain function holds no parameters
    with pytest.raises(ConfigError, match="unknown modalities"):
        fusion({"a": za, "b": zb}, ("c",))
    with pytest.raises(ConfigError, match=r"logits of shape \(batch, outputs\)"):
        FunctionFusion(lambda z: z["a"].sum(1))({"a": za, "b": zb})


def _reference_run(model: MultimodalModel, method: Method, batches: list, lr: float) -> None:
    """A step written out by hand on our model: the step module's forward and a StepContext as
    the trainer builds it, one SGD step per batch."""
    extra = method.setup(
        ModelInfo(MODS, dict(model.fusion.latent_dims), 3, additive_fusion=model.fusion.additive)
    )
    params = [*model.parameters(), *(extra.parameters() if extra is not None else ())]
    module = StepModule(model, method, extra)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    encoder_params = model.encoder_parameters()
    for step, (x, y) in enumerate(batches):
        ctx = StepContext(
            targets=y,
            fusion=model.fusion,
            encode=model.encode,
            inputs=x,
            encoder_params=encoder_params,
            step=step,
        )
        optimizer.zero_grad(set_to_none=True)
        losses = module(x, ctx)
        method.backward(losses, ctx)
        method.rewrite_gradients(ctx)
        optimizer.step()


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mcr", {"lam": 2.0, "lam_ceb": 0.5, "num_permutations": 3, "strategy": "independent"}),
        ("ogm_ge", {}),
        ("opm", {"warmup_epochs": 0}),
        ("mmpareto", {}),
    ],
)
def test_a_user_model_with_a_fusion_function_trains_exactly_as_our_model(
    name: str, options: dict[str, Any]
) -> None:
    """The same weights, batches and random draws: a user's model whose fusion is a plain
    function ends in the same weights as our model with the same (non-additive) head in the
    trainer's step; the method's own module (MCR's CEB head) is trained in both."""
    ours = _model()
    user = copy.deepcopy(ours)
    batches = _batches(4)
    torch.manual_seed(5)
    reference = build_method(name, options)
    _reference_run(ours, reference, batches, lr=0.1)

    torch.manual_seed(5)
    method = build_method(name, options)
    adapter = MethodAdapter(
        method,
        user,
        encoders=dict(user.encoders),
        fusion=lambda z: user.fusion.fuse(z),
        unimodal_heads=dict(user.unimodal_heads),
        num_outputs=3,
    )
    assert adapter.info.latent_dims == {"a": 5, "b": 5}  # from the encoders' out_dim
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        adapter.train_step(x, y, optimizer)
    for (key, want), got in zip(ours.state_dict().items(), user.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=key)  # the same operations
    if name == "mcr":
        assert adapter.method_module is not None and reference.ceb is not None
        before = copy.deepcopy(adapter.method_module)
        assert adapter.groups["method"] == list(adapter.method_module.parameters())
        for a, b in zip(method.ceb.parameters(), reference.ceb.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        adapter.train_step(*batches[0], optimizer)
        moved = [
            not torch.equal(p, q)
            for p, q in zip(adapter.method_module.parameters(), before.parameters(), strict=True)
        ]
        assert any(moved)  # the optimizer trains the method's module


def test_our_model_needs_nothing_else_and_keeps_its_additive_head() -> None:
    model = _model("late_sum")
    adapter = MethodAdapter("ogm_ge", model, options={"alpha": 0.5})
    assert adapter.model is model and adapter.info.additive_fusion
    assert adapter.info.num_outputs == 3 and adapter.method.params.alpha == 0.5
    x, y = _batches(1)[0]
    result = adapter.train_step(x, y, torch.optim.SGD(adapter.parameters(), lr=0.1))
    assert set(result.losses) == {"task"} and {"coeff_a", "coeff_b"} <= set(result.logs)
    assert adapter.step == 1


def test_what_a_method_needs_is_asked_for_in_one_line() -> None:
    model = _model(heads=False)
    encoders = dict(model.encoders)

    def fuse(z: dict[str, Tensor]) -> Tensor:
        return model.fusion.fuse(z)

    with pytest.raises(ConfigError, match="mcr' needs a unimodal head per modality"):
        MethodAdapter("mcr", model, encoders=encoders, fusion=fuse, num_outputs=3)
    with pytest.raises(ConfigError, match="pass num_outputs="):
        MethodAdapter("joint", model, encoders=encoders, fusion=fuse)
    opaque = {m: nn.Sequential(e) for m, e in encoders.items()}  # no out_dim attribute
    with pytest.raises(ConfigError, match="pass latent_dims="):
        MethodAdapter("joint", model, encoders=opaque, fusion=fuse, num_outputs=3)
    with pytest.raises(ConfigError, match="needs encoders="):
        MethodAdapter("joint", nn.Linear(2, 2), fusion=fuse, num_outputs=3)
    renamed = {"a": encoders["a"], "c": encoders["b"]}
    with pytest.raises(ConfigError, match="fusion head's modalities"):
        MethodAdapter("joint", model, encoders=renamed, fusion=model.fusion)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        MethodAdapter("nope", model)
    with pytest.warns(UserWarning, match="does not pre-train"):
        MethodAdapter("unipre_finetuned", _model())


class _Staged(Method):
    """A test method with two stages, a learning-rate scale and epoch hooks that record."""

    name = "staged"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int, Any]] = []

    def phase(self, epoch: int) -> Phase:
        if epoch == 0:
            return Phase("all")
        return Phase("heads", trainable=frozenset({"fusion"}), reset_optimizer=True)

    def lr_scales(self) -> dict[str, float]:
        return {"encoder.a": 0.5}

    def on_train_start(self, ctx: EpochContext) -> None:
        self.seen.append(("train_start", ctx.epoch, None))

    def on_epoch_start(self, ctx: EpochContext) -> None:
        features = ctx.features("val", 1.0)
        self.seen.append(("start", ctx.epoch, features.latents["a"].shape))

    def on_epoch_end(self, ctx: EpochContext) -> None:
        self.seen.append(("end", ctx.epoch, dict(ctx.val_metrics)))
        ctx.log("rows_before", len(ctx.history))


def test_phases_learning_rate_scales_and_epoch_hooks_in_a_user_loop() -> None:
    model = _model(heads=False)
    method = _Staged()
    val = _batches(3, seed=2)
    adapter = MethodAdapter(method, model, splits={"val": val})
    optimizer = torch.optim.Adam(adapter.param_groups(), lr=0.01)
    lrs = {g["name"]: g for g in optimizer.param_groups}
    assert set(lrs) == {"encoder.a", "encoder.b", "fusion"}  # no method module, no heads

    adapter.begin_epoch(0, optimizer)
    assert lrs["encoder.a"]["lr"] == pytest.approx(0.005) and lrs["fusion"]["lr"] == 0.01
    x, y = _batches(1)[0]
    adapter.train_step(x, y, optimizer)
    assert optimizer.state  # Adam moments exist
    adapter.end_epoch(0, {"accuracy": 0.5})
    assert adapter.history == [{"epoch": 0.0, "val_accuracy": 0.5, "method_rows_before": 0}]

    adapter.begin_epoch(1, optimizer)  # stage boundary: encoders stop, a fresh optimizer state
    assert not optimizer.state
    assert all(not p.requires_grad for p in model.encoders.parameters())
    assert all(p.requires_grad for p in model.fusion.parameters())
    assert lrs["encoder.a"]["lr"] == 0.0 and lrs["fusion"]["lr"] == 0.01
    adapter.begin_epoch(2, optimizer)  # the scale does not compound
    lrs["fusion"]["lr"] = 0.002  # as a scheduler would set it
    adapter.begin_epoch(3, optimizer)
    assert lrs["fusion"]["lr"] == pytest.approx(0.002)
    assert method.seen[:4] == [
        ("train_start", 0, None),
        ("start", 0, torch.Size([48, 5])),
        ("end", 0, {"accuracy": 0.5}),
        ("start", 1, torch.Size([48, 5])),
    ]
    with pytest.raises(ConfigError, match="pass splits="):
        adapter.features("train")


def test_predict_uses_eval_mode_and_restores_training_mode() -> None:
    model = _model()
    model.encoders["a"] = nn.Sequential(model.encoders["a"], nn.Dropout(0.9))
    model.encoders["a"].out_dim = 5  # type: ignore[assignment]
    adapter = MethodAdapter("ensemble", model)
    x, _ = _batches(1)[0]
    model.train()
    first, second = adapter.predict(x), adapter.predict(x)
    torch.testing.assert_close(first, second)  # no dropout at prediction
    assert model.training
