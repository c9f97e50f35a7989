"""The two interfaces for re-sampled epochs and growing modules: the subset sampler (each subset
in turn, shuffled from the seed and epoch, sharded over ranks), the trainer's check of a method's
subsets, and MethodAdapter's subsets and new parameters in a user's loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_trainer

from mmbalance.errors import MMBalanceError
from mmbalance.methods import EpochContext, EpochSubset, Method, MethodAdapter, StepContext
from mmbalance.methods.aug import AUG
from mmbalance.models.encoders import MLPEncoder
from mmbalance.models.fusion import LateSumFusion
from mmbalance.models.multimodal import MultimodalModel
from mmbalance.models.output import ModelOutput
from mmbalance.train.batching import SubsetBatchSampler


def test_subsets_come_in_turn_shuffled_from_seed_and_epoch() -> None:
    subsets = [("b", torch.arange(10, 17)), ("a", torch.arange(0, 5))]
    sampler = SubsetBatchSampler(subsets, batch_size=3, seed=1, epoch=2)
    batches = list(sampler)
    # 7 samples: 3 + 3 and a remainder of 1, dropped; 5 samples: 3 + 2
    assert sampler.names == ["b", "b", "a", "a"]
    assert [len(b) for b in batches] == [3, 3, 3, 2]
    for name, batch in zip(sampler.names, batches, strict=True):
        assert set(batch) <= set(dict(subsets)[name].tolist())
    assert sorted(batches[2] + batches[3]) == list(range(5))  # each sample once
    again = list(SubsetBatchSampler(subsets, batch_size=3, seed=1, epoch=2))
    other = list(SubsetBatchSampler(subsets, batch_size=3, seed=1, epoch=3))
    assert again == batches and other != batches


def test_subset_batches_split_over_ranks_like_the_epoch_sampler() -> None:
    subsets = [("a", torch.arange(8)), ("b", torch.arange(8, 14))]
    whole = SubsetBatchSampler(subsets, batch_size=4, seed=0, epoch=0)
    ranks = [list(SubsetBatchSampler(subsets, 4, 0, 0, rank=r, world_size=2)) for r in (0, 1)]
    for k, batch in enumerate(whole):
        assert ranks[0][k] + ranks[1][k] == batch
    assert len(whole) == len(ranks[0]) == len(ranks[1])


class Resampling(Method):
    """Joint training on the even training samples only, in one subset."""

    def __init__(self, index: torch.Tensor | None = None) -> None:
        super().__init__()
        self.index = index
        self.seen: list[tuple[str | None, list[int]]] = []

    def epoch_subsets(self, ctx: EpochContext) -> list[EpochSubset]:
        index = self.index
        if index is None:
            index = ctx.features("train").index
            index = index[index % 2 == 0]
        return [EpochSubset("even", index)]

    def losses(self, output: ModelOutput, ctx: StepContext) -> dict[str, torch.Tensor]:
        self.seen.append((ctx.subset, [] if ctx.index is None else ctx.index.tolist()))
        return super().losses(output, ctx)


def test_the_trainer_trains_the_subsets_and_refuses_foreign_indices(tmp_path: Path) -> None:
    method = Resampling()
    make_trainer(method, tmp_path / "run", **{"train.epochs": 1}).run(resume=False)
    assert method.seen and all(s == "even" for s, _ in method.seen)
    assert all(i % 2 == 0 for _, index in method.seen for i in index)
    bad = Resampling(torch.tensor([0, 1, 10_000]))  # not a training sample
    with pytest.raises(MMBalanceError, match="epoch subset"):
        make_trainer(bad, tmp_path / "bad", **{"train.epochs": 1}).run(resume=False)


def _own_model() -> MultimodalModel:
    torch.manual_seed(0)
    encoders = {"a": MLPEncoder((3,), [], 4), "b": MLPEncoder((5,), [], 4)}
    return MultimodalModel(encoders, LateSumFusion({"a": 4, "b": 4}, 3))


def test_the_adapter_gives_a_grown_module_to_the_users_optimizer() -> None:
    model = _own_model()
    method = AUG(hidden_dim=6)
    adapter = MethodAdapter(method, model)
    optimizer = torch.optim.SGD(adapter.param_groups(), lr=0.1)
    before = sum(len(g["params"]) for g in optimizer.param_groups)
    assert adapter.begin_epoch(0, optimizer) is not None
    method.head.add("b")  # what the method does at an epoch's end
    adapter.begin_epoch(1, optimizer)
    group = next(g for g in optimizer.param_groups if g["name"] == "method")
    new = list(method.head.added["b"][0].parameters())
    assert all(any(p is q for q in group["params"]) for p in new)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == before + 2
    inputs = {"a": torch.randn(4, 3), "b": torch.randn(4, 5)}
    weight = method.head.added["b"][0].weight.detach().clone()
    adapter.train_step(inputs, torch.tensor([0, 1, 2, 0]), optimizer, epoch=1)
    assert not torch.equal(method.head.added["b"][0].weight, weight)  # it trains


def test_the_adapter_passes_the_subset_to_the_step() -> None:
    method = Resampling()
    adapter = MethodAdapter(method, _own_model())
    optimizer = torch.optim.SGD(adapter.param_groups(), lr=0.1)
    inputs = {"a": torch.randn(4, 3), "b": torch.randn(4, 5)}
    assert adapter.context(torch.tensor([0, 1, 2, 0]), inputs, 0, subset="even").subset == "even"
    adapter.train_step(inputs, torch.tensor([0, 1, 2, 0]), optimizer, subset="even")
    assert method.seen[-1][0] == "even"
