"""The epoch-level method interface: epoch contexts, parameter groups, phases, held-out data,
multi-part steps and method-declared fusion heads, driven through the real trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HOOKS_BASE as BASE
from conftest import make_trainer

from mmbalance.builder import build_dataset, build_model, make_fabric, model_info, resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS, EpochContext, Phase, StepContext
from mmbalance.methods.baselines import MultiLoss
from mmbalance.train import Trainer


class Recorder(MultiLoss):
    """Records what the epoch hooks receive."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, dict[str, float]]] = []

    def on_train_start(self, ctx: EpochContext) -> None:
        self.calls.append(("train_start", ctx.epoch, {}))

    def on_epoch_start(self, ctx: EpochContext) -> None:
        self.calls.append(("start", ctx.epoch, dict(ctx.val_metrics)))

    def on_epoch_end(self, ctx: EpochContext) -> None:
        self.calls.append(("end", ctx.epoch, dict(ctx.val_metrics)))
        ctx.log("seen", ctx.val_metrics["accuracy"])


def test_epoch_end_receives_the_epochs_validation_metrics(tmp_path: Path) -> None:
    method = Recorder()
    trainer = make_trainer(method, tmp_path / "run")
    trainer.run(resume=False)
    kinds = [c[0] for c in method.calls]
    assert kinds == ["train_start", "start", "end", "start", "end", "start", "end"]
    ends = [c for c in method.calls if c[0] == "end"]
    for (_, epoch, metrics), row in zip(ends, trainer.history, strict=True):
        assert epoch == row["epoch"]
        assert metrics["accuracy"] == row["val_accuracy"]
        for m in ("m1", "m2"):  # per-modality validation metrics of the unimodal heads
            assert metrics[f"unimodal_accuracy_{m}"] == row[f"val_unimodal_accuracy_{m}"]
        assert row["method_seen"] == metrics["accuracy"]  # epoch scalars join the row
    assert all(not c[2] for c in method.calls if c[0] == "start")


def test_train_start_runs_once_and_not_on_resume(tmp_path: Path) -> None:
    first = Recorder()
    make_trainer(first, tmp_path / "run", **{"train.epochs": 1}).run(resume=False)
    second = Recorder()
    make_trainer(second, tmp_path / "run", **{"train.epochs": 2}).run(resume=True)
    assert [c[0] for c in first.calls].count("train_start") == 1
    assert [c[0] for c in second.calls] == ["start", "end"]


class Scaled(MultiLoss):
    def lr_scales(self) -> Mapping[str, float]:
        return {"encoder.m1": 0.5, "unimodal_head.m2": 3.0}


def test_lr_scales_set_each_groups_rate(tmp_path: Path) -> None:
    trainer = make_trainer(Scaled(), tmp_path / "run", **{"train.lr": 0.01, "train.epochs": 1})
    trainer.run(resume=False)
    rates = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert rates["encoder.m1"] == pytest.approx(0.005)
    assert rates["unimodal_head.m2"] == pytest.approx(0.03)
    assert rates["encoder.m2"] == rates["fusion"] == pytest.approx(0.01)
    row = trainer.history[0]
    assert row["lr_scale_encoder.m1"] == 0.5 and row["lr_scale_unimodal_head.m2"] == 3.0
    # every parameter of the model is in exactly the group its name says
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        prefix = (
            group["name"]
            .replace("unimodal_head", "unimodal_heads")
            .replace("encoder.", "encoders.")
        )
        assert all(names[id(p)].startswith(prefix) for p in group["params"])


class Staged(MultiLoss):
    """Two epochs on modality m1 alone, then everything with a fresh optimizer."""

    def phase(self, epoch: int) -> Phase:
        if epoch < 2:
            return Phase("m1", frozenset({"encoder.m1", "unimodal_head.m1", "fusion"}))
        return Phase("all", None, reset_optimizer=True)


def _params(trainer: Trainer, prefix: str) -> torch.Tensor:
    return torch.cat(
        [p.detach().flatten() for n, p in trainer.model.named_parameters() if n.startswith(prefix)]
    )


