"""AVE, Kinetics-Sounds and UCF-101 on tiny fixtures written in the releases' own layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbalance.builder import build_dataset, resolve_config
from mmbalance.data.ave import AveSource
from mmbalance.data.clips import AudioVisualPrepareParams
from mmbalance.data.kinetics_sounds import KineticsSoundsSource
from mmbalance.data.ucf101 import Ucf101PrepareParams, Ucf101Source
from mmbalance.errors import DataError
from mmbalance.train import fit

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

FAST = {"train.epochs": 1, "train.progress": False, "train.tensorboard": False}
SIZE = 32


def av_params() -> AudioVisualPrepareParams:
    return AudioVisualPrepareParams(image_size=SIZE, fbank_frames=64)


def tiny_model(m1: str, m2: str) -> dict:
    return {f"encoder.{m1}.width": 4, f"encoder.{m2}.width": 4, "train.batch_size": 4}


def write_wav(path: Path, freq: float, seconds: float = 0.5, sr: int = 16000) -> None:
    from scipy.io import wavfile

    t = np.arange(int(seconds * sr)) / sr
    wavfile.write(path, sr, (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16))


def write_video(
    path: Path, colour: tuple[int, int, int], freq: float | None, seconds: int = 2, fps: int = 4
) -> None:
    """An mpeg4 video (48 x 48, changing with time), with an AAC sine track unless ``freq`` is None."""
    sr = 16000
    with av.open(str(path), "w", format="mp4" if path.suffix == ".mp4" else None) as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = 48, 48, "yuv420p"
        audio = None
        if freq is not None:
            audio = container.add_stream("aac", rate=sr)
            audio.layout = "mono"
        for i in range(seconds * fps):
            img = np.zeros((48, 48, 3), dtype=np.uint8)
            img[:] = colour
            img[: 4 * (i + 1)] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            t = np.arange(seconds * sr) / sr
            wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
            for k in range(0, len(wave), 1024):
                frame = av.AudioFrame.from_ndarray(wave[None, k : k + 1024], "flt", "mono")
                frame.sample_rate, frame.pts = sr, k
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)


def write_frames(folder: Path, count: int, value: int, mode: str = "RGB", prefix: str = "") -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        shape = (24, 24, 3) if mode == "RGB" else (24, 24)
        img = np.full(shape, (value + 20 * i) % 256, dtype=np.uint8)
        Image.fromarray(img, mode).save(folder / f"{prefix}{i + 1:05d}.jpg")


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from mmbalance.cli import main

    rc = main(args)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- AVE

AVE_CLASSES = ("Church bell", "Male speech, man speaking", "Bark")


@pytest.fixture(scope="module")
def ave_prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """3 classes x (2 train, 1 val, 1 test), a corrupt video, a silent one and a missing one."""
    raw = tmp_path_factory.mktemp("ave_raw")
    (raw / "AVE").mkdir()
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, cls in enumerate(AVE_CLASSES):
        for k, split in enumerate(("train", "train", "val", "test")):
            vid = f"vid{c}{k}XYZ"
            write_video(raw / "AVE" / f"{vid}.mp4", (60 * c, 200, 50 * k), 300 + 200 * c)
            lines[split].append(f"{cls}&{vid}&good&0&10")
    (raw / "AVE" / "corruptVID.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42garbage" * 40)
    write_video(raw / "AVE" / "silentVID.mp4", (1, 2, 3), None)
    lines["train"] += [
        "Bark&corruptVID&good&0&10",
        "Bark&silentVID&good&2&5",
        "Bark&goneVID&bad&0&1",
    ]
    header = "Category&VideoID&Quality&StartTime&EndTime\n"
    for split, name in (("train", "trainSet"), ("val", "valSet"), ("test", "testSet")):
        (raw / f"{name}.txt").write_text(header + "\n".join(lines[split]) + "\n")
    out = tmp_path_factory.mktemp("ave_prepared")
    report = AveSource.prepare(raw, out, av_params(), progress=False)
    return raw, out, report


def test_ave_prepare_writes_features_and_reports_bad_clips(ave_prepared) -> None:
    _, out, report = ave_prepared
    assert report["in_manifest"] == 12 and report["prepared_now"] == 12
    reasons = {f["clip"]: f["reason"] for f in report["failed"]}
    assert reasons["corruptVID"].startswith("unreadable audio in AVE/corruptVID.mp4: ")
    assert reasons["silentVID"] == "unreadable audio in AVE/silentVID.mp4: no audio stream"
    assert reasons["goneVID"] == "missing video file AVE/goneVID.mp4"
    assert json.loads((out / "prepare_report.json").read_text()) == report
    assert np.load(out / "audio_stft" / "vid00XYZ.npy").shape == (257, 625)  # 10 s at 22.05 kHz
    assert np.load(out / "audio_fbank" / "vid00XYZ.npy").shape == (64, 128)
    assert np.load(out / "frames" / "vid00XYZ.npy").shape == (2, SIZE, SIZE, 3)  # 1 fps


def test_ave_prepare_is_idempotent(ave_prepared) -> None:
    raw, out, _ = ave_prepared
    stamp = (out / "frames" / "vid00XYZ.npy").stat().st_mtime_ns
    again = AveSource.prepare(raw, out, av_params(), progress=False)
    assert again["prepared_now"] == 0 and again["already_prepared"] == 12
    assert (out / "frames" / "vid00XYZ.npy").stat().st_mtime_ns == stamp


def test_ave_loads_official_split_and_trains(ave_prepared, tmp_path: Path) -> None:
    _, out, _ = ave_prepared
    overrides = {"dataset": "ave", "dataset.root": str(out), "dataset.audio": "fbank"}
    cfg = resolve_config({**overrides, "dataset.frames": 2, **tiny_model("audio", "video"), **FAST})
    bundle = build_dataset(cfg)
    assert bundle.num_outputs == 28 and bundle.class_names[1] == "Male speech, man speaking"
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert "official train/val/test split" in bundle.notes
    assert bundle.modalities["audio"].shape == (1, 128, 64)
    assert bundle.modalities["video"].shape == (3, 2, SIZE, SIZE)
    batch = bundle.splits["train"].__getitems__([0, 1])
    assert batch.inputs["video"].dtype == torch.float32 and batch.inputs["audio"].shape[0] == 2
    result = fit(cfg, tmp_path / "run")
    assert 0.0 <= result.metrics["test"]["accuracy"] <= 1.0


# --------------------------------------------------------------------------- Kinetics-Sounds


@pytest.fixture(scope="module")
def ks_prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """3 labels x 4 clips: videos in per-split folders, or extracted wav + 1-fps frame folders."""
    raw = tmp_path_factory.mktemp("ks_raw")
    train, test = [], []
    for label in (0, 7, 30):
        for k in range(4):
            clip = f"yt{label:02d}_{k}"
            split = "test" if k == 3 else "train"
            if k % 2:
                (raw / "videos" / split).mkdir(parents=True, exist_ok=True)
                write_video(raw / "videos" / split / f"{clip}.mp4", (8 * label, 90, 60 * k), 500)
            else:
                (raw / "audio").mkdir(exist_ok=True)
                write_wav(raw / "audio" / f"{clip}.wav", 200 + 20 * label + 5 * k)
                write_frames(raw / "frames" / clip, 3, 8 * label + k, prefix="frame_")
            (test if split == "test" else train).append(f"{clip} 0 10 {label}")
    (raw / "videos" / "train" / "broken_1.mp4").write_bytes(b"not a video at all" * 30)
    write_frames(raw / "frames" / "noaudio_1", 3, 9)
    train += ["broken_1 30", "noaudio_1 7"]
    (raw / "my_train.txt").write_text("\n".join(train) + "\n")
    (raw / "my_test.txt").write_text("\n".join(test) + "\n")
    out = tmp_path_factory.mktemp("ks_prepared")
    report = KineticsSoundsSource.prepare(raw, out, av_params(), progress=False)
    return raw, out, report


def test_ks_prepare_reads_lists_and_both_media(ks_prepared) -> None:
    _, out, report = ks_prepared
    assert report["in_manifest"] == 12 and report["classes"] == 31
    reasons = {f["clip"]: f["reason"] for f in report["failed"]}
    assert reasons["broken_1"].startswith("unreadable audio in videos/train/broken_1.mp4: ")
    assert reasons["noaudio_1"].startswith("missing audio file audio/noaudio_1.wav")
    assert np.load(out / "frames" / "yt07_0.npy").shape == (3, SIZE, SIZE, 3)  # frame folder
    assert np.load(out / "frames" / "yt07_1.npy").shape == (2, SIZE, SIZE, 3)  # video, 1 fps


def test_ks_carves_validation_and_trains(ks_prepared, tmp_path: Path) -> None:
    _, out, _ = ks_prepared
    cfg = resolve_config(
        {
            "dataset": "kinetics_sounds",
            "dataset.root": str(out),
            "dataset.val_fraction": 0.34,
            "dataset.frames": 2,
            **tiny_model("audio", "video"),
            **FAST,
        }
    )
    bundle = build_dataset(cfg)
    assert bundle.num_outputs == 31 and bundle.modalities["audio"].shape == (1, 128, 64)
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert "validation = a stratified 0.34 of the training clips (seed 0)" in bundle.notes
    assert torch.equal(bundle.splits["val"].targets.sort().values, torch.tensor([0, 7, 30]))
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == 5e-5
    result = fit(cfg, tmp_path / "run")
    assert 0.0 <= result.metrics["test"]["accuracy"] <= 1.0


def test_ks_per_split_class_folders(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for split, cls in (("train", "playing drums"), ("test", "singing")):
        (raw / "videos" / split / cls).mkdir(parents=True)
        write_video(raw / "videos" / split / cls / f"{split}_clip.mp4", (9, 9, 9), 400, seconds=1)
    params = AudioVisualPrepareParams(image_size=SIZE, fbank_frames=32)
    report = KineticsSoundsSource.prepare(raw, tmp_path / "out", params, progress=False)
    assert report["in_manifest"] == 2 and report["failed"] == [] and report["classes"] == 2
    manifest = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert manifest[1:] == ["test_clip,singing,test", "train_clip,playing drums,train"]


# --------------------------------------------------------------------------- UCF-101

UCF_CLASSES = ("ApplyEyeMakeup", "Basketball", "YoYo")


@pytest.fixture(scope="module")
def ucf_prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """3 classes x (3 train, 1 test): RGB as .avi videos or frame folders, u/v or x/y flow."""
    raw = tmp_path_factory.mktemp("ucf_raw")
    lists = raw / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text(
        "".join(
            f"{i} {c}\n" for i, c in enumerate(["ApplyEyeMakeup", "Archery", *UCF_CLASSES[1:]], 1)
        )
    )
    train, test = [], []
    for c, cls in enumerate(UCF_CLASSES):
        (raw / "UCF-101" / cls).mkdir(parents=True)
        for g in range(4):
            name = f"v_{cls}_g{g + 1:02d}_c01"
            if g % 2:
                write_video(raw / "UCF-101" / cls / f"{name}.avi", (70 * c, 30 * g, 99), None)
            else:
                write_frames(raw / "rgb" / name, 5, 70 * c + g)
            a, b = ("u", "v") if c != 1 else ("x", "y")
            write_frames(raw / "flow" / a / name, 4, 100 + 10 * c, mode="L", prefix="frame")
            write_frames(raw / "flow" / b / name, 4, 140 - 10 * c, mode="L", prefix="frame")
            if g == 3:
                test.append(f"{cls}/{name}.avi")
            else:
                train.append(f"{cls}/{name}.avi {[1, 3, 4][c]}")
    (raw / "UCF-101" / "YoYo" / "v_YoYo_g09_c01.avi").write_bytes(b"RIFF....AVI garbage" * 40)
    write_frames(raw / "flow" / "u" / "v_YoYo_g09_c01", 2, 1, mode="L")
    write_frames(raw / "flow" / "v" / "v_YoYo_g09_c01", 2, 1, mode="L")
    write_video(raw / "UCF-101" / "YoYo" / "v_YoYo_g10_c01.avi", (5, 5, 5), None, seconds=1)
    train += ["YoYo/v_YoYo_g09_c01.avi 4", "YoYo/v_YoYo_g10_c01.avi 4"]
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    out = tmp_path_factory.mktemp("ucf_prepared")
    params = Ucf101PrepareParams(image_size=SIZE, clip_frames=4)
    report = Ucf101Source.prepare(raw, out, params, progress=False)
    return raw, out, report


def test_ucf_prepare_aligns_rgb_and_flow(ucf_prepared) -> None:
    _, out, report = ucf_prepared
    assert report["in_manifest"] == 12 and report["classes"] == 4
    reasons = {f["clip"]: f["reason"] for f in report["failed"]}
    assert reasons["v_YoYo_g09_c01"].startswith("unreadable video UCF-101/YoYo/v_YoYo_g09_c01.avi")
    assert reasons["v_YoYo_g10_c01"] == (
        "missing optical flow flow/u/v_YoYo_g10_c01/ and flow/v/v_YoYo_g10_c01/"
    )
    assert np.load(out / "rgb" / "v_YoYo_g01_c01.npy").shape == (4, SIZE, SIZE, 3)
    assert np.load(out / "rgb" / "v_YoYo_g02_c01.npy").shape == (4, SIZE, SIZE, 3)  # from .avi
    flow = np.load(out / "flow" / "v_Basketball_g01_c01.npy")  # x/y layout
    assert flow.shape == (4, SIZE, SIZE, 2) and flow.dtype == np.uint8


def test_ucf_loads_rgb_flow_and_trains(ucf_prepared, tmp_path: Path) -> None:
    _, out, _ = ucf_prepared
    cfg = resolve_config(
        {
            "dataset": "ucf101",
            "dataset.root": str(out),
            "dataset.frames": 2,
            "dataset.val_fraction": 0.34,
            **tiny_model("rgb", "flow"),
            **FAST,
        }
    )
    bundle = build_dataset(cfg)
    assert list(bundle.modalities) == ["rgb", "flow"]
    assert bundle.modalities["flow"].shape == (2, 2, SIZE, SIZE)
    assert bundle.class_names == ["ApplyEyeMakeup", "Archery", "Basketball", "YoYo"]
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert "since the community split has none" in bundle.notes
    flow = bundle.splits["test"].inputs["flow"]
    assert flow.dtype == torch.float32 and -1.0 <= flow.min() and flow.max() <= 1.0
    result = fit(cfg, tmp_path / "run")
    assert 0.0 <= result.metrics["test"]["accuracy"] <= 1.0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("ave", "holds no trainSet.txt, valSet.txt or testSet.txt"),
        ("kinetics_sounds", "holds no split lists (train.txt/test.txt"),
        ("ucf101", "holds no ucfTrainTestlist/classInd.txt, trainlist01.txt and testlist01.txt"),
    ],
)
def test_prepare_cli_on_empty_directory(
    dataset: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "raw").mkdir()
    rc, err = run_cli(
        ["prepare", dataset, "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 2 and message in err and err.count("\n") == 1


def test_prepare_cli_runs_and_reports(ave_prepared, capsys: pytest.CaptureFixture) -> None:
    from mmbalance.cli import main

    raw, out, _ = ave_prepared
    rc = main(["prepare", "ave", "--raw", str(raw), "--out", str(out), "--image-size", str(SIZE),
               "--fbank-frames", "64", "--no-progress"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "12 already prepared" in text and "skipped goneVID" in text


@pytest.mark.parametrize("dataset", ["ave", "kinetics_sounds", "ucf101"])
def test_sources_on_unprepared_directory(dataset: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = resolve_config({"dataset": dataset, "dataset.root": str(tmp_path / "empty"), **FAST})
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    assert "manifest.csv is missing (not a prepared directory)" in str(err.value)
    assert f"mmbalance prepare {dataset}" in str(err.value) and "\n" not in str(err.value)
