"""Data Remixing: the confidence KL against its formula (any number of classes), the assignment
to the least confident modality, the trainer's re-sampled epoch (modality-pure batches, every
assigned sample once, the partner modalities zeroed), determinism under a seed, learning and an
exact kill-and-resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import LEARN, fit_killed_and_resumed, make_trainer, without_time

from mmbalance.builder import resolve_config
from mmbalance.errors import ConfigError
from mmbalance.methods import EpochContext, ModelInfo, SplitFeatures, StepContext
from mmbalance.methods.remix import Remix, assign_to_least_confident, confidence_kl
from mmbalance.models.output import ModelOutput
from mmbalance.train import fit


@pytest.mark.parametrize("classes", [3, 6, 10])
def test_confidence_kl_is_the_divergence_from_uniform_in_bits(classes: int) -> None:
    logits = torch.randn(7, classes, generator=torch.Generator().manual_seed(classes))
    p = logits.softmax(-1)
    expected = (p * torch.log2(p / (1.0 / classes))).sum(-1)
    torch.testing.assert_close(confidence_kl(logits), expected)
    # the uniform prediction has divergence 0, a one-hot one log2(C)
    assert float(confidence_kl(torch.zeros(1, classes))) == pytest.approx(0.0, abs=1e-6)
    one_hot = confidence_kl(torch.tensor([[100.0] + [0.0] * (classes - 1)]))
    assert float(one_hot) == pytest.approx(math.log2(classes), abs=1e-4)


def test_assignment_goes_to_the_least_confident_modality_ties_to_the_later() -> None:
    kl = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.5, 0.3], [0.7, 0.8, 0.9, 0.3]])
    assert assign_to_least_confident(kl).tolist() == [0, 1, 1, 2]
    assert assign_to_least_confident(kl[:2]).tolist() == [0, 1, 1, 1]


def _features(logits: dict[str, torch.Tensor], index: torch.Tensor) -> Any:
    def features(split: str, fraction: float = 1.0) -> SplitFeatures:
        assert split == "train" and fraction == 1.0
        return SplitFeatures({}, torch.zeros(len(index), 3), logits, torch.zeros(len(index)), index)

    return features


def test_subsets_hold_each_sample_once_in_reverse_modality_order() -> None:
    method = Remix(warmup_epochs=2)
    method.setup(ModelInfo(("a", "v"), {"a": 2, "v": 2}, 3))
    sure = torch.tensor([[9.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.0]])
    # samples 10, 11: audio unsure (-> audio); 12: video unsure (-> video); 13: both alike (video)
    logits = {
        "a": torch.cat([unsure, unsure, sure, sure]),
        "v": torch.cat([sure, sure, unsure, sure]),
    }
    index = torch.tensor([10, 11, 12, 13])
    ctx = EpochContext.standalone(1, features=_features(logits, index))
    method.on_epoch_start(ctx)
    assert method.epoch_subsets(ctx) is None  # still warming up
    ctx = EpochContext.standalone(2, features=_features(logits, index))
    method.on_epoch_start(ctx)
    subsets = method.epoch_subsets(ctx)
    assert [s.name for s in subsets] == ["v", "a"]  # the official code trains video first
    assert [s.index.tolist() for s in subsets] == [[12, 13], [10, 11]]
    assert ctx.logs == {"subset_v": 2.0, "subset_a": 2.0}


def test_a_subset_step_zeroes_the_others_and_adds_its_unimodal_loss() -> None:
    method = Remix(unimodal_weight=0.7, warmup_unimodal_weight=0.5)
    method.setup(ModelInfo(("a", "v"), {"a": 2, "v": 2}, 3))
    z = {"a": torch.randn(4, 2, requires_grad=True), "v": torch.randn(4, 2, requires_grad=True)}
    y = torch.tensor([0, 1, 2, 0])
    ctx = StepContext.standalone(y, epoch=3, subset="v")
    moved = method.transform_latents(z, ctx)
    assert torch.equal(moved["a"], torch.zeros(4, 2)) and moved["v"] is z["v"]
    moved["a"].sum().backward()
    assert torch.equal(z["a"].grad, torch.zeros(4, 2))  # the zeroed encoder gets zero gradients
    fused, ua, uv = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    out = ModelOutput(fused, moved, {"a": ua, "v": uv})
    terms = method.losses(out, ctx)
    torch.testing.assert_close(terms["task"], F.cross_entropy(fused, y))
    torch.testing.assert_close(terms["unimodal"], 0.7 * F.cross_entropy(uv, y))
    warm = method.losses(out, StepContext.standalone(y, epoch=0))
    expected = 0.5 * (F.cross_entropy(ua, y) + F.cross_entropy(uv, y))
    torch.testing.assert_close(warm["unimodal"], expected)
    with pytest.raises(ConfigError, match="subset"):  # remixed epochs need subsets
        method.losses(out, StepContext.standalone(y, epoch=3))


def test_bad_settings_are_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="never act"):
        resolve_config({**LEARN, "method": "remix", "method.warmup_epochs": 3})
    with pytest.raises(ConfigError, match="classification"):
        Remix().setup(ModelInfo(("a", "b"), {"a": 3, "b": 3}, 1, task="regression"))


class Spy(Remix):
    """Records every step's subset, sample indices and latents."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[int, str | None, list[int]]] = []
        self.zeroed: list[bool] = []

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, torch.Tensor]:
        self.steps.append((ctx.epoch, ctx.subset, ctx.index.tolist()))
        if ctx.subset is not None:
            others = [z for m, z in output.latents.items() if m != ctx.subset]
            self.zeroed.append(all(bool((z == 0).all()) for z in others))
        return super().losses(output, ctx)


