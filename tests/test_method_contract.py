"""The method contract: what every registered method does, whoever registered it.

Every name of ``METHODS.names()`` (plugins included once registered) runs, with its default
options, on a tiny synthetic task long enough for its schedule to act (the fewest epochs its
``check_schedule`` accepts, at least two):

- finite training with two modalities, and with three where the method supports them
  (:attr:`~mmbalance.methods.base.Method.max_modalities`);
- its ``state_dict`` survives the checkpoint's safe serialisation and a fresh method restores it;
- a run killed after its second-to-last epoch (its run directory as that epoch left it) resumes
  to exactly the uninterrupted run;
- our trainer and :class:`~mmbalance.methods.MethodAdapter` in a user's loop over the same model,
  seed and batches end in the same weights and method state, to rounding;
- two DDP processes at global batch B give the validation metrics of one process at batch B, as
  the README says, except for ``mcr``, ``midas`` and ``opm``, whose per-process permutations,
  partners and drop masks the README names (the processes are started once for every method); a method whose module
  grows (:attr:`~mmbalance.methods.base.Method.grows_module`) refuses two processes in one line;
- ``check_schedule`` refuses every run too short for the method to act, in one line;
- every option is documented, the searched option exists, renamed options name real ones.

A few runs serve several checks: they are made once per method and kept for the module.
"""

from __future__ import annotations

import io
import math
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_trainer, without_time
from torch import Tensor

from mmbalance.builder import build_dataset, build_model, make_fabric, model_info, resolve_config
from mmbalance.config import build_dataclass, dataclass_options, renamed_options
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS, MethodAdapter, build_method
from mmbalance.optim import build_optimizer
from mmbalance.train import loop
from mmbalance.train.batching import (
    EpochBatchSampler,
    ShardBatchSampler,
    SubsetBatchSampler,
    make_loader,
)
from mmbalance.train.callbacks import default_callbacks
from mmbalance.train.checkpoint import load_checkpoint
from mmbalance.train.loop import Callback, RunResult, Trainer, _hold_out, encoder_state

NAMES = METHODS.names()
#: The methods whose two-process runs the README says differ from one process (per-process
#: permutations and contrastive pairs; per-process misaligned partners; per-process drop masks).
DDP_DIFFERS = {"mcr", "midas", "opm"}
BATCH = 80  # the contract runs' batch size


def _no_analysis(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """The end-of-run analysis is the eval layer's (tested there); the contract's runs skip it,
    a third of a tiny run's time."""
    return {}, {}


def _no_robustness(*args: Any, **kwargs: Any) -> dict[str, float]:
    """The end-of-run robustness metrics are the eval layer's too."""
    return {}


def _skip_the_end_of_run_evaluation() -> None:
    loop.analyze_model = _no_analysis  # type: ignore[assignment]
    loop.robustness_metrics = _no_robustness  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _runs_without_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "analyze_model", _no_analysis)
    monkeypatch.setattr(loop, "robustness_metrics", _no_robustness)


def contract_config(name: str, modalities: int = 2, epochs: int = 2, **extra: Any) -> Any:
    """The contract's tiny synthetic run: 160 training samples in batches of 80, small MLPs."""
    encoders = {}
    for i in range(1, modalities + 1):
        encoders[f"encoder.m{i}.hidden"] = [16]
        encoders[f"encoder.m{i}.out_dim"] = 8
    return resolve_config(
        {
            "dataset": "synthetic",
            "dataset.num_modalities": modalities,
            "dataset.input_dim": 12,
            "dataset.n_train": 160,
            "dataset.n_val": 40,
            "dataset.n_test": 40,
            "dataset.n_bayes": 100,
            "method": name,
            "train.epochs": epochs,
            "train.batch_size": BATCH,
            "train.optimizer": "sgd",
            "train.lr": 0.05,
            "train.progress": False,
            "train.tensorboard": False,
            "train.epoch_curves": False,
            **encoders,
            **extra,
        }
    )


def schedule_epochs(name: str) -> int:
    """The fewest epochs the method's default schedule accepts (``check_schedule``)."""
    cls = METHODS.get(name)
    params = build_dataclass(cls.Params, {}, f"method.{name}")
    for epochs in range(1, 21):
        try:
            cls.check_schedule(params, epochs)
        except ConfigError:
            continue
        return epochs
    raise AssertionError(f"method {name!r} refuses every schedule of up to 20 epochs")


