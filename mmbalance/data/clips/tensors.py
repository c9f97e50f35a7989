"""From a prepared directory to tensors: the clips' arrays stacked (frames picked at segment
centres), the train/val/test split rule, the normalisation of frames, and
:class:`ClipDataset`, a split that gathers and normalises a batch at a time."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmbalance.data.base import (
    Batch,
    MultimodalTensorDataset,
    stratified_split,
)
from mmbalance.data.clips.decode import segment_centres
from mmbalance.data.clips.prepared import inside, load_npy
from mmbalance.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def split_indices(
    rows: Sequence[dict[str, str]],
    targets: Tensor,
    val_fraction: float,
    seed: int,
    title: str,
    test_fraction: float | None = None,
) -> tuple[dict[str, Tensor], str]:
    """Train/val/test indices from the manifest's ``split`` column, and a note saying how.

    ``train``/``val``/``test`` are taken as given. Without a ``val`` split (the community has
    none for several datasets), a stratified ``val_fraction`` of the training clips becomes the
    validation split, with ``seed``, so checkpoints are never selected on the test set. A
    manifest that gives no split at all (a release without split files) is split stratified
    into train/val/test with ``val_fraction`` and ``test_fraction``, where the dataset allows
    it. A manifest that gives a split for some clips only is refused, rather than guessed at.
    """
    given = [r["split"] for r in rows]
    bad = sorted(set(given) - {"train", "val", "test", ""})
    if bad:
        raise DataError(f"{title} manifest has unknown split names {bad}; re-prepare it")
    unsplit = [r["clip"] for r in rows if not r["split"]]
    if len(unsplit) == len(rows) and test_fraction is not None:
        v, t = val_fraction, test_fraction
        train, val, test = stratified_split(targets, [1 - v - t, v, t], seed)
        note = (
            f"no train/test split files were prepared: stratified {1 - v - t:.2f}/{v:.2f}/"
            f"{t:.2f} train/val/test split of all clips (seed {seed})"
        )
        return _nonempty({"train": train, "val": val, "test": test}, title), note
    if unsplit:
        raise DataError(
            f"{title} manifest gives no split for {len(unsplit)} of its {len(rows)} clips "
            f"(e.g. {unsplit[0]}); give every clip a split in the release's split files and "
            "re-prepare"
        )
    index = {s: torch.tensor([i for i, g in enumerate(given) if g == s]).long() for s in given}
    for s in ("train", "test"):
        if len(index.get(s, [])) == 0:
            raise DataError(f"{title} manifest needs clips in both the train and the test split")
    if len(index.get("val", [])):
        return index, "the official train/val/test split"
    train_all = index["train"]
    keep, val = stratified_split(targets[train_all], [1 - val_fraction, val_fraction], seed)
    index["train"], index["val"] = train_all[keep], train_all[val]
    note = (
        f"the given train/test split; validation = a stratified {val_fraction:.2f} of the "
        f"training clips (seed {seed}), since the community split has none"
    )
    return _nonempty(index, title), note


def _nonempty(index: dict[str, Tensor], title: str) -> dict[str, Tensor]:
    for split, rows in index.items():
        if len(rows) == 0:
            raise DataError(
                f"{title}: the {split} split gets no clip with these fractions; raise "
                "dataset.val_fraction (or dataset.test_fraction) or prepare more clips"
            )
    return index


def pick_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """``count`` frames at the centres of equal segments (the last frame repeats if short)."""
    return frames[segment_centres(len(frames), count)]


def frames_transform(count: int, channels: int) -> Callable[[np.ndarray], np.ndarray]:
    """Check a stored ``(T, H, W, C)`` uint8 clip and pick ``count`` frames from it."""

    def pick(v: np.ndarray) -> np.ndarray:
        if v.ndim != 4 or v.shape[-1] != channels or len(v) == 0:
            raise ValueError(f"shape {v.shape}, not (T, H, W, {channels})")
        return pick_frames(v, count)

    return pick


def stack_clips(
    root: Path,
    rows: Sequence[dict[str, str]],
    dataset: str,
    parts: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
    hint: str,
) -> dict[str, np.ndarray]:
    """For each part ``name -> (subdir, transform)``: the clips' transformed arrays, stacked.

    Per-clip files are read memory-mapped, so only the selected frames are paged in. Every file
    must resolve inside ``root`` (see :func:`inside`).
    """
    out: dict[str, np.ndarray] = {}
    for name, (subdir, transform) in parts.items():
        arrays = []
        for row in rows:
            path = inside(root, root / subdir / f"{row['clip']}.npy", hint)
            try:
                array = np.ascontiguousarray(transform(load_npy(path, dataset)))
            except (ValueError, IndexError) as err:
                raise DataError(f"{path} has an unexpected shape ({err}); re-prepare it") from None
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise DataError(
                    f"{path} holds NaN or infinite values; delete it and re-run "
                    f"`mmbalance prepare {dataset}` on this directory"
                )
            arrays.append(array)
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(
                f"{root / subdir} mixes array shapes {sorted(map(str, shapes))}; re-prepare it"
            )
        out[name] = np.stack(arrays)
    return out


def content_ids(stacked: Mapping[str, np.ndarray]) -> Tensor:
    """One 64-bit hash per clip of all its stacked arrays (equal ids: the same content)."""
    n = len(next(iter(stacked.values())))
    ids = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=8)
        for name in sorted(stacked):
            h.update(name.encode())
            h.update(np.ascontiguousarray(stacked[name][i]).tobytes())
        ids.append(int.from_bytes(h.digest(), "little", signed=True))
    return torch.tensor(ids, dtype=torch.int64)


def check_disjoint_splits(
    rows: Sequence[dict[str, str]],
    index: Mapping[str, Tensor],
    ids: Tensor | None,
    title: str,
) -> None:
    """Refuse, in one line with their count and an example, clips that sit in two splits: the
    same clip name (path), or the same content (``ids``, see :func:`content_ids``) under two
    names. A clip tested on must never have been trained on or selected with."""
    order = [s for s in ("train", "val", "test") if s in index]
    seen_name: dict[str, str] = {}
    seen_id: dict[int, tuple[str, str]] = {}
    by_name: list[tuple[str, str, str]] = []
    by_content: list[tuple[str, str, str, str]] = []
    for split in order:
        for i in index[split].tolist():
            clip = rows[i]["clip"]
            first = seen_name.setdefault(clip, split)
            if first != split:
                by_name.append((clip, first, split))
                continue
            if ids is None:
                continue
            other = seen_id.setdefault(int(ids[i]), (clip, split))
            if other[1] != split:
                by_content.append((other[0], other[1], clip, split))
    if by_name:
        clip, a, b = by_name[0]
        raise DataError(
            f"{title}: {len(by_name)} clip(s) are listed in two splits (e.g. {clip!r} in {a} "
            f"and {b}); give every clip one split in the manifest"
        )
    if by_content:
        c1, a, c2, b = by_content[0]
        raise DataError(
            f"{title}: {len(by_content)} clip(s) have the same content as a clip of another "
            f"split (e.g. {c2!r} in {b} and {c1!r} in {a}); remove the duplicates"
        )


def to_clip_tensor(frames: np.ndarray) -> Tensor:
    """Stacked ``(N, T, H, W, C)`` uint8 frames as the encoders' ``(N, C, T, H, W)``."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).contiguous()


def normalise_rgb(video: Tensor) -> Tensor:
    """uint8 ``(N, 3, T, H, W)`` frames to ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (video.float() / 255.0 - mean) / std


def normalise_flow(flow: Tensor) -> Tensor:
    """uint8 optical-flow JPEGs (128 = no motion) to float32 in about [-1, 1]."""
    return (flow.float() - 128.0) / 128.0


class ClipDataset(MultimodalTensorDataset):
    """One split of a prepared clip dataset, gathered and normalised a batch at a time.

    ``arrays`` are the whole dataset's stacked arrays as loaded from the cache (memory-mapped,
    frames as uint8), ``index`` the split's rows. Nothing is copied when the split is made: a
    batch gathers its rows and applies the per-modality ``normalise`` (uint8 frames to float),
    so a large dataset costs page cache, not a float32 copy of every frame. ``inputs`` still
    gives the split's normalised tensors for code that wants them whole.
    """

    def __init__(
        self,
        arrays: Mapping[str, Tensor],
        targets: Tensor,
        index: Tensor,
        normalise: Mapping[str, Callable[[Tensor], Tensor]],
    ) -> None:
        if len(index) == 0:
            raise DataError("dataset split is empty")
        self.arrays = dict(arrays)
        self.index = index.long()
        self.targets = targets[self.index]
        self.normalise = dict(normalise)

    @property
    def inputs(self) -> dict[str, Tensor]:  # type: ignore[override]
        return self._gather(self.index)

    def _gather(self, rows: Tensor) -> dict[str, Tensor]:
        out = {}
        for m, x in self.arrays.items():
            fn = self.normalise.get(m)
            out[m] = fn(x[rows]) if fn else x[rows]
        return out

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch(self._gather(self.index[idx]), self.targets[idx], idx)

    def subset(self, indices: Tensor) -> ClipDataset:
        return ClipDataset(self.arrays, _full_targets(self), self.index[indices], self.normalise)


def _full_targets(ds: ClipDataset) -> Tensor:
    n = int(next(iter(ds.arrays.values())).shape[0])
    full = torch.zeros(n, dtype=ds.targets.dtype)
    full[ds.index] = ds.targets
    return full


def av_parts(audio: str, frames: int) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """What the audio-visual sources stack: the chosen audio recipe and ``frames`` frames."""

    def audio_fn(a: np.ndarray) -> np.ndarray:
        if a.ndim != 2:
            raise ValueError(f"shape {a.shape}, not 2-D")
        return a if audio == "stft" else a.T  # fbank stored (T, F): use (F, T)

    return {"audio": (f"audio_{audio}", audio_fn), "video": ("frames", frames_transform(frames, 3))}


AV_TO_TENSOR: dict[str, Callable[[np.ndarray], Tensor]] = {
    "audio": lambda a: torch.from_numpy(a).unsqueeze(1).float(),
    "video": to_clip_tensor,
}
