"""Greedy: the cross-modal blocks against their formula (M = 2 and 3, folded frames), the running
mean of each modality's own gates and curation, the stage-wise ResNet encoders and the latent
block of other encoders, the conditional learning speeds and the curation schedule, evaluation
through the blocks, learning on the competition preset, and exact resumption."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COMPETITION, build_trainer

from mmbalance.build import build_dataset, resolve_config
from mmbalance.data.base import DatasetBundle, ModalitySpec, MultimodalTensorDataset
from mmbalance.errors import ConfigError
from mmbalance.methods import ModelInfo, StepContext, build_method
from mmbalance.methods.greedy import Greedy, cared_modality, learning_speed
from mmbalance.models.encoders import MLPEncoder, ResNet18Encoder
from mmbalance.models.fusion import LateSumFusion
from mmbalance.models.mmtm import MMTM, latent_forward, stage_channels, staged_forward
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.train import Trainer, fit

BASE: dict[str, Any] = {
    **COMPETITION,
    "dataset.n_train": 300,
    "dataset.n_val": 200,
    "dataset.n_test": 400,
    "dataset.n_bayes": 500,
    "method": "greedy",
    "train.epochs": 3,
}


# --- the block --------------------------------------------------------------------------------
def _block_inputs(m: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    gen = torch.Generator().manual_seed(0)
    feats = {"m0": torch.randn(4, 3, 5, 5, generator=gen)}  # 4 samples
    frames = {"m0": 1}
    feats["m1"] = torch.randn(4 * 2, 2, 3, 3, generator=gen)  # 4 samples x 2 folded frames
    frames["m1"] = 2
    if m == 3:
        feats["m2"] = torch.randn(4, 4, 2, 2, generator=gen)
        frames["m2"] = 1
    return feats, frames


@pytest.mark.parametrize("m", [2, 3])
def test_block_gates_and_rescaling_match_the_formula(m: int) -> None:
    torch.manual_seed(1)
    feats, frames = _block_inputs(m)
    channels = {k: x.shape[1] for k, x in feats.items()}
    block = MMTM(channels, ratio=4)
    assert block.squeeze.out_features == int(2 * sum(channels.values()) / 4)
    out = block(feats, frames)
    # squeeze by hand: per sample, the mean over frames and space of each channel
    squeezed = []
    for k, x in feats.items():
        t = frames[k]
        rows = []
        for i in range(4):
            sample = x[i * t : (i + 1) * t]  # (t, C, H, W)
            rows.append(torch.stack([sample[:, c].mean() for c in range(x.shape[1])]))
        squeezed.append(torch.stack(rows))
    e = torch.relu(torch.cat(squeezed, 1) @ block.squeeze.weight.T + block.squeeze.bias)
    for k, x in feats.items():
        lin = block.excite[k]
        g = torch.sigmoid(e @ lin.weight.T + lin.bias)  # (4, C)
        t = frames[k]
        expected = x * g.repeat_interleave(t, 0)[:, :, None, None]
        torch.testing.assert_close(out[k], expected)


def test_running_means_follow_each_modalitys_own_gates_and_curation_uses_them() -> None:
    torch.manual_seed(2)
    feats, frames = _block_inputs(2)
    block = MMTM({k: x.shape[1] for k, x in feats.items()})
    seen: dict[str, list[torch.Tensor]] = {"m0": [], "m1": []}
    for scale in (1.0, 2.0, -1.0):
        batch = {k: scale * x for k, x in feats.items()}
        g = block.gates(
            {k: x.reshape(4, frames[k], *x.shape[1:]).mean(dim=(1, 3, 4)) for k, x in batch.items()}
        )
        for k in seen:
            seen[k].append(g[k].mean(0))
        block(batch, frames, update=True)
    assert int(block.count) == 3
    for k in ("m0", "m1"):  # the official code fed the first modality's gates to the second's
        torch.testing.assert_close(block.average(k), torch.stack(seen[k]).mean(0))
    before = {k: block.average(k).clone() for k in seen}
    out = block(feats, frames, replaced="m1")  # curation of m1: its gates are the running mean
    expected = feats["m1"] * before["m1"][None, :, None, None]
    torch.testing.assert_close(out["m1"], expected)
    own = block.gates(
        {
            "m0": feats["m0"].mean(dim=(2, 3)),
            "m1": feats["m1"].reshape(4, 2, 2, 3, 3).mean(dim=(1, 3, 4)),
        }
    )
    torch.testing.assert_close(out["m0"], feats["m0"] * own["m0"][:, :, None, None])
    assert all(torch.equal(block.average(k), before[k]) for k in seen)  # no update asked


@pytest.mark.parametrize("shape", [(1, 12, 10), (3, 2, 12, 12)])
def test_stagewise_encoders_equal_the_encoders_when_every_gate_is_one(shape: tuple) -> None:
    torch.manual_seed(3)
    encoders = {
        "a": ResNet18Encoder(shape, width=4, small_input=True),
        "b": ResNet18Encoder((1, 8, 8), width=4, small_input=True),
    }
    for enc in encoders.values():
        enc.eval()
    blocks = {
        s: MMTM({k: stage_channels(enc.out_dim, s) for k, enc in encoders.items()})
        for s in (2, 3, 4)
    }
    with torch.no_grad():
        for block in blocks.values():
            for lin in block.excite.values():
                lin.weight.zero_()
                lin.bias.fill_(40.0)  # sigmoid(40) == 1 in float32
    inputs = {"a": torch.randn(3, *shape), "b": torch.randn(3, 1, 8, 8)}
    with torch.no_grad():
        staged = staged_forward(encoders, inputs, blocks)
        for k, enc in encoders.items():
            torch.testing.assert_close(staged[k], enc(inputs[k]))
        # a real gate changes the result
        blocks[3].excite["a"].bias.fill_(0.0)
        assert not torch.allclose(staged_forward(encoders, inputs, blocks)["a"], staged["a"])


def test_other_encoders_get_the_last_block_on_their_latents(tmp_path: Path) -> None:
    torch.manual_seed(5)
    encoders = {"a": MLPEncoder((4,), (8,), 6), "b": MLPEncoder((3,), (8,), 5)}
    with pytest.raises(ConfigError, match="ResNet-18"):
        staged_forward(encoders, {}, {})
    block = MMTM({"a": 6, "b": 5})
    inputs = {"a": torch.randn(7, 4), "b": torch.randn(7, 3)}
    out = latent_forward(encoders, inputs, block)
    z = {k: enc(inputs[k]) for k, enc in encoders.items()}
    gates = block.gates(z)  # the squeeze of a latent is the latent itself
    for k in ("a", "b"):
        torch.testing.assert_close(out[k], z[k] * gates[k])
    assert stage_channels(20, 4) == 20  # the last block fits any latent width
    method = Greedy()
    method.setup(ModelInfo(("a", "b"), {"a": 6, "b": 5}, 3))
    method.encode_eval(MultimodalModel(encoders, LateSumFusion({"a": 6, "b": 5}, 3)), inputs)
    assert method._active == [4]  # only the last block is in use, and in the bypass
    assert len(method.bypass_parameters()["a"]) == 4
    cfg = resolve_config({**BASE, "method.stages": [2, 3], "train.epochs": 1})
    with pytest.raises(ConfigError, match="must include 4"):
        fit(cfg, tmp_path)


# --- speeds and the curation rule ---------------------------------------------------------------
def test_learning_speed_is_squared_gradient_over_squared_weight_norm() -> None:
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([[3.0]]))
    c = torch.nn.Parameter(torch.tensor([4.0]))  # no gradient: counts as zero
    a.grad, b.grad = torch.tensor([0.5, -1.0]), torch.tensor([[2.0]])
    expected = (0.25 + 1.0 + 4.0) / (1 + 4 + 9 + 16)
    assert float(learning_speed([a, b, c])) == pytest.approx(expected)


def test_cared_modality_rule() -> None:
    assert cared_modality([0.3, 0.1], 0.01) == 0  # d_BDR > epsilon: care for modality 0
    assert cared_modality([0.1, 0.3], 0.01) == 1
    assert cared_modality([0.1, 0.105], 0.01) is None
    assert cared_modality([0.1, 0.5, 0.2], 0.3) == 1
    assert cared_modality([0.1, 0.3, 0.2], 0.3) is None


def test_speeds_accumulate_and_the_bdr_is_logged() -> None:
    method = Greedy(alpha=0.5, start_epoch=0)
    main = {k: [torch.nn.Parameter(torch.full((3,), 2.0))] for k in ("a", "b")}
    groups = {f"encoder.{k}": params for k, params in main.items()}
    blocks = method.setup(ModelInfo(("a", "b"), {"a": 32, "b": 32}, 3, parameter_groups=groups))
    gen = torch.Generator().manual_seed(4)
    expected = {k: [0.0, 0.0] for k in ("a", "b")}
    for step in range(2):
        for p in blocks.parameters():
            p.grad = 0.01 * torch.randn(p.shape, generator=gen)
        main["a"][0].grad = torch.full((3,), 0.1 * (step + 1))
        main["b"][0].grad = torch.full((3,), 1.0)
        bypass = method.bypass_parameters()
        for k in ("a", "b"):
            shared = [*blocks["2"].squeeze.parameters(), *blocks["3"].squeeze.parameters()]
            shared += [*blocks["4"].squeeze.parameters()]
            own = [p for s in ("2", "3", "4") for p in blocks[s].excite[k].parameters()]
            assert {id(p) for p in bypass[k]} == {id(p) for p in shared + own}
            g2 = sum(float((p.grad**2).sum()) for p in shared + own)
            w2 = sum(float((p.detach() ** 2).sum()) for p in shared + own)
            expected[k][0] += g2 / w2
            w = main[k][0].detach()
            expected[k][1] += float((main[k][0].grad ** 2).sum() / (w**2).sum())
        ctx = StepContext.standalone(torch.zeros(2, dtype=torch.long))
        method.rewrite_gradients(ctx)
        if method.curation_steps:
            break
    for k in ("a", "b"):
        assert method.speeds[k] == [pytest.approx(v, rel=1e-5) for v in expected[k]]
        bdr = math.log10(expected[k][0] / expected[k][1])
        assert ctx.logs[f"bdr_{k}"] == pytest.approx(bdr, rel=1e-5)
    # modality a learns slowly through its own branch, so it leans on the bypass: cared for
    assert method.cared == "a" and method.curation_steps == 5


def _bundle(n_train: int = 100) -> tuple[Any, DatasetBundle]:
    """The competition preset with every 64-d input seen as a 1x8x8 image, ResNet-18 encoders."""
    cfg = resolve_config({**BASE, "dataset.n_train": n_train})
    data = build_dataset(cfg)
    splits = {
        s: MultimodalTensorDataset(
            {m: x.reshape(-1, 1, 8, 8) for m, x in ds.inputs.items()}, ds.targets
        )
        for s, ds in data.splits.items()
    }
    specs = {
        m: ModalitySpec(m, (1, 8, 8), "resnet18", {"width": 4, "small_input": True})
        for m in data.modalities
    }
    bundle = DatasetBundle(data.name, data.task, data.num_outputs, specs, splits)
    return cfg, bundle


def _trainer(out: Path, **overrides: Any) -> Trainer:
    _, data = _bundle()
    return build_trainer(resolve_config({**BASE, **overrides}), out, data=data)


def test_curation_runs_window_steps_for_the_largest_bdr(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, **{"method.alpha": 0.0, "method.window": 3, "train.batch_size": 8})
    method = trainer.method
    trainer.train_mode()
    batch = next(iter(trainer.loaders["train"]))
    speeds = []
    for _ in range(9):
        trainer.train_step(batch, 1)
        speeds.append({k: list(v) for k, v in method.speeds.items()})
    logs = trainer.step_logs
    assert [row["curation"] for row in logs] == [0, 1, 1, 1, 0, 1, 1, 1, 0]
    for start in (0, 4):
        bdr = [logs[start]["bdr_m1"], logs[start]["bdr_m2"]]
        cared = max(range(2), key=lambda i: bdr[i])
        assert [logs[start + j]["cared"] for j in (1, 2, 3)] == [cared] * 3
        assert speeds[start + 3] == speeds[start]  # curation steps do not accumulate speeds
    # before start_epoch: speeds accumulate, no curation
    late = _trainer(tmp_path / "late", **{"method.alpha": 0.0, "train.batch_size": 8})
    late.train_mode()
    for _ in range(3):
        late.train_step(batch, 0)
    assert all(row["curation"] == 0 for row in late.step_logs)
    assert all(v[0] > 0 and v[1] > 0 for v in late.method.speeds.values())


def test_evaluation_runs_through_the_blocks_without_updating_them(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    method: Greedy = trainer.method  # type: ignore[assignment]
    with torch.no_grad():
        for block in method.blocks.values():
            block.excite["m2"].bias.fill_(-2.0)  # the blocks matter
    buffers = {k: v.clone() for k, v in method.blocks.state_dict().items()}
    val = trainer.evaluate("val")
    data = trainer.data.splits["val"]
    trainer.model.eval()
    with torch.no_grad():
        blocks = {int(s): b for s, b in method.blocks.items()}
        latents = staged_forward(trainer.model.encoders, data.inputs, blocks)
        out = trainer.model.heads(latents)
        plain = trainer.model(data.inputs)
    prediction = torch.stack(list(out.unimodal_logits.values())).mean(0)
    assert val["accuracy"] == pytest.approx(
        float((prediction.argmax(1) == data.targets).float().mean())
    )
    assert not torch.allclose(out.latents["m2"], plain.latents["m2"])
    for k, v in method.blocks.state_dict().items():
        assert torch.equal(v, buffers[k]), k


# --- training -----------------------------------------------------------------------------------
def test_greedy_learns_the_competition_preset(tmp_path: Path) -> None:
    over = {**BASE, "method.alpha": 0.001, "train.epochs": 4}
    result = fit(resolve_config(over), tmp_path)
    assert result.metrics["test"]["accuracy"] > 0.7  # chance is 0.2 (5 classes)
    steps = (tmp_path / "steps.csv").read_text()
    assert "curation" in steps and "bdr_m2" in steps


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="stages"):
        build_method("greedy", {"stages": [0, 2]})
    with pytest.raises(ConfigError, match="window"):
        build_method("greedy", {"window": 0})