def test_phases_freeze_groups_and_reset_the_optimizer(tmp_path: Path) -> None:
    trainer = make_trainer(Staged(), tmp_path / "run", **{"train.epochs": 2})
    before = {k: _params(trainer, k).clone() for k in ("encoders.m1", "encoders.m2")}
    trainer.run(resume=False)
    assert torch.equal(_params(trainer, "encoders.m2"), before["encoders.m2"])
    assert not torch.equal(_params(trainer, "encoders.m1"), before["encoders.m1"])
    steps_per_epoch = len(trainer.loaders["train"])
    state = trainer.optimizer.state
    m1_param = trainer.groups["encoder.m1"][0]
    assert int(state[m1_param]["step"]) == 2 * steps_per_epoch
    assert trainer.groups["encoder.m2"][0] not in state  # never stepped: no Adam statistics

    # the next epoch is a new stage with a fresh optimizer: its step count starts again
    resumed = make_trainer(Staged(), tmp_path / "run", **{"train.epochs": 3})
    resumed.run(resume=True)
    state = resumed.optimizer.state
    assert int(state[resumed.groups["encoder.m1"][0]]["step"]) == steps_per_epoch
    assert int(state[resumed.groups["encoder.m2"][0]]["step"]) == steps_per_epoch


def test_a_run_killed_mid_stage_resumes_exactly(tmp_path: Path) -> None:
    full = make_trainer(Staged(), tmp_path / "full", **{"train.epochs": 4})
    full.run(resume=False)
    part = make_trainer(Staged(), tmp_path / "part", **{"train.epochs": 1})
    part.run(resume=False)  # stopped inside the first stage
    for epochs in (3, 4):  # resumed across the stage boundary, then within the second stage
        resumed = make_trainer(Staged(), tmp_path / "part", **{"train.epochs": epochs})
        resumed.run(resume=True)
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name


class HoldsOut(MultiLoss):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()
        self.held: torch.Tensor | None = None

    @property
    def held_out_fraction(self) -> float:
        return 0.25

    def on_epoch_end(self, ctx: EpochContext) -> None:
        self.held = ctx.features("held_out").index
        with pytest.raises(ValueError, match="test"):
            ctx.features("test")


def test_held_out_samples_never_train_and_are_readable(tmp_path: Path) -> None:
    method = HoldsOut()
    trainer = make_trainer(method, tmp_path / "run", **{"train.epochs": 1})
    trained: set[int] = set()
    for epoch in range(3):
        trainer.train_sampler.set_epoch(epoch)
        trained |= {i for batch in trainer.train_sampler for i in batch}
    trainer.run(resume=False)
    held = set(method.held.tolist())
    n = len(trainer.data.splits["train"])
    targets = trainer.data.splits["train"].targets
    classes = len(targets.unique())
    assert abs(len(held) - 0.25 * n) <= classes  # rounded class by class
    assert not trained & held
    assert trained | held <= set(range(n))
    # stratified: every class keeps its share in the held-out part
    for c in targets.unique():
        share = (targets[method.held] == c).float().mean()
        assert abs(float(share) - float((targets == c).float().mean())) < 0.05


def test_feature_pass_matches_the_model_and_subsets_are_seeded(tmp_path: Path) -> None:
    trainer = make_trainer(MultiLoss(), tmp_path / "run", **{"train.epochs": 1})
    ctx = trainer.epoch_context(0)
    full = ctx.features("val")
    data = trainer.data.splits["val"]
    assert torch.equal(full.index, torch.arange(len(data)))
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(data.inputs)
    torch.testing.assert_close(full.logits, out.logits)
    torch.testing.assert_close(full.latents["m2"], out.latents["m2"])
    torch.testing.assert_close(full.unimodal_logits["m1"], out.unimodal_logits["m1"])
    trainer.train_mode()
    ctx.features("val", 0.5)
    assert trainer.module.training  # the pass restores the mode it found
    a = ctx.features("train", 0.1).index
    b = trainer.epoch_context(0).features("train", 0.1).index
    c = trainer.epoch_context(1).features("train", 0.1).index
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == round(0.1 * len(trainer.data.splits["train"]))