def contract_epochs(name: str) -> int:
    return max(2, schedule_epochs(name))


class _KilledCopy(Callback):
    """Copies the run directory right after epoch ``epoch`` (0-based) wrote its checkpoint: what
    a run killed at that moment leaves behind (every file is written atomically)."""

    def __init__(self, epoch: int, to: Path) -> None:
        self.epoch, self.to = epoch, to

    def on_epoch_end(self, trainer: Any, row: Mapping[str, float]) -> None:
        if row["epoch"] == self.epoch:
            shutil.copytree(trainer.out_dir, self.to)


class _Pairs:
    """A user's split: ``(inputs, targets)`` batches of ``index`` in dataset order, iterable again
    (each pass is one DataLoader iteration, as each of the trainer's passes is)."""

    def __init__(self, dataset: Any, index: Tensor, batch_size: int) -> None:
        self.dataset, self.index, self.batch_size = dataset, index, batch_size

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        sampler = ShardBatchSampler(len(self.index), self.batch_size, indices=self.index)
        for batch in make_loader(self.dataset, sampler, 0):
            yield batch.inputs, batch.targets


@dataclass
class ContractRuns:
    """What one method did in the contract's runs."""

    epochs: int
    trainer: Trainer  # the uninterrupted run, finished
    result: RunResult
    last: dict[str, Any]  # its last checkpoint
    resumed_last: dict[str, Any]
    resumed_history: list[dict[str, float]]
    adapter: MethodAdapter  # the same training in a user's loop


def _adapter_run(name: str, epochs: int, reference: Trainer) -> MethodAdapter:
    """The run of ``reference`` in a user's loop: the same model built from the same seed, the
    same batches in the same order (the same loaders, so the same draws of the random
    generator), one optimizer of the same kind over the adapter's groups."""
    cfg = contract_config(name, 2, epochs)
    t = cfg.train
    fabric = make_fabric(cfg)
    fabric.seed_everything(t.seed, verbose=False)
    data = build_dataset(cfg)
    method = METHODS.get(cfg.method.name)(cfg.method.params)
    model = build_model(cfg, data, method)
    train, held_out = _hold_out(data.splits["train"], method, t.seed)
    splits = {
        "train": _Pairs(data.splits["train"], train, 2 * t.batch_size),
        "val": _Pairs(data.splits["val"], torch.arange(len(data.splits["val"])), 2 * t.batch_size),
    }
    if held_out is not None:
        splits["held_out"] = _Pairs(data.splits["train"], held_out, 2 * t.batch_size)
    adapter = MethodAdapter(method, model, splits=splits, task=data.task)
    optimizer = build_optimizer(adapter.param_groups(), t)
    sampler = EpochBatchSampler(len(train), t.batch_size, t.seed, 0, 1, indices=train)
    loader = make_loader(data.splits["train"], sampler, 0)
    val_sampler = ShardBatchSampler(len(data.splits["val"]), 2 * t.batch_size, 0, 1)
    val_loader = make_loader(data.splits["val"], val_sampler, 0)
    for epoch in range(epochs):
        adapter.begin_epoch(epoch, optimizer)
        model.train()
        if method.freezes_encoders:
            model.encoders.eval()
        names: list[str | None]
        if adapter.subsets is None:
            sampler.set_epoch(epoch)
            epoch_loader = loader
            names = [None] * len(loader)
        else:  # each subset in turn; its indices are positions in splits["train"]
            subsets = [(s.name, train[s.index]) for s in adapter.subsets]
            subset_sampler = SubsetBatchSampler(subsets, t.batch_size, t.seed, epoch)
            epoch_loader = make_loader(data.splits["train"], subset_sampler, 0)
            names = list(subset_sampler.names)
        for count, batch in enumerate(epoch_loader):
            adapter.train_step(
                batch.inputs, batch.targets, optimizer, epoch, index=batch.index,
                epoch_progress=count / len(names), subset=names[count],
            )  # fmt: skip
        val = reference._metrics(adapter.protocol.outputs(val_loader))
        adapter.end_epoch(epoch, val, optimizer)
    return adapter


