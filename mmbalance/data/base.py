"""What every dataset provides: in-memory splits of named modalities, and a registry.

A dataset module registers a :class:`DatasetSource` subclass whose ``build`` returns a
:class:`DatasetBundle`: train / validation / test splits, one :class:`ModalitySpec` per modality
(shape and default encoder), the task, and where known the Bayes accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.data import DATASETS
from mmbalance.errors import DataError

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: its per-sample shape and the encoder used when the config names none."""

    name: str
    shape: tuple[int, ...]
    encoder: str = "mlp"
    encoder_params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """A mini-batch: named modality inputs, targets and the samples' dataset indices."""

    inputs: dict[str, Tensor]
    targets: Tensor
    index: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {m: x.to(device, non_blocking=True) for m, x in self.inputs.items()},
            self.targets.to(device, non_blocking=True),
            self.index.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return int(self.targets.shape[0])


class MultimodalTensorDataset(Dataset):
    """Aligned tensors per modality plus targets, fetched a whole batch at a time."""

    def __init__(self, inputs: Mapping[str, Tensor], targets: Tensor) -> None:
        n = int(targets.shape[0])
        if n == 0:
            raise DataError("dataset split is empty")
        for m, x in inputs.items():
            if x.shape[0] != n:
                raise DataError(
                    f"modality {m!r} has {x.shape[0]} samples but there are {n} targets"
                )
        self.inputs = dict(inputs)
        self.targets = targets

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch({m: x[idx] for m, x in self.inputs.items()}, self.targets[idx], idx)

    def subset(self, indices: Tensor) -> MultimodalTensorDataset:
        return MultimodalTensorDataset(
            {m: x[indices] for m, x in self.inputs.items()}, self.targets[indices]
        )


def collate_batches(batches: Sequence[Batch] | Batch) -> Batch:
    """DataLoader ``collate_fn``: batches come pre-collated by ``__getitems__``."""
    if isinstance(batches, Batch):
        return batches
    return Batch(
        {m: torch.cat([b.inputs[m] for b in batches]) for m in batches[0].inputs},
        torch.cat([b.targets for b in batches]),
        torch.cat([b.index for b in batches]),
    )


@dataclass
class DatasetBundle:
    """A dataset ready for training.

    Attributes:
        name: registry name.
        task: ``classification`` or ``regression``.
        num_outputs: classes for classification, 1 for regression.
        modalities: per-modality specs, in the model's modality order.
        splits: ``train``, ``val`` and ``test`` datasets.
        bayes_accuracy: the Bayes-optimal test accuracy when the generating process is known.
        class_names: optional human-readable labels.
        notes: provenance, e.g. how a validation split was carved.
        details: what a run directory records about the data beyond the above (its
            ``data.json``): e.g. the content fingerprint, a label mapping, the split's hash,
            standardisation statistics; JSON values only.
    """

    name: str
    task: Task
    num_outputs: int
    modalities: dict[str, ModalitySpec]
    splits: dict[str, Dataset]
    bayes_accuracy: float | None = None
    class_names: list[str] | None = None
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What a run directory's ``data.json`` records: the dataset, its task, modalities
        (shape and default encoder), split sizes, class names and :attr:`details`."""
        return {
            "dataset": self.name,
            "task": self.task,
            "num_outputs": self.num_outputs,
            "modalities": {
                m: {"shape": list(s.shape), "encoder": s.encoder}
                for m, s in self.modalities.items()
            },
            "sizes": {split: len(ds) for split, ds in self.splits.items()},  # type: ignore[arg-type]
            "class_names": self.class_names,
            "notes": self.notes,
            **self.details,
        }

    def __post_init__(self) -> None:
        missing = {"train", "val", "test"} - set(self.splits)
        if missing:
            raise DataError(f"dataset {self.name!r} lacks the splits {sorted(missing)}")
        if len(self.modalities) < 2:
            raise DataError(f"dataset {self.name!r} has fewer than 2 modalities")
        targets = getattr(self.splits["train"], "targets", None)
        if self.task == "classification" and isinstance(targets, Tensor) and len(targets):
            if torch.unique(targets).numel() < 2:
                raise DataError(
                    f"dataset {self.name!r}: every training sample has class "
                    f"{int(targets[0])}; a classifier needs two classes or more to learn from "
                    "(use more training samples)"
                )


class DatasetSource:
    """Base class of registered datasets.

    Subclasses set ``Params`` (a dataclass of their options, validated by the config system),
    optionally ``train_defaults`` (train settings that suit the dataset; user values win), and
    implement :meth:`build`.

    A dataset that is decoded once from a raw release before it can be built (``mmbalance
    prepare NAME``) also sets ``PrepareParams`` (a dataclass of the preparation's options) and
    implements :meth:`prepare` and :meth:`print_prepare_report`. The command line finds the
    preparable datasets and checks their options through these, so preparation needs no list of
    its own.
    """

    Params: ClassVar[type]
    #: Options of :meth:`prepare`; None for a dataset that needs no preparation.
    PrepareParams: ClassVar[type | None] = None
    train_defaults: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""
    #: Further paragraphs that ``mmbalance list NAME`` prints under the description.
    guide: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any, cache_dir: Path) -> None:
        self.params = params
        self.cache_dir = cache_dir

    def build(self) -> DatasetBundle:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """A SHA-256 of the content this source reads from the user's files, computed without
        building (None for a source whose data its options determine, such as a generated
        dataset): two runs whose options are equal but whose files differ are not the same run.
        """
        return None

    @classmethod
    def prepare(
        cls, raw: Path, out: Path, params: Any, *, progress: bool = True, console: Any = None
    ) -> dict[str, Any]:  # pragma: no cover - abstract
        """Decode the raw release in ``raw`` into the prepared directory ``out``; the report."""
        raise NotImplementedError

    @classmethod
    def print_prepare_report(
        cls, report: Mapping[str, Any], console: Any
    ) -> None:  # pragma: no cover - abstract
        """Print the summary of a :meth:`prepare` report."""
        raise NotImplementedError


def preparable_datasets() -> list[str]:
    """The registered datasets that ``mmbalance prepare`` can prepare, by name."""
    return [name for name, source in DATASETS.items() if source.PrepareParams is not None]


def stratified_split(targets: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Split indices into parts with the given fractions, class by class (for classification)."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in fractions]
    for cls in torch.unique(targets):
        idx = torch.nonzero(targets == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        bounds = torch.tensor([0.0, *fractions]).cumsum(0) * len(idx)
        cuts = bounds.round().long().tolist()
        for k in range(len(fractions)):
            parts[k].append(idx[cuts[k] : cuts[k + 1]])
    return [torch.sort(torch.cat(p)).values for p in parts]


def error_text(err: BaseException) -> str:
    """An exception's message cut to its first line (for one-line errors and reports)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