def test_the_trainer_runs_the_remixed_epoch_on_pure_batches(tmp_path: Path) -> None:
    method = Spy()
    trainer = make_trainer(method, tmp_path / "run", **{"train.epochs": 2})
    subsets_seen: dict[str, list[int]] = {}
    original = method.epoch_subsets

    def remember(ctx: EpochContext) -> Any:
        subsets = original(ctx)
        for s in subsets or ():
            subsets_seen[s.name] = s.index.tolist()
        return subsets

    method.epoch_subsets = remember  # type: ignore[method-assign]
    trainer.run(resume=False)
    warm = [s for s in method.steps if s[0] == 0]
    remixed = [s for s in method.steps if s[0] == 1]
    assert warm and all(subset is None for _, subset, _ in warm)
    assert set(subsets_seen) == {"m1", "m2"}
    # subsets in turn (reverse modality order), each batch from one subset only
    names = [subset for _, subset, _ in remixed]
    assert names == sorted(names, key=lambda n: ["m2", "m1"].index(n))
    for _, subset, index in remixed:
        assert set(index) <= set(subsets_seen[subset])
    covered = sorted(i for _, _, index in remixed for i in index)
    everything = sorted(i for s in subsets_seen.values() for i in s)
    assert len(covered) == len(set(covered))  # each sample at most once
    assert len(everything) - len(covered) < 2 * 2  # only batch remainders are dropped
    assert method.zeroed and all(method.zeroed)


CONFIG: dict[str, Any] = {**LEARN, "method": "remix"}


def test_remix_learns_is_deterministic_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve_config(CONFIG)
    reference = fit(cfg, tmp_path / "reference")
    assert reference.metrics["test"]["accuracy"] > 0.6  # 5 classes: chance is 0.2
    assert (
        reference.history[-1]["method_subset_m1"] + reference.history[-1]["method_subset_m2"] == 300
    )
    again = fit(cfg, tmp_path / "again")
    assert without_time(again.history) == without_time(reference.history)
    resumed = fit_killed_and_resumed(cfg, tmp_path / "killed", monkeypatch, after_epoch=1)
    assert without_time(resumed.history) == without_time(reference.history)
    assert resumed.metrics == reference.metrics
