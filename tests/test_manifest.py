"""The ``manifest`` dataset on a small table of generated images and espeak-ng speech: it
trains, caches its decoding, keeps every path inside the table's directory and reports an
undecodable file with its row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FEATURES_TINY

from mmbalance.builder import build_dataset, resolve_config
from mmbalance.cli import main

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None and shutil.which("espeak") is None,
    reason="espeak-ng is not installed (scripts/install.sh installs it)",
)

WORDS = ("red", "blue")
#: Small ResNets, so that a run takes a second.
SMALL = ["encoder.image.width=4", "encoder.speech.width=4", *FEATURES_TINY]


def make_table(root: Path, per_class: int = 8) -> Path:
    """``root/table.csv``: a coloured square image and the spoken colour name per row."""
    from PIL import Image
    from scipy.io import wavfile

    from mmbalance.data.speech import Utterance, synthesize_one

    (root / "images").mkdir(parents=True)
    (root / "speech").mkdir()
    rng = np.random.default_rng(0)
    lines = ["image,speech,label"]
    for k, word in enumerate(WORDS):
        wave, sr = synthesize_one(Utterance(word, "en", 160, 50))
        for i in range(per_class):
            pixels = rng.integers(0, 60, (24, 24, 3)).astype(np.uint8)
            pixels[4:20, 4:20, 2 * k] = 200 + rng.integers(0, 50)
            Image.fromarray(pixels).save(root / "images" / f"{word}{i}.png")
            noisy = wave + rng.normal(0, 0.01, wave.shape).astype(np.float32)
            wavfile.write(root / "speech" / f"{word}{i}.wav", sr, noisy)
            lines.append(f"images/{word}{i}.png,speech/{word}{i}.wav,{word}")
    table = root / "table.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def test_a_table_of_images_and_speech_trains_and_is_cached(tmp_path: Path, monkeypatch) -> None:
    table = make_table(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "manifest", f"dataset.path={table}", "dataset.image_size=16",
            "dataset.fbank_frames=64", "--out", str(out), *SMALL]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "data.json").read_text())
    assert record["class_names"] == ["blue", "red"]
    assert record["kinds"] == {"image": "image", "speech": "audio"}
    assert record["modalities"]["image"]["shape"] == [3, 16, 16]
    assert record["modalities"]["speech"]["shape"] == [1, 128, 64]
    assert sum(record["sizes"].values()) == 16 and record["skipped_rows"] == []
    # the decoded images are the files' pixels, ImageNet-normalised
    cfg = resolve_config(
        {"dataset": "manifest", "dataset.path": str(table), "dataset.image_size": 16,
         "dataset.fbank_frames": 64}
    )  # fmt: skip
    import mmbalance.builder.assemble
    from mmbalance.data import manifest

    mmbalance.builder.assemble._DATASET_CACHE.clear()

    def never(*args: object) -> None:
        raise AssertionError("decoded again instead of read from the cache")

    monkeypatch.setattr(manifest, "_decode", never)
    data = build_dataset(cfg)
    from PIL import Image

    first = np.asarray(
        Image.open(table.parent / "images" / "red0.png").convert("RGB").resize((16, 16))
    )
    expected = (first / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    images = np.concatenate([d.inputs["image"].numpy() for d in data.splits.values()])
    assert min(np.abs(x.transpose(1, 2, 0) - expected).max() for x in images) < 1e-5


def test_paths_outside_the_table_s_directory_are_refused(
    capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # a default run directory (runs/...) lands in tmp_path
    table = make_table(tmp_path / "data", per_class=6)
    outside = tmp_path / "secret.png"
    shutil.copy(table.parent / "images" / "red0.png", outside)
    (table.parent / "images" / "link.png").symlink_to(outside)
    for bad in ("../secret.png", "images/link.png", str(outside)):
        lines = table.read_text().splitlines()
        cells = lines[3].split(",")
        lines[3] = ",".join([bad, *cells[1:]])
        broken = table.parent / "broken.csv"
        broken.write_text("\n".join(lines) + "\n")
        assert main(["train", "--dataset", "manifest", f"dataset.path={broken}", *SMALL]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"broken.csv:4 (column image): {bad!r}" in err, err
        assert "outside the table's directory" in err or "not a relative path" in err, err


def test_an_undecodable_file_is_reported_with_its_row_or_skipped(capsys, tmp_path: Path) -> None:
    table = make_table(tmp_path / "data", per_class=7)
    (table.parent / "speech" / "blue3.wav").write_bytes(b"RIFF not really a wav")
    argv = ["train", "--dataset", "manifest", f"dataset.path={table}", "dataset.image_size=16",
            "dataset.fbank_frames=64", *SMALL]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "stopped")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err
        and "table.csv:12 (column speech): 'speech/blue3.wav' cannot be decoded" in err
    )
    assert "dataset.skip_bad=true" in err
    out = tmp_path / "skipped"
    assert main([*argv, "dataset.skip_bad=true", "--out", str(out)]) == 0
    record = json.loads((out / "data.json").read_text())
    assert record["skipped_rows"] == [12] and sum(record["sizes"].values()) == 13
    assert "1 row(s) skipped" in record["notes"]


def test_the_fingerprint_changes_with_a_file(tmp_path: Path) -> None:
    import os

    from mmbalance.config import build_dataclass
    from mmbalance.data.manifest import ManifestParams, ManifestSource

    table = make_table(tmp_path / "data", per_class=6)
    params = build_dataclass(ManifestParams, {"path": str(table)}, "dataset.manifest")
    before = ManifestSource(params, tmp_path).fingerprint()
    image = table.parent / "images" / "red0.png"
    stat = image.stat()
    image.write_bytes(image.read_bytes() + b"\0")
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert ManifestSource(params, tmp_path).fingerprint() not in (None, before)


def test_a_video_column_gives_sampled_frames(tmp_path: Path) -> None:
    import av

    table = make_table(tmp_path / "data", per_class=6)
    (table.parent / "clips").mkdir()
    lines = table.read_text().splitlines()
    out_lines = [lines[0] + ",clip"]
    for n, line in enumerate(lines[1:]):
        name = f"clips/c{n}.mp4"
        with av.open(str(table.parent / name), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for i in range(6):  # a grey level that rises frame by frame
                frame = np.full((32, 32, 3), 40 * i, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out_lines.append(f"{line},{name}")
    table.write_text("\n".join(out_lines) + "\n")
    cfg = resolve_config(
        {"dataset": "manifest", "dataset.path": str(table), "dataset.image_size": 16,
         "dataset.fbank_frames": 32, "dataset.frames": 3}
    )  # fmt: skip
    data = build_dataset(cfg)
    assert data.details["kinds"]["clip"] == "video"
    clip = data.splits["train"].inputs["clip"]
    assert tuple(clip.shape[1:]) == (3, 3, 16, 16)
    brightness = clip[:, 0].mean(dim=(0, 2, 3))  # per sampled frame: rising over time
    assert bool((brightness[1:] > brightness[:-1]).all())
