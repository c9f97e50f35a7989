"""The registered dataset classes of the prepared clip datasets: :class:`ClipSource` (its options,
``prepare``: find the release's clips, decode them, write the manifest; ``build``: read the
manifest, stack, cache and split) and :class:`AudioVisualSource`, the audio + frames bundle that
CREMA-D, AVE and Kinetics-Sounds share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.data.base import (
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
)
from mmbalance.data.clips.jobs import Release, prepare_clips, print_report
from mmbalance.data.clips.prepared import (
    files_stamp,
    read_classes,
    read_manifest,
    record_prepare_options,
)
from mmbalance.data.clips.tensors import (
    AV_TO_TENSOR,
    ClipDataset,
    av_parts,
    check_disjoint_splits,
    content_ids,
    normalise_rgb,
    split_indices,
    stack_clips,
)
from mmbalance.errors import DataError
from mmbalance.io import claim_output, output_lock, write_text_atomic


@dataclass
class ClipPrepareParams:
    """Options of ``mmbalance prepare`` shared by every clip dataset.

    Attributes:
        workers: parallel processes decoding the clips.
        image_size: side of the stored square frames, in pixels.
    """

    workers: int = 1
    image_size: int = 112

    def __post_init__(self) -> None:
        check(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        check(
            16 <= self.image_size <= 512,
            f"--image-size must be in [16, 512], got {self.image_size}",
        )


@dataclass
class AudioVisualPrepareParams(ClipPrepareParams):
    """Options of preparing an audio + frames dataset: both audio recipes are written.

    Attributes:
        fbank_frames: length of the stored fbank in 10 ms frames (cut or zero-padded).
    """

    fbank_frames: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            16 <= self.fbank_frames <= 4096,
            f"--fbank-frames must be in [16, 4096], got {self.fbank_frames}",
        )


@dataclass
class ClipParams:
    """Options of every prepared clip dataset (subclasses set their own ``frames`` default).

    Attributes:
        root: the prepared directory (the ``--out`` of ``mmbalance prepare``).
        frames: frames per clip given to the visual encoder, taken at the centres of equal
            segments of the clip.
        seed: seeds the validation split carved from the training clips (and any other split
            the dataset has to draw).
        val_fraction: share of the training clips held out for validation when the release
            has no validation split.
    """

    root: str | None = None
    frames: int = 3
    seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        check(1 <= self.frames <= 16, f"dataset.frames must be in [1, 16], got {self.frames}")
        check(
            0 < self.val_fraction < 0.5,
            f"dataset.val_fraction must be in (0, 0.5), got {self.val_fraction}",
        )


@dataclass
class AudioVisualParams(ClipParams):
    """Options of an audio + frames dataset: which of the two prepared audio recipes to use.

    Attributes:
        audio: ``stft`` (OGM-GE's log-STFT spectrogram) or ``fbank`` (the Kaldi-style fbank).
    """

    audio: Literal["stft", "fbank"] = "stft"


class ClipSource(DatasetSource):
    """A dataset that ``mmbalance prepare`` decodes once from its raw release (module docstring).

    A subclass sets ``name`` (its registry name), ``title``, ``raw_hint`` (what ``--raw`` names),
    ``version`` (bumped when the prepared layout or the loading changes), ``classes`` when the
    label order is fixed (else ``classes.txt`` of the prepared directory gives it), ``Params``
    and ``PrepareParams``, and implements :meth:`find_clips` (what the release holds) and
    :meth:`bundle` (the prepared arrays as modalities).
    """

    Params: ClassVar[type] = ClipParams
    PrepareParams: ClassVar[type | None] = ClipPrepareParams
    name: ClassVar[str]
    title: ClassVar[str]
    raw_hint: ClassVar[str] = "RAW_DIR"
    version: ClassVar[int] = 1
    classes: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def prepare_hint(cls) -> str:
        return (
            f"run `mmbalance prepare {cls.name} --raw {cls.raw_hint} --out DIR` and set "
            "dataset.root=DIR"
        )

    # ------------------------------------------------------------------ preparation

    @classmethod
    def prepare(
        cls,
        raw: Path,
        out: Path,
        params: Any = None,
        *,
        progress: bool = True,
        console: Any = None,
    ) -> dict[str, Any]:
        """Prepare the release in ``raw`` into ``out``; returns the report.

        ``params`` is a ``PrepareParams`` (its defaults when None). ``workers > 1`` runs spawned
        processes, so a calling script needs the usual ``if __name__ == "__main__":`` guard.
        """
        assert cls.PrepareParams is not None
        params = params if params is not None else cls.PrepareParams()
        raw, out = Path(raw), Path(out)
        if not raw.is_dir():
            raise DataError(
                f"{cls.title} raw directory {raw} does not exist; pass the root of the release"
            )
        release = cls.find_clips(raw, out, params)
        settings = {k: v for k, v in asdict(params).items() if k != "workers"}
        # nothing is written before the release was read and --out is known to be ours
        claim_output(out, "prepared")
        with output_lock(out):
            record_prepare_options(out, cls.name, settings)
            if release.classes is not None:
                write_text_atomic(out / "classes.txt", "\n".join(release.classes) + "\n")
                settings["classes"] = len(release.classes)
            return prepare_clips(
                dataset=cls.name,
                title=cls.title,
                raw=raw,
                out=out,
                release=release,
                workers=params.workers,
                progress=progress,
                console=console,
                settings=settings,
            )

    @classmethod
    def find_clips(
        cls, raw: Path, out: Path, params: Any
    ) -> Release:  # pragma: no cover - abstract
        """The clips of the release in ``raw`` and how to prepare each into ``out``."""
        raise NotImplementedError

    @classmethod
    def print_prepare_report(cls, report: Mapping[str, Any], console: Any) -> None:
        print_report(report, console, cls.title)

    # ------------------------------------------------------------------ loading

    def fingerprint(self) -> str | None:
        """:func:`~mmbalance.data.clips.prepared.files_stamp` of the prepared directory (None
        when none is set): every file's size, times and inode, which change whenever the file
        does. The content hash of the stacked arrays is in the bundle's
        ``details["fingerprint"]``."""
        root = self.params.root
        return files_stamp(Path(root).expanduser().resolve()) if root else None

    def build(self) -> DatasetBundle:
        p: ClipParams = self.params
        hint = self.prepare_hint()
        if not p.root:
            raise DataError(f"dataset.root is not set; {hint}")
        root = Path(p.root).expanduser().resolve()
        rows = read_manifest(root, self.title, hint, self.classes)
        classes = list(self.classes) if self.classes else read_classes(root, rows, hint)
        return self.bundle(root, rows, classes)

    def bundle(
        self, root: Path, rows: Sequence[dict[str, str]], classes: Sequence[str]
    ) -> DatasetBundle:  # pragma: no cover - abstract
        """The prepared directory ``root`` (its manifest ``rows``) as a bundle."""
        raise NotImplementedError

    def test_fraction(self) -> float | None:
        """The share of clips for testing when the manifest gives no split (None: refuse)."""
        return None

    def clip_bundle(
        self,
        root: Path,
        rows: Sequence[dict[str, str]],
        classes: Sequence[str],
        *,
        parts: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
        normalise: Mapping[str, Callable[[Tensor], Tensor]],
        encoders: Mapping[str, str],
        to_tensor: Mapping[str, Callable[[np.ndarray], Tensor]],
        recipe: dict[str, Any],
        notes: str,
    ) -> DatasetBundle:
        """Stack, cache and split the prepared directory ``root`` into a bundle.

        ``parts`` maps each modality to its subdirectory and the check/selection applied to a
        clip's array; ``to_tensor`` turns the stacked arrays into the cached tensors (frames
        stay uint8), ``normalise`` turns a batch of them into model input. The cache is loaded
        memory-mapped and each split is a :class:`ClipDataset` over it, so no split copies or
        converts the frames.
        """
        from mmbalance.data.cache import cached_arrays_and_hash

        p: ClipParams = self.params
        name, title, hint = self.name, self.title, self.prepare_hint()
        # keyed on every file of the directory (its manifest included): a file changed since
        # the cache was built rebuilds it, never reuses stale arrays
        recipe = {
            "dataset": name,
            "root": str(root),
            "files": self.fingerprint(),
            "version": self.version,
            "layout": 2,  # the cache holds each clip's content id
            **recipe,
        }
        lookup = {c: i for i, c in enumerate(classes)}

        def load() -> dict[str, Tensor]:
            stacked = stack_clips(root, rows, name, parts, hint)
            arrays = {m: to_tensor[m](a) for m, a in stacked.items()}
            arrays["targets"] = torch.tensor([lookup[r["label"]] for r in rows], dtype=torch.long)
            arrays["content_ids"] = content_ids(stacked)
            return arrays

        arrays, content = cached_arrays_and_hash(self.cache_dir, name, recipe, load)
        arrays = dict(arrays)
        targets = arrays.pop("targets")
        ids = arrays.pop("content_ids")
        index, note = split_indices(
            rows, targets, p.val_fraction, p.seed, title, self.test_fraction()
        )
        check_disjoint_splits(rows, index, ids, title)
        splits = {s: ClipDataset(arrays, targets, idx, normalise) for s, idx in index.items()}
        specs = {m: ModalitySpec(m, tuple(arrays[m].shape[1:]), encoders[m], {}) for m in parts}
        return DatasetBundle(
            name=name,
            task="classification",
            num_outputs=len(classes),
            modalities=specs,
            splits=splits,
            class_names=list(classes),
            notes=f"{title} prepared in {root} ({notes}); {note}",
            details={"fingerprint": content},
        )


class AudioVisualSource(ClipSource):
    """An audio + RGB-frames dataset prepared by :func:`prepare_av_clip` (CREMA-D, AVE,
    Kinetics-Sounds): one ResNet-18 per modality, frames normalised with ImageNet statistics."""

    Params: ClassVar[type] = AudioVisualParams
    PrepareParams: ClassVar[type | None] = AudioVisualPrepareParams
    #: Seconds of sound in the log-STFT recipe (the sound is tiled or cut to it).
    seconds: ClassVar[float] = 10.0

    @classmethod
    def av_job(
        cls,
        raw: Path,
        out: Path,
        params: AudioVisualPrepareParams,
        media: Callable[[str], tuple[Path | None, Path | None, Path | None]],
    ) -> Callable[[str], tuple[Any, ...]]:
        """A :attr:`Release.job` for :func:`prepare_av_clip`; ``media(clip)`` gives the clip's
        video, WAV file and frame folder (None where the release has none)."""
        return lambda c: (
            c,
            *media(c),
            out,
            params.image_size,
            params.fbank_frames,
            cls.seconds,
            raw,
        )

    def bundle(
        self, root: Path, rows: Sequence[dict[str, str]], classes: Sequence[str]
    ) -> DatasetBundle:
        p: AudioVisualParams = self.params
        return self.clip_bundle(
            root,
            rows,
            classes,
            parts=av_parts(p.audio, p.frames),
            normalise={"video": normalise_rgb},
            encoders={"audio": "resnet18", "video": "resnet18"},
            to_tensor=AV_TO_TENSOR,
            recipe={"audio": p.audio, "frames": p.frames},
            notes=f"audio {p.audio}, {p.frames} frame(s)",
        )
