"""What the cost benchmark measures: its settings (a model, data and batch), the timed methods
of each, and one method's trainer and batch built the way ``fit`` builds them (see
:mod:`benchmarks.bench_cost` for the settings in words)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor

from mmbalance.builder import build_components, build_dataset, resolve_config
from mmbalance.data.base import Batch, DatasetBundle, ModalitySpec, MultimodalTensorDataset
from mmbalance.methods import METHODS
from mmbalance.methods.base import Method, StepContext, total_loss
from mmbalance.methods.mcr import MCR
from mmbalance.methods.mmpareto import MMPareto
from mmbalance.methods.ops.divergence import divergence_rows
from mmbalance.models.output import ModelOutput
from mmbalance.train import Trainer

#: Epoch passed to ``train_step``: late enough that every method's modulation is active.
EPOCH = 10
#: Targets of the benchmark issues: a method's step time over joint's must not exceed these
#: (``Setting.targets`` overrides them per setting; mcr's depend on the setting).
TARGETS = {"ogm": 1.05, "ogm_ge": 1.05, "opm": 1.05, "mmpareto": 1.6}
#: MMPareto (exact) against its floor (``mmpareto[floor]``), measured in the same run.
FLOOR_TARGET = 1.05
#: Methods of the sweeps (joint is the reference).
BALANCING = ("mcr", "ogm", "ogm_ge", "opm", "mmpareto")

NOTES = {
    "unimodal": "first modality only",
    "unipre_frozen": "main stage; adds a unimodal pre-training stage; encoders frozen",
    "unipre_finetuned": "main stage; adds a unimodal pre-training stage",
    "mmpareto[latent]": "method.variant=latent",
    "mmpareto[floor]": "floor of exact MMPareto: its summed-loss step + 1 backward through encoders",
    "mcr[floor]": "floor of MCR: its losses, R_MIPD's gather, set mixing and divergences by "
    "autograd, without the game's routing",
}


class MMParetoFloor(MMPareto):
    """The floor of exact MMPareto: the least any exact per-loss encoder gradient needs.

    The step of MMPareto's model and losses (fused plus unimodal heads) with their summed
    gradient, plus one extra backward pass of the fused loss through the encoders (which
    ``torch.autograd.grad`` computes and this discards). What exact MMPareto adds on top is the
    combination of the two gradients per encoder. Not registered: a benchmark entry only.
    """

    def backward(self, losses: Mapping[str, Tensor], ctx: StepContext) -> None:
        params = [p for ps in ctx.encoder_params.values() for p in ps]
        if params:
            torch.autograd.grad(losses["task"], params, retain_graph=True, allow_unused=True)
        ctx.backward(total_loss(losses))


@dataclass(frozen=True)
class TimedMethod:
    """One timed configuration: a registered method with options, under a label.

    ``method_class`` (optional) replaces the built method by an instance of this class with the
    same options, after the model has been built for ``method`` (the MMPareto floor).
    """

    label: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()
    method_class: type[Method] | None = None


@dataclass
class Setting:
    """A model, data and batch on which methods are compared."""

    name: str
    batch: int
    modalities: int
    entries: list[TimedMethod]
    overrides: dict[str, Any] = field(default_factory=dict)
    #: per-modality input shapes of a random-tensor dataset (None: build the configured dataset)
    shapes: dict[str, tuple[int, ...]] | None = None
    classes: int = 6
    rounds: int = 15
    steps: int = 10
    warmup: int = 3
    mem_steps: int = 3
    #: seconds for the whole setting: rounds are cut so that it fits (at least ``min_rounds``)
    budget_s: float | None = None
    min_rounds: int = 2
    #: targets of this setting, overriding :data:`TARGETS`
    targets: dict[str, float] = field(default_factory=dict)
    #: ``train.compile=true`` for every entry (the compiled step, :mod:`mmbalance.train.compiling`)
    compile: bool = False


class MCRFloor(MCR):
    """The floor of MCR: its losses with R_MIPD's own arithmetic and nothing else.

    The same model, task, unimodal and contrastive losses and the same donors as MCR; R_MIPD is
    the gather of the permuted contributions, the set mixing and the divergences over ``K * B``
    rows per set (``sum_S W_S D_S``), differentiated by autograd without the game's routing of
    the gradient (additive heads, which the benchmark's settings use; other heads: MCR itself).
    What MCR adds on top is the routing. Not registered: a benchmark entry only.
    """

    def mipd(
        self, output: ModelOutput, ctx: StepContext, donors: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        if output.contributions is None or self.params.perturbation != "permute":
            return super().mipd(output, ctx, donors)
        perturbation = self.perturbation(output, ctx, donors)
        assert perturbation.index_stack is not None
        mods = output.modalities
        ref = output.logits
        _, w = self.routing(mods, ref.device, ref.dtype)
        anchors = torch.stack([output.contributions[m] for m in mods])  # (M, B, C)
        m, b, c = anchors.shape
        r = perturbation.rows
        index = perturbation.index_stack.unsqueeze(-1).expand(m, r * b, c)
        moved = anchors.gather(1, index).view(m, r * b * c)
        u = (w.member @ moved).view(-1, r, b, c)
        u = u + (w.outside @ anchors.view(m, b * c)).view(-1, 1, b, c)
        bias = getattr(self._head(ctx), "bias", None)
        if bias is not None:
            u = u + bias
        s = u.shape[0]
        rows = divergence_rows(u.reshape(-1, c), ref.repeat(s * r, 1), ctx.task)
        return (w.shared * rows.view(s, -1).mean(1)).sum()


FLOOR = TimedMethod("mmpareto[floor]", "mmpareto", method_class=MMParetoFloor)
MCR_FLOOR = TimedMethod("mcr[floor]", "mcr", method_class=MCRFloor)
#: the floor entry of a method's label
FLOORS = {"mmpareto": FLOOR, "mcr": MCR_FLOOR}


def all_entries() -> list[TimedMethod]:
    """Every registered method (joint first) plus MMPareto's latent variant and its floor, and
    MCR's floor."""
    names = ["joint", *(n for n in METHODS.names() if n != "joint")]
    entries = [TimedMethod(n, n) for n in names]
    if "mmpareto" in names:
        entries += [TimedMethod("mmpareto[latent]", "mmpareto", (("variant", "latent"),)), FLOOR]
    if "mcr" in names:
        entries.append(MCR_FLOOR)
    return entries


def sweep_entries() -> list[TimedMethod]:
    entries = [
        TimedMethod("joint", "joint"),
        *(TimedMethod(n, n) for n in BALANCING if n in METHODS),
    ]
    return entries + [f for name, f in FLOORS.items() if name in METHODS]


def mcr_k_entries(ks: Sequence[int] = (1, 8, 32, 128)) -> list[TimedMethod]:
    """joint and mcr with ``K`` permutations per step, for how its cost scales with K."""
    mcr = [TimedMethod(f"mcr[K={k}]", "mcr", (("num_permutations", k),)) for k in ks]
    floors = [
        TimedMethod(f"mcr[K={k}][floor]", "mcr", (("num_permutations", k),), MCRFloor) for k in ks
    ]
    return [TimedMethod("joint", "joint"), *mcr, *floors]


def _synthetic(modalities: int | None, quick: bool) -> dict[str, Any]:
    """Overrides of the synthetic dataset: ``None`` = the competition preset (small model)."""
    sizes = {"dataset.n_val": 64, "dataset.n_test": 64, "dataset.n_bayes": 256}
    if quick:
        sizes["dataset.n_train"] = 256
    if modalities is None:
        return {"dataset": "synthetic", "dataset.preset": "competition", **sizes}
    m = modalities
    return {
        "dataset": "synthetic",
        "dataset.num_modalities": m,
        "dataset.shares": [0.5] + [0.5 / m] * m,
        "dataset.signal": [3.0] + [1.0] * (m - 1),
        "dataset.depth": [1] + [4] * (m - 1),
        **sizes,
    }


def make_settings(
    quick: bool, device: str, resnet_batch: int | None = None, resnet_budget: float = 480.0
) -> list[Setting]:
    """The settings of a run (``quick``: tiny versions of each, for tests)."""
    cuda = device.startswith("cuda")
    # the CREMA-D train settings (the data are random tensors of its shapes); mcr's K is 32
    resnet_overrides = {"dataset": "cremad", "dataset.frames": 3, "fusion": "late_sum"}
    if quick:
        resnet = Setting(
            "resnet",
            batch=4,
            modalities=2,
            entries=all_entries(),
            overrides={**resnet_overrides, "encoder.audio.width": 4, "encoder.video.width": 4},
            targets={"mcr": 1.05},
            shapes={"audio": (1, 32, 32), "video": (3, 2, 32, 32)},
            rounds=2,
            steps=1,
            warmup=1,
            mem_steps=1,
        )
        small = Setting("small", 32, 2, all_entries(), _synthetic(None, True), rounds=2, steps=2)
        small.warmup, small.mem_steps = 1, 1
        small.targets = {"mcr": 1.5}
        sweeps = [
            Setting("sweep_batch", 16, 2, sweep_entries(), _synthetic(None, True)),
            Setting("sweep_modalities", 32, 3, sweep_entries(), _synthetic(3, True)),
            Setting("sweep_mcr_k", 32, 2, mcr_k_entries((1, 4)), _synthetic(None, True)),
        ]
        for s in sweeps:
            s.rounds, s.steps, s.warmup, s.mem_steps = 2, 2, 1, 1
        return [resnet, small, *sweeps]
    batch = resnet_batch or (32 if cuda else 4)
    resnet = Setting(
        "resnet",
        batch=batch,
        modalities=2,
        entries=all_entries(),
        overrides=resnet_overrides,
        shapes={"audio": (1, 257, 188), "video": (3, 3, 224, 224)},
        rounds=15 if cuda else 10,
        steps=5 if cuda else 1,
        warmup=3 if cuda else 1,
        mem_steps=3 if cuda else 1,
        budget_s=None if cuda else resnet_budget,
        targets={"mcr": 1.05},
    )
    small = Setting(
        "small",
        32,
        2,
        all_entries(),
        _synthetic(None, False),
        rounds=15,
        steps=20,
        targets={"mcr": 1.5},
    )
    batch_targets = {256: {"mcr": 2.0}}
    sweeps = [
        Setting(
            "sweep_batch",
            b,
            2,
            sweep_entries(),
            _synthetic(None, False),
            steps=20,
            targets=batch_targets.get(b, {}),
        )
        for b in (16, 64, 256)
    ]
    modality_targets = {5: {"mcr": 4.0}}
    sweeps += [
        Setting(
            "sweep_modalities",
            32,
            m,
            sweep_entries(),
            _synthetic(m, False),
            steps=20,
            targets=modality_targets.get(m, {}),
        )
        for m in (2, 3, 4, 5)
    ]
    sweeps += [
        Setting("sweep_mcr_k", b, 2, mcr_k_entries(), _synthetic(None, False), steps=10)
        for b in (32, 256)
    ]
    return [resnet, small, *sweeps]


_BUNDLES: dict[tuple[Any, ...], DatasetBundle] = {}


def random_bundle(shapes: dict[str, tuple[int, ...]], classes: int, n: int) -> DatasetBundle:
    """Random inputs of the given shapes (ResNet-18 encoders), ``n`` training samples."""
    key = (tuple(sorted(shapes.items())), classes, n)
    if key not in _BUNDLES:
        gen = torch.Generator().manual_seed(0)

        def split(k: int) -> MultimodalTensorDataset:
            x = {m: torch.randn(k, *s, generator=gen) for m, s in shapes.items()}
            return MultimodalTensorDataset(x, torch.randint(0, classes, (k,), generator=gen))

        _BUNDLES[key] = DatasetBundle(
            name="random",
            task="classification",
            num_outputs=classes,
            modalities={m: ModalitySpec(m, s, "resnet18", {}) for m, s in shapes.items()},
            splits={"train": split(n), "val": split(2), "test": split(2)},
        )
    return _BUNDLES[key]


def build_run(
    setting: Setting, entry: TimedMethod, device: str, workdir: Path
) -> tuple[Trainer, Batch, str | None]:
    """A trainer for ``entry`` on ``setting`` (built as ``fit`` builds it), the fixed batch and
    the epoch subset its steps are timed as (the first of ``Method.epoch_subsets``, for a method
    that re-samples its epochs; its pass at the epoch's start is not timed)."""
    accelerator = "cuda" if device.startswith("cuda") else "cpu"
    shared = dict(setting.overrides)
    if METHODS.get(entry.method).fusion is not None:  # a method defined on its own head keeps it
        shared = {k: v for k, v in shared.items() if k != "fusion" and not k.startswith("fusion.")}
    overrides = {
        **shared,
        "method": entry.method,
        **{f"method.{k}": v for k, v in entry.params},
        "train.batch_size": setting.batch,
        "train.accelerator": accelerator,
        "train.progress": False,
        "train.tensorboard": False,
        "train.compile": setting.compile,
    }
    cfg = resolve_config(overrides)
    fabric = Fabric(accelerator=accelerator, devices=1, precision=cfg.train.precision)
    fabric.seed_everything(cfg.train.seed, verbose=False)  # the same weights for every method
    if setting.shapes is not None:
        # enough samples for a method that holds out a stratified part of the training split
        # (G-Blending 10 %, LFM 2 %); the timed batch is the first ``batch`` of them
        data = random_bundle(
            setting.shapes, setting.classes, max(setting.batch, 60 * setting.classes)
        )
    else:
        data = build_dataset(cfg)
    method, model, method_module = build_components(cfg, data)
    if entry.method_class is not None:
        assert method.info is not None
        replaced = entry.method_class(method.params)
        method_module = replaced.setup(method.info)
        method = replaced
    if method.freezes_encoders:  # as after the pre-training stage in ``fit``
        model.encoders.requires_grad_(False)
    trainer = Trainer(fabric, cfg, data, model, method, method_module, workdir)
    trainer.train_mode()
    ctx = trainer.epoch_context(EPOCH)
    method.on_epoch_start(ctx)
    subsets = method.epoch_subsets(ctx)
    batch = data.splits["train"].__getitems__(list(range(setting.batch)))
    return trainer, batch.to(fabric.device), subsets[0].name if subsets else None
