"""CREMA-D and MOSI/MOSEI loaders on tiny fixtures written in the releases' own formats."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbalance.builder import build_dataset, resolve_config
from mmbalance.data.clips import AudioVisualPrepareParams
from mmbalance.data.cremad import CremadParams, CremadSource
from mmbalance.errors import DataError
from mmbalance.train import fit

av = pytest.importorskip("av")

EMOS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
FAST = {"train.epochs": 1, "train.progress": False, "train.tensorboard": False}
BAD_VIDEO = "1002_IEO_SAD_HI"
NO_AUDIO = "1003_IEO_HAP_MD"


def prep_params(workers: int = 1) -> AudioVisualPrepareParams:
    return AudioVisualPrepareParams(workers=workers, image_size=32, fbank_frames=64)


def write_wav(path: Path, freq: float, seconds: float = 0.6, sr: int = 16000) -> None:
    from scipy.io import wavfile

    t = np.arange(int(seconds * sr)) / sr
    wavfile.write(path, sr, (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16))


def write_video(path: Path, colour: tuple[int, int, int], seconds: int = 2, fps: int = 4) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flv" if path.suffix == ".flv" else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 48, 48, "yuv420p"
        for i in range(seconds * fps):
            img = np.zeros((48, 48, 3), dtype=np.uint8)
            img[:] = colour
            img[: 4 * (i + 1)] = 255  # changes with time, so frames differ
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def raw_cremad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 good clips per emotion (one in test.csv), a corrupt video and a clip without audio."""
    raw = tmp_path_factory.mktemp("cremad_raw")
    (raw / "AudioWAV").mkdir()
    (raw / "VideoFlash").mkdir()
    train, test = [], []
    for e, emo in enumerate(EMOS):
        for k in range(4):
            clip = f"10{k:02d}_DFA_{emo}_XX"
            write_wav(raw / "AudioWAV" / f"{clip}.wav", 200 + 150 * e + 10 * k)
            suffix = ".flv" if k % 2 else ".mp4"
            write_video(raw / "VideoFlash" / f"{clip}{suffix}", (40 * e, 255 - 40 * e, 60 * k))
            (test if k == 0 else train).append(f"{clip},{emo}")
    write_wav(raw / "AudioWAV" / f"{BAD_VIDEO}.wav", 300)
    (raw / "VideoFlash" / f"{BAD_VIDEO}.flv").write_bytes(b"FLV\x01garbage" * 50)
    write_video(raw / "VideoFlash" / f"{NO_AUDIO}.mp4", (1, 2, 3))
    (raw / "train.csv").write_text("\n".join(train) + "\n")
    (raw / "test.csv").write_text("\n".join(test) + "\n")
    return raw


