"""``ucf101``: UCF-101 actions (101 classes), RGB + optical flow, official split 1.

Two steps, as for CREMA-D (see :mod:`mmbalance.data.clips`):

1. ``prepare`` (``mmbalance prepare ucf101 --raw DIR --out DIR``) reads:

   * ``ucfTrainTestlist/classInd.txt`` (``1 ApplyEyeMakeup``), ``trainlist01.txt``
     (``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``) and ``testlist01.txt`` (no label; the
     class is the folder); the three files may also lie directly in the raw directory;
   * RGB: the videos ``UCF-101/<Class>/<name>.avi``, or extracted frames ``rgb/<name>/*.jpg``
     (frames win when both exist);
   * optical flow as grey-scale JPEGs (TV-L1 releases): ``flow/u/<name>/*.jpg`` and
     ``flow/v/<name>/*.jpg``, or the same with ``x`` / ``y``.

   Per clip it writes ``rgb/<name>.npy`` ``(K, s, s, 3)`` and ``flow/<name>.npy``
   ``(K, s, s, 2)`` (uint8), K = ``clip_frames`` frames taken at the same relative positions
   (segment centres) of the RGB and the flow streams, so the two modalities stay aligned.
   Idempotent and resumable; unreadable videos and missing flow are skipped and reported.

2. The dataset source loads the prepared directory. Split 1 has no validation set: a stratified
   ``dataset.val_fraction`` of the training clips is carved out with ``dataset.seed`` (0), and
   the bundle's ``notes`` say so. RGB is ImageNet-normalised; flow is centred, ``(x - 128) / 128``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmbalance.config import check
from mmbalance.data import clips
from mmbalance.data.base import DATASETS, DatasetBundle, error_text
from mmbalance.errors import DataError
from mmbalance.io import read_text

NUM_CLASSES = 101
LIST_DIR = "ucfTrainTestlist"


def _find_list(raw: Path, name: str) -> Path | None:
    for path in (raw / LIST_DIR / name, raw / name):
        if path.exists():
            return path
    return None


def read_split_1(raw: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """The class names (by index) and ``clip -> (class, split)`` of split 1."""
    class_path = _find_list(raw, "classInd.txt")
    train_path, test_path = _find_list(raw, "trainlist01.txt"), _find_list(raw, "testlist01.txt")
    if class_path is None or train_path is None or test_path is None:
        raise DataError(
            f"{raw} holds no {LIST_DIR}/classInd.txt, trainlist01.txt and testlist01.txt; "
            "pass the UCF-101 directory that holds the split files"
        )
    indexed: dict[int, str] = {}
    for n, line in enumerate(read_text(class_path).splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise DataError(f"{class_path}:{n} is not '<index> <ClassName>'")
            indexed[int(parts[0])] = parts[1]
    classes = [indexed[k] for k in sorted(indexed)]
    listed: dict[str, tuple[str, str]] = {}
    for split, path in (("train", train_path), ("test", test_path)):
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            entry = line.split()[0]
            if "/" not in entry:
                raise DataError(f"{path}:{n} is not '<Class>/<name>.avi [label]'")
            cls, file = entry.split("/", 1)
            where = f"{path}:{n}"
            clips.check_clip_name(cls, where)
            clip = clips.check_clip_name(Path(clips.check_clip_name(file, where)).stem, where)
            listed.setdefault(clip, (cls, split))
    return classes, listed


def _flow_dirs(raw: Path, clip: str) -> tuple[Path, Path] | None:
    for a, b in (("u", "v"), ("x", "y")):
        dirs = (raw / "flow" / a / clip, raw / "flow" / b / clip)
        if all(d.is_dir() for d in dirs):
            return dirs
    return None


def _prepare_ucf_clip(
    clip: str,
    video: Path | None,
    rgb_dir: Path | None,
    flow: tuple[Path, Path],
    out: Path,
    size: int,
    count: int,
    raw: Path,
) -> clips.JobResult:
    """RGB and flow frames at the same ``count`` relative positions. Never raises."""
    torch.set_num_threads(1)
    try:
        if rgb_dir is not None:
            files = clips.image_files(rgb_dir)
            rgb = clips.read_images(
                [files[i] for i in clips.segment_centres(len(files), count)], size
            )
        else:
            rgb = clips.decode_frames_at(video, size, count)  # type: ignore[arg-type]
    except Exception as err:
        where = rgb_dir or video
        name = where.relative_to(raw) if where.is_relative_to(raw) else where.name  # type: ignore[union-attr]
        return clip, f"unreadable video {name}: {error_text(err)}"
    try:
        channels = []
        for folder in flow:
            files = clips.image_files(folder)
            picked = [files[i] for i in clips.segment_centres(len(files), count)] if files else []
            channels.append(clips.read_images(picked, size, mode="L"))
        flow_array = np.stack(channels, axis=-1)
    except Exception as err:
        return (
            clip,
            f"unreadable flow frames in {flow[0].relative_to(raw)}: {error_text(err)}",
        )
    rgb_path, flow_path = _outputs(out, clip)
    clips.save_npy(rgb_path, rgb)
    clips.save_npy(flow_path, flow_array)
    return clip, None


def _outputs(out: Path, clip: str) -> list[Path]:
    return [out / "rgb" / f"{clip}.npy", out / "flow" / f"{clip}.npy"]


@dataclass
class Ucf101PrepareParams(clips.ClipPrepareParams):
    """Options of preparing UCF-101: how many RGB and flow frames to keep per clip.

    Attributes:
        clip_frames: RGB and optical-flow frames stored per clip, at the same relative
            positions.
    """

    clip_frames: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            1 <= self.clip_frames <= 64,
            f"--clip-frames must be in [1, 64], got {self.clip_frames}",
        )


@DATASETS.register("ucf101")
class Ucf101Source(clips.ClipSource):
    Params = clips.ClipParams
    PrepareParams = Ucf101PrepareParams
    name = "ucf101"
    title = "UCF-101"
    raw_hint = "UCF101_DIR"
    description = (
        "UCF-101 actions (101), split 1: RGB + optical-flow frames, from `mmbalance prepare`"
    )
    # MCR's UCF ResNet run (Adam 1e-4, wd 1e-4, batch 32); the config file has the rest.
    train_defaults = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 32}

    @classmethod
    def find_clips(cls, raw: Path, out: Path, params: Ucf101PrepareParams) -> clips.Release:
        """The clips of split 1, each with RGB (video or frame folder) and u/v (or x/y) flow."""
        classes, listed = read_split_1(raw)
        if not listed:
            raise DataError(f"the UCF-101 split files in {raw} list no clips")
        videos = clips.index_files(raw / "UCF-101", clips.VIDEO_SUFFIXES)
        failed: dict[str, str] = {}
        flows: dict[str, tuple[Path, Path]] = {}
        rgb_dirs: dict[str, Path] = {}
        for clip, (cls_name, _) in listed.items():
            rgb_dir = raw / "rgb" / clip
            if rgb_dir.is_dir() and clips.image_files(rgb_dir):
                rgb_dirs[clip] = rgb_dir
            flow = _flow_dirs(raw, clip)
            if cls_name not in classes:
                failed[clip] = f"class {cls_name!r} is not in classInd.txt"
            elif clip not in rgb_dirs and clip not in videos:
                failed[clip] = (
                    f"missing RGB video UCF-101/{cls_name}/{clip}.avi (or frames rgb/{clip}/)"
                )
            elif flow is None:
                failed[clip] = f"missing optical flow flow/u/{clip}/ and flow/v/{clip}/"
            else:
                flows[clip] = flow
        return clips.Release(
            names=sorted(listed),
            failed=failed,
            label=lambda c: listed[c][0],
            split=lambda c: listed[c][1],
            job=lambda c: (
                c,
                videos.get(c),
                rgb_dirs.get(c),
                flows[c],
                out,
                params.image_size,
                params.clip_frames,
                raw,
            ),
            func=_prepare_ucf_clip,
            outputs=_outputs,
            classes=classes,
        )

    def bundle(
        self, root: Path, rows: Sequence[dict[str, str]], classes: Sequence[str]
    ) -> DatasetBundle:
        """RGB ImageNet-normalised, flow centred; ``dataset.frames`` of each."""
        p: clips.ClipParams = self.params
        return self.clip_bundle(
            root,
            rows,
            classes,
            parts={
                "rgb": ("rgb", clips.frames_transform(p.frames, 3)),
                "flow": ("flow", clips.frames_transform(p.frames, 2)),
            },
            normalise={"rgb": clips.normalise_rgb, "flow": clips.normalise_flow},
            encoders={"rgb": "resnet18", "flow": "resnet18"},
            to_tensor={"rgb": clips.to_clip_tensor, "flow": clips.to_clip_tensor},
            recipe={"frames": p.frames},
            notes=f"split 1, {p.frames} RGB and flow frame(s)",
        )