@pytest.fixture(scope="module")
def contract_runs(tmp_path_factory: pytest.TempPathFactory):
    """``runs(name)``: the method's :class:`ContractRuns`, made on first use."""
    made: dict[str, ContractRuns] = {}

    def runs(name: str) -> ContractRuns:
        if name not in made:
            root = tmp_path_factory.mktemp(f"contract_{name}")
            epochs = contract_epochs(name)
            cfg = contract_config(name, 2, epochs)
            killed = _KilledCopy(epochs - 2, root / "killed")
            trainer = build_trainer(cfg, root / "full", callbacks=[*default_callbacks(cfg), killed])
            result = trainer.run(resume=False)
            resumed = build_trainer(cfg, root / "killed")
            resumed.run(resume=True)
            made[name] = ContractRuns(
                epochs,
                trainer,
                result,
                load_checkpoint(root / "full" / "last.ckpt"),
                load_checkpoint(root / "killed" / "last.ckpt"),
                resumed.history,
                _adapter_run(name, epochs, trainer),
            )
        return made[name]

    return runs


def _assert_same(a: Any, b: Any, where: str, exact: bool) -> None:
    """``a`` and ``b`` (nested dicts, lists, tensors, numbers) are equal, or close to rounding."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}", exact)
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]", exact)
    elif isinstance(a, Tensor):
        assert isinstance(b, Tensor), where
        if exact:
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, msg=where)
    elif isinstance(a, float) and not exact:
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), where
    else:
        assert a == b, where


# --- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_two_modalities_train_to_finite_weights(name: str, contract_runs) -> None:
    runs = contract_runs(name)
    assert runs.result.epochs_run == runs.epochs
    for row in runs.trainer.history:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])
    for key, value in runs.last["module"].items():
        assert not value.is_floating_point() or bool(value.isfinite().all()), key


@pytest.mark.parametrize("name", NAMES)
def test_three_modalities_take_a_finite_step_where_supported(name: str, tmp_path: Path) -> None:
    """One step of the epoch in which the method acts, after its training start and the epoch's
    start, with three modalities (a method that supports fewer refuses them in setup)."""
    cls = METHODS.get(name)
    if cls.max_modalities is not None and cls.max_modalities < 3:
        with pytest.raises(ConfigError, match="at most"):
            build_trainer(contract_config(name, 3, contract_epochs(name)), tmp_path)
        return
    epoch = contract_epochs(name) - 1
    trainer = build_trainer(contract_config(name, 3, epoch + 1), tmp_path)
    start = trainer.epoch_context(0)
    start.initial_encoder_state = encoder_state(trainer.model)
    trainer.method.on_train_start(start)
    rate = trainer.cfg.train.lr
    begun = trainer.protocol.begin_epoch(
        trainer.epoch_context(epoch),
        trainer.optimizer,
        lambda _: rate,
        trainer.split_index["train"],
    )
    trainer.train_mode()
    subset = None
    if begun.subsets is None:
        batch = next(iter(trainer.loaders["train"]))
    else:  # a re-sampled epoch: a batch of its first subset
        first = begun.subsets[0]
        subset = first.name
        batch = trainer.data.splits["train"].__getitems__(first.index[:80].tolist())
    terms = trainer.train_step(batch, epoch, subset=subset)
    assert terms and all(math.isfinite(v) for v in terms.values()), terms
    assert trainer._weights_finite()


# --- state -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_through_a_safe_checkpoint(name: str, contract_runs) -> None:
    runs = contract_runs(name)
    state = runs.trainer.method.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = build_method(name, {})
    fresh.setup(runs.trainer.method.info)
    fresh.load_state_dict(loaded)
    _assert_same(fresh.state_dict(), state, "state", exact=True)


@pytest.mark.parametrize("name", NAMES)
def test_a_killed_run_resumes_exactly(name: str, contract_runs) -> None:
    runs = contract_runs(name)
    _assert_same(runs.resumed_last["module"], runs.last["module"], "module", exact=True)
    _assert_same(runs.resumed_last["method"], runs.last["method"], "method", exact=True)
    assert runs.resumed_last["phase"] == runs.last["phase"]
    assert without_time(runs.resumed_history) == without_time(runs.trainer.history)


@pytest.mark.parametrize("name", NAMES)
def test_the_trainer_and_the_adapter_train_alike(name: str, contract_runs) -> None:
    runs = contract_runs(name)
    adapter = runs.adapter
    _assert_same(adapter.protocol.module.state_dict(), runs.last["module"], "module", exact=False)
    _assert_same(adapter.method.state_dict(), runs.last["method"], "method", exact=False)
    for ours, theirs in zip(adapter.history, runs.trainer.history, strict=True):
        _assert_same(ours, {k: theirs[k] for k in ours}, "history", exact=False)


# --- schedules and options -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_schedules_too_short_to_act_are_refused_in_one_line(name: str) -> None:
    epochs = schedule_epochs(name)
    for short in range(1, epochs):
        with pytest.raises(ConfigError) as err:
            contract_config(name, 2, short)
        message = str(err.value)
        assert "\n" not in message and repr(name) in message and "would never act" in message
    contract_config(name, 2, epochs)


@pytest.mark.parametrize("name", NAMES)
def test_options_are_documented_and_searched_options_exist(name: str) -> None:
    cls = METHODS.get(name)
    assert (cls.__doc__ or "").strip(), f"{name} has no class docstring"
    options = dataclass_options(cls.Params)
    assert [o.name for o in options if not o.help] == []
    names = {o.name for o in options}
    for old, new in renamed_options(cls.Params).items():
        assert new in names and old not in names, (old, new)
    key, values = cls.searched_option()
    section, _, option = key.partition(".")
    assert len(values) == 3
    if section == "method":
        assert option in names, key


# --- distributed -------------------------------------------------------------------------------------
def _ddp_every_method(fabric: Any, names: list[str], root: str) -> dict[str, Any]:
    """In each of two processes: every method's contract run on this process's share of each
    batch; returns (rank 0) the validation metrics and whether the ranks' weights agree."""
    import gc

    import torch.distributed as dist

    _skip_the_end_of_run_evaluation()  # in this worker process
    out: dict[str, Any] = {}
    for name in names:
        cfg = contract_config(name, 2, contract_epochs(name), **{"train.devices": 2})
        fabric.seed_everything(cfg.train.seed, verbose=False)
        data = build_dataset(cfg)
        method = METHODS.get(cfg.method.name)(cfg.method.params)
        model = build_model(cfg, data, method)
        module = method.setup(model_info(model, data))
        if method.grows_module:  # refused before anything is wrapped for the processes
            with pytest.raises(ConfigError) as refusal:
                Trainer(fabric, cfg, data, model, method, module, Path(root) / name, callbacks=[])
            out[name] = {"refused": str(refusal.value)}
            continue
        trainer = Trainer(fabric, cfg, data, model, method, module, Path(root) / name, callbacks=[])
        result = trainer.run(resume=False)
        flat = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
        gathered = fabric.all_gather(flat)
        out[name] = {
            "val": result.metrics["val"],
            "ranks_agree": bool(torch.equal(gathered[0], gathered[1])),
            "batches": len(trainer.train_sampler),
        }
        del trainer
    gc.collect()  # free the DDP reducers while the process group is alive
    dist.barrier()
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every method's contract run under two DDP processes, started once for all methods."""
    root = tmp_path_factory.mktemp("contract_ddp")
    cfg = contract_config("joint", 2, 2, **{"train.devices": 2, "train.accelerator": "cpu"})
    fabric = make_fabric(cfg)
    return fabric.launch(_ddp_every_method, list(NAMES), str(root))


@pytest.mark.parametrize("name", NAMES)
def test_two_ddp_processes_behave_as_documented(name: str, contract_runs, ddp_runs) -> None:
    two = ddp_runs[name]
    if METHODS.get(name).grows_module:
        message = two["refused"]
        assert "\n" not in message and repr(name) in message and "train.devices=1" in message
        return
    assert two["ranks_agree"]  # every rank takes the same decisions on the same weights
    single = contract_runs(name)
    one = single.result.metrics["val"]
    trained = len(single.trainer.split_index["train"])  # less what a method holds out
    if trained % BATCH > 1 and (trained % BATCH) % 2:
        # the documented rule: a final batch that does not split evenly over the processes is
        # dropped (G-Blending holds out 15 of the 160 samples: 145 = 80 + 65)
        assert two["batches"] == len(single.trainer.train_sampler) - 1
        assert math.isfinite(two["val"]["loss"])
        return
    assert two["batches"] == len(single.trainer.train_sampler)
    if name in DDP_DIFFERS:
        assert math.isfinite(two["val"]["loss"])
        return
    assert two["val"]["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    assert two["val"]["loss"] == pytest.approx(one["loss"], rel=1e-3)