@pytest.fixture(scope="module")
def prepared(raw_cremad: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cremad_prepared")
    report = CremadSource.prepare(raw_cremad, out, prep_params(workers=2), progress=False)
    return out, report


def test_prepare_writes_features_and_reports_bad_clips(prepared: tuple[Path, dict]) -> None:
    out, report = prepared
    assert report["prepared_now"] == 24 and report["in_manifest"] == 24
    reasons = {f["clip"]: f["reason"] for f in report["failed"]}
    assert set(reasons) == {BAD_VIDEO, NO_AUDIO}
    assert reasons[BAD_VIDEO].startswith(f"unreadable video VideoFlash/{BAD_VIDEO}.flv")
    assert reasons[NO_AUDIO] == f"missing audio file AudioWAV/{NO_AUDIO}.wav"
    assert json.loads((out / "prepare_report.json").read_text()) == report
    clip = "1001_DFA_ANG_XX"
    assert np.load(out / "audio_stft" / f"{clip}.npy").shape == (257, 188)
    assert np.load(out / "audio_fbank" / f"{clip}.npy").shape == (64, 128)
    frames = np.load(out / "frames" / f"{clip}.npy")
    assert frames.dtype == np.uint8 and frames.shape == (2, 32, 32, 3)  # 2 s at 1 fps
    assert not (out / "frames" / f"{BAD_VIDEO}.npy").exists()


def test_prepare_is_idempotent(raw_cremad: Path, prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    stamp = (out / "frames" / "1001_DFA_ANG_XX.npy").stat().st_mtime_ns
    again = CremadSource.prepare(raw_cremad, out, prep_params(), progress=False)
    assert again["prepared_now"] == 0 and again["already_prepared"] == 24
    assert [f["clip"] for f in again["failed"]] == [BAD_VIDEO, NO_AUDIO]
    assert (out / "frames" / "1001_DFA_ANG_XX.npy").stat().st_mtime_ns == stamp


def test_prepare_cli_on_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmbalance.cli import main

    (tmp_path / "raw").mkdir()
    rc = main(["prepare", "cremad", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds no AudioWAV/*.wav or VideoFlash" in err and err.count("\n") == 1


@pytest.mark.parametrize("audio, shape", [("stft", (1, 257, 188)), ("fbank", (1, 128, 64))])
def test_cremad_source_splits_and_shapes(prepared, audio: str, shape: tuple) -> None:
    out, _ = prepared
    cfg = resolve_config(
        {
            "dataset": "cremad",
            "dataset.root": str(out),
            "dataset.audio": audio,
            "dataset.val_fraction": 0.34,
            **FAST,
        }
    )
    bundle = build_dataset(cfg)
    assert bundle.modalities["audio"].shape == shape
    assert bundle.modalities["video"].shape == (3, 1, 32, 32)
    assert bundle.modalities["video"].encoder == "resnet18"
    sizes = {k: len(v) for k, v in bundle.splits.items()}
    assert sizes == {"train": 12, "val": 6, "test": 6}  # val: 1 of 3 train clips per class
    assert torch.equal(torch.bincount(bundle.splits["test"].targets), torch.ones(6).long())
    assert "validation" in bundle.notes and "seed 0" in bundle.notes


def manifest_rows(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_cremad_frames_stay_uint8_and_memory_mapped(prepared) -> None:
    """The splits are views of one uint8 frame array from the memory-mapped cache."""
    out, _ = prepared
    cache = Path(os.environ["MMBALANCE_CACHE"])
    params = CremadParams(root=str(out), frames=2, val_fraction=0.34)
    CremadSource(params, cache).build()  # builds the cache file
    bundle = CremadSource(params, cache).build()  # loads it
    video = bundle.splits["train"].arrays["video"]
    assert video.dtype == torch.uint8 and video.shape == (24, 3, 2, 32, 32)
    assert all(ds.arrays["video"] is video for ds in bundle.splits.values())
    maps = Path("/proc/self/maps").read_text()
    assert any(str(path) in maps for path in cache.glob("cremad-*.pt"))


def test_cremad_batches_are_the_prepared_files(raw_cremad: Path, prepared) -> None:
    """Every sample of every split is its clip's prepared arrays (audio as stored, frames at the
    segment centres, ImageNet-normalised), its label the emotion's index in EMOTIONS; the test
    split is test.csv's, validation one training clip per emotion."""
    out, _ = prepared
    cfg = resolve_config(
        {
            "dataset": "cremad",
            "dataset.root": str(out),
            "dataset.audio": "fbank",
            "dataset.frames": 1,
            "dataset.val_fraction": 0.34,
            **FAST,
        }
    )
    bundle = build_dataset(cfg)
    assert bundle.class_names == list(EMOS)
    rows = manifest_rows(out)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    clips_of = {}
    for split, ds in bundle.splits.items():
        batch = ds.__getitems__(list(range(len(ds))))
        clips_of[split] = [rows[i]["clip"] for i in ds.index.tolist()]
        for k, clip in enumerate(clips_of[split]):
            frames = np.load(out / "frames" / f"{clip}.npy")  # (2, 32, 32, 3): 2 s at 1 fps
            centre = torch.from_numpy(frames[1:2]).permute(3, 0, 1, 2).float()  # (2 * 0.5)
            assert torch.allclose(batch.inputs["video"][k], (centre / 255 - mean) / std)
            audio = np.load(out / "audio_fbank" / f"{clip}.npy").T
            assert torch.equal(batch.inputs["audio"][k], torch.from_numpy(audio)[None])
            assert int(batch.targets[k]) == EMOS.index(clip.split("_")[2])
    test_csv = {line.split(",")[0] for line in (raw_cremad / "test.csv").read_text().split()}
    assert set(clips_of["test"]) == test_csv
    assert not set(clips_of["val"]) & set(clips_of["train"])
    assert sorted(c.split("_")[2] for c in clips_of["val"]) == sorted(EMOS)


def copy_without_splits(out: Path, copy: Path, rows: int | None = None) -> Path:
    """A copy of the prepared directory whose first ``rows`` clips (all if None) have no split."""
    shutil.copytree(out, copy)
    header, *lines = (copy / "manifest.csv").read_text().splitlines()
    count = len(lines) if rows is None else rows
    lines = [line.rsplit(",", 1)[0] + "," for line in lines[:count]] + lines[count:]
    (copy / "manifest.csv").write_text("\n".join([header, *lines]) + "\n")
    return copy


def test_cremad_without_split_files_carves_train_val_test(prepared, tmp_path: Path) -> None:
    out, _ = prepared
    copy = copy_without_splits(out, tmp_path / "unsplit")
    cfg = resolve_config(
        {
            "dataset": "cremad",
            "dataset.root": str(copy),
            "dataset.val_fraction": 0.25,
            "dataset.test_fraction": 0.25,
            **FAST,
        }
    )
    bundle = build_dataset(cfg)
    # 4 clips per emotion: stratified cuts at round(4 * [0.5, 0.75]) = 2, 3
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        counts = torch.bincount(bundle.splits[split].targets, minlength=6)
        assert torch.equal(counts, torch.full((6,), per_class))
    assert "no train/test split files were prepared: stratified 0.50/0.25/0.25" in bundle.notes


def test_cremad_manifest_with_a_partial_split_is_refused(prepared, tmp_path: Path) -> None:
    copy = copy_without_splits(prepared[0], tmp_path / "partial", rows=1)
    cfg = resolve_config({"dataset": "cremad", "dataset.root": str(copy), **FAST})
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    assert "manifest gives no split for 1 of its 24 clips" in str(err.value)
    assert "\n" not in str(err.value)


def test_cremad_one_epoch_fit(prepared, tmp_path: Path) -> None:
    out, _ = prepared
    cfg = resolve_config(
        {
            "dataset": "cremad",
            "dataset.root": str(out),
            "dataset.frames": 2,
            "dataset.val_fraction": 0.34,
            "encoder.audio.width": 4,
            "encoder.video.width": 4,
            "train.batch_size": 8,
            **FAST,
        }
    )
    result = fit(cfg, tmp_path / "run")
    assert 0.0 <= result.metrics["test"]["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "does not exist; run `mmbalance prepare cremad"),
        (lambda d: d.mkdir(), "manifest.csv is missing (not a prepared directory)"),
        (
            lambda d: (d.mkdir(), (d / "manifest.csv").write_text("clip,label,split\n")),
            "lists no clips",
        ),
    ],
)
def test_cremad_source_errors(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "prepared"
    make(root)
    cfg = resolve_config({"dataset": "cremad", "dataset.root": str(root), **FAST})
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cremad_source_missing_feature_file(prepared, tmp_path: Path) -> None:
    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "audio_stft" / "1001_DFA_ANG_XX.npy").unlink()
    cfg = resolve_config({"dataset": "cremad", "dataset.root": str(copy), **FAST})
    with pytest.raises(DataError, match=r"1001_DFA_ANG_XX.npy is missing; re-run `mmbalance"):
        build_dataset(cfg)


def write_mosi_pickle(path: Path, dims=(20, 5, 300), n=(24, 8, 8), length=6) -> None:
    rng = np.random.default_rng(0)
    data = {}
    for split, count in zip(("train", "valid", "test"), n, strict=True):
        audio = rng.normal(size=(count, length, dims[1])).astype(np.float32)
        audio[0, 0, 0] = -np.inf
        audio[1, 1, 1] = np.nan
        data[split] = {
            "vision": rng.normal(size=(count, length, dims[0])).astype(np.float32),
            "audio": audio,
            "text": rng.normal(size=(count, length, dims[2])).astype(np.float32),
            "labels": rng.uniform(-3, 3, size=(count, 1, 1)).astype(np.float32),
            "id": np.array([[f"v{i}", "0"] for i in range(count)]),
        }
    path.write_bytes(pickle.dumps(data))


def test_mosi_loads_pickle_and_cleans_audio(tmp_path: Path) -> None:
    path = tmp_path / "mosi.pkl"
    write_mosi_pickle(path)
    bundle = build_dataset(resolve_config({"dataset": "mosi", "dataset.path": str(path), **FAST}))
    assert bundle.task == "regression" and bundle.num_outputs == 1
    assert list(bundle.modalities) == ["vision", "audio", "text"]
    assert bundle.modalities["audio"].shape == (6, 5)
    assert bundle.modalities["text"].encoder == "sequence_transformer"
    audio = bundle.splits["train"].inputs["audio"]
    assert torch.isfinite(audio).all() and audio[0, 0, 0] == 0 and audio[1, 1, 1] == 0
    assert bundle.splits["test"].targets.dtype == torch.float32
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 24, "val": 8, "test": 8}


def test_mosi_one_epoch_fit_and_vt_subset(tmp_path: Path) -> None:
    path = tmp_path / "mosi.pkl"
    write_mosi_pickle(path)
    cfg = resolve_config(
        {
            "dataset": "mosi",
            "dataset.path": str(path),
            "dataset.modalities": ["vision", "text"],
            "train.batch_size": 8,
            **FAST,
        }
    )
    result = fit(cfg, tmp_path / "run")
    assert "binary_accuracy" in result.metrics["test"]
    assert 0.0 <= result.metrics["test"]["binary_accuracy"] <= 1.0


def test_mosei_checks_feature_dims(tmp_path: Path) -> None:
    path = tmp_path / "mosi.pkl"
    write_mosi_pickle(path)  # MOSI dims given to mosei
    cfg = resolve_config({"dataset": "mosei", "dataset.path": str(path), **FAST})
    with pytest.raises(DataError, match=r"vision has shape \(24, 6, 20\), expected \(N, L, 35\)"):
        build_dataset(cfg)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist; set dataset.path"),
        (b"not a pickle at all", "is not a readable pickle"),
        (pickle.dumps({"train": {}, "valid": {}, "test": {}}), "split 'train' lacks the keys"),
        (pickle.dumps({"train": {}}), "lacks the splits ['valid', 'test']"),
        (pickle.dumps(Path("x")), "was not loaded: it asks for more than arrays (refusing"),
    ],
)
def test_mosi_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.pkl"
    if content is not None:
        path.write_bytes(content)
    cfg = resolve_config({"dataset": "mosi", "dataset.path": str(path), **FAST})
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