class Alternating(MultiLoss):
    """One optimizer step per modality, each encoding only its modality."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[tuple[str | None, tuple[str, ...]]] = []

    def step_parts(self, ctx: StepContext) -> Sequence[str | None]:
        return ("m1", "m2")

    def encode(self, model: Any, inputs: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        latents = model.encode(inputs, only=[ctx.part])
        self.encoded.append((ctx.part, tuple(latents)))
        return latents

    def transform_latents(self, latents: dict, ctx: StepContext) -> dict:
        # the heads need every modality: the absent one contributes zeros
        return {
            m: latents.get(m, torch.zeros_like(next(iter(latents.values())))) for m in ("m1", "m2")
        }

    def losses(self, output: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"task": ctx.task_loss(output.logits)}


def test_step_parts_take_one_optimizer_step_each(tmp_path: Path) -> None:
    method = Alternating()
    trainer = make_trainer(method, tmp_path / "run", **{"train.epochs": 1})
    batch = next(iter(trainer.loaders["train"]))
    trainer.train_mode()
    trainer.train_step(batch, 0)
    assert method.encoded == [("m1", ("m1",)), ("m2", ("m2",))]
    state = trainer.optimizer.state
    assert int(state[trainer.groups["encoder.m1"][0]]["step"]) == 1
    assert int(state[trainer.groups["encoder.m2"][0]]["step"]) == 1
    assert int(state[trainer.groups["fusion"][0]]["step"]) == 2  # in both parts' graph


def test_method_declared_fusion_head(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = METHODS.get("multiloss")
    monkeypatch.setattr(cls, "fusion", "concat_linear")
    assert resolve_config({"method": "multiloss"}).fusion.name == "concat_linear"
    assert resolve_config({"method": "multiloss", "fusion": "concat_linear"}).fusion.name == (
        "concat_linear"
    )
    with pytest.raises(ConfigError, match="defined on fusion head 'concat_linear'"):
        resolve_config({"method": "multiloss", "fusion": "late_sum"})


@pytest.mark.parametrize(("optimizer", "noted"), [("adam", True), ("sgd", False)])
def test_gradient_scaling_methods_are_noted_under_adaptive_optimizers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], optimizer: str, noted: bool
) -> None:
    class Scaling(MultiLoss):
        scales_gradients = True

    make_trainer(
        Scaling(), tmp_path / "run", **{"train.epochs": 1, "train.optimizer": optimizer}
    ).run(resume=False)
    assert ("largely undoes" in capsys.readouterr().err) is noted


@pytest.mark.parametrize(
    ("name", "scales"),
    [
        ("ogm", True),  # one factor per encoder's gradient
        ("ogm_ge", True),
        ("mlb", True),  # one coefficient per encoder's gradient
        ("mslr", False),  # per-group learning rates: Adam keeps them
        ("agm", False),  # mixes gradient paths: changes the direction, which Adam keeps
        ("opm", False),  # drops features per sample
        ("mcr", False),
        ("joint", False),
    ],
)
def test_methods_declare_whether_they_scale_whole_gradients(name: str, scales: bool) -> None:
    assert METHODS.get(name).scales_gradients is scales


@pytest.mark.parametrize(
    ("overrides", "acts"),
    [
        ({"method": "opm", "train.epochs": 6}, False),  # the journal's 6 warm-up epochs
        ({"method": "opm", "train.epochs": 7}, True),
        ({"method": "opm", "train.epochs": 6, "method.warmup_epochs": 1}, True),
        ({"method": "ogm", "train.epochs": 4, "method.start": 4}, False),
        ({"method": "ogm_ge", "train.epochs": 4, "method.warmup_epochs": 3}, True),
        ({"method": "valuation", "train.epochs": 5}, False),
        ({"method": "valuation", "train.epochs": 6}, True),
        ({"method": "mslr", "train.epochs": 6, "method.window": 5}, False),  # acts from epoch 6
        ({"method": "mslr", "train.epochs": 6, "method.window": 4}, True),
        ({"method": "mslr", "method.strategy": "fixed"}, False),  # every factor 1
        ({"method": "mslr", "method.strategy": "fixed", "method.init_scales": {"m1": 2}}, True),
        ({"method": "gblending", "train.epochs": 5, "method.super_epoch": 5}, False),
        ({"method": "gblending", "train.epochs": 6, "method.super_epoch": 5}, True),
        ({"method": "dr", "train.epochs": 4, "method.reinit_epoch": 4}, False),
        ({"method": "dr", "train.epochs": 5, "method.reinit_epoch": 4}, True),
        ({"method": "dr", "method.reinit_num": 0}, False),
        ({"method": "pmr", "train.epochs": 3, "method.start": 3}, False),
        ({"method": "agm", "train.epochs": 3, "method.start": 2}, True),
    ],
)
def test_a_schedule_in_which_the_method_never_acts_is_refused(
    overrides: dict[str, Any], acts: bool
) -> None:
    if acts:
        resolve_config(overrides)
    else:
        with pytest.raises(ConfigError, match="would never act"):
            resolve_config(overrides)


class OwnsEncoding(MultiLoss):
    """A method that changes the architecture: a learned per-modality gain on the encoders'
    outputs, held in its own module, used in training and (through ``encode_eval``) evaluation.
    It also records what the step contexts carry."""

    name = "owns_encoding"

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.gains: torch.nn.ParameterDict | None = None
        self.eval_sizes: list[int] = []
        self.steps: list[tuple[torch.Tensor, float]] = []

    def setup(self, info: Any) -> torch.nn.Module:
        super().setup(info)
        self.gains = torch.nn.ParameterDict(
            {m: torch.nn.Parameter(torch.full((d,), 3.0)) for m, d in info.latent_dims.items()}
        )
        return self.gains

    def _gained(self, model: Any, inputs: Any) -> dict[str, torch.Tensor]:
        assert self.gains is not None
        return {m: z * self.gains[m] for m, z in model.encode(inputs).items()}

    def encode(self, model: Any, inputs: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        assert ctx.index is not None
        self.steps.append((ctx.index.clone(), ctx.epoch_progress))
        return self._gained(model, inputs)

    def encode_eval(self, model: Any, inputs: Any) -> dict[str, torch.Tensor]:
        self.eval_sizes.append(len(next(iter(inputs.values()))))
        return self._gained(model, inputs)


def test_evaluation_encodes_through_the_method(tmp_path: Path) -> None:
    method = OwnsEncoding()
    trainer = make_trainer(method, tmp_path / "run", **{"train.epochs": 1})
    with torch.no_grad():
        method.gains["m2"].mul_(0.5)
    data = trainer.data.splits["val"]
    val = trainer.evaluate("val")
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model.heads(method._gained(trainer.model, data.inputs))
        plain = trainer.model(data.inputs)
    accuracy = float((out.logits.argmax(1) == data.targets).float().mean())
    assert val["accuracy"] == pytest.approx(accuracy)
    assert not torch.allclose(out.logits, plain.logits)  # the gain matters
    feats = trainer.epoch_context(0).features("val")
    torch.testing.assert_close(feats.latents["m2"], out.latents["m2"])
    torch.testing.assert_close(feats.logits, out.logits)


def test_step_context_carries_dataset_indices_and_epoch_progress(tmp_path: Path) -> None:
    method = OwnsEncoding()
    trainer = make_trainer(method, tmp_path / "run", **{"train.epochs": 1})
    trainer.train_sampler.set_epoch(0)
    expected = [torch.as_tensor(b) for b in trainer.train_sampler]
    trainer.run(resume=False)
    assert len(method.steps) == len(expected)
    for i, ((index, progress), batch) in enumerate(zip(method.steps, expected, strict=True)):
        assert torch.equal(index, batch)
        assert progress == pytest.approx(i / len(expected))


def test_analysis_and_selected_checkpoint_use_the_method_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmbalance.train.rundir import write_run_config
    from mmbalance.train.runner import evaluate_run

    monkeypatch.setitem(METHODS._items, "owns_encoding", OwnsEncoding)
    method = OwnsEncoding()
    cfg = resolve_config({**BASE, "method": "owns_encoding", "train.epochs": 2})
    fabric = make_fabric(cfg)
    fabric.seed_everything(cfg.train.seed, verbose=False)
    data = build_dataset(cfg)
    model = build_model(cfg, data, method)
    extra = method.setup(model_info(model, data))
    write_run_config(cfg, tmp_path / "run")  # as fit does, for evaluate_run
    trainer = Trainer(fabric, cfg, data, model, method, extra, tmp_path / "run")
    result = trainer.run(resume=False)
    splits = trainer.data.splits
    # the end-of-run analysis encodes the training and the test split through encode_eval, then
    # the robustness metrics the test split once clean and once per modality with noise
    robustness = (1 + len(trainer.model.modalities)) * len(splits["test"])
    analysed = len(splits["train"]) + len(splits["test"]) + robustness
    total = 0
    for size in reversed(method.eval_sizes):
        total += size
        if total >= analysed:
            break
    assert total == analysed
    # re-evaluation builds a fresh module (gains 3.0 again): the selected epoch's must replace it
    best = torch.load(tmp_path / "run" / "best.ckpt", weights_only=True)["method_module"]
    assert not torch.equal(best["m1"], torch.full_like(best["m1"], 3.0))
    again = evaluate_run(tmp_path / "run")
    for split in ("val", "test"):
        assert again[split]["accuracy"] == result.metrics[split]["accuracy"]
        assert again[split]["loss"] == pytest.approx(result.metrics[split]["loss"])
