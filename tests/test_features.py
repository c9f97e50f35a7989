"""The ``features`` dataset: files round-trip to what the model sees, the split is stratified
and shared by every run, labels are mapped and named, and every bad file is one line."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FEATURES_TINY as TINY
from conftest import feature_arrays

from mmbalance.builder import build_dataset, resolve_config
from mmbalance.cli import main


def save(arrays: dict[str, np.ndarray], path: Path, fmt: str) -> Path:
    if fmt == "npz":
        np.savez(path.with_suffix(".npz"), **arrays)
        return path.with_suffix(".npz")
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        target = path.with_suffix(".safetensors")
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(target))
        return target
    path.mkdir()
    for key, value in arrays.items():
        np.save(path / f"{key}.npy", value)
    return path


def _bundle(path: Path, *extra: str):
    from mmbalance.config import parse_overrides

    return build_dataset(
        resolve_config({"dataset": "features", "dataset.path": str(path), **parse_overrides(extra)})
    )


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "npy"])
def test_each_format_round_trips_after_the_recorded_standardisation(
    tmp_path: Path, fmt: str
) -> None:
    arrays = feature_arrays()
    data = _bundle(save(arrays, tmp_path / "feats", fmt))
    record = json.loads(json.dumps(data.record()))  # what data.json holds
    std = record["standardization"]
    assert set(std) == {"image"}  # vectors only by default: the sequence is left as it is
    # the training statistics, recomputed here from the training rows found below
    expected = {
        "image": (arrays["image"] - np.array(std["image"]["mean"], np.float32))
        / np.array(std["image"]["std"], np.float32),
        "audio": arrays["audio"],
    }
    row_of = {expected["image"][i].tobytes(): i for i in range(len(arrays["y"]))}
    found: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        ds = data.splits[split]
        rows = np.array([row_of[x.numpy().tobytes()] for x in ds.inputs["image"]])
        assert np.array_equal(ds.inputs["audio"].numpy(), expected["audio"][rows])
        mapped = {3: 0, 7: 1, 9: 2}
        assert ds.targets.tolist() == [mapped[v] for v in arrays["y"][rows]]
        found[split] = rows
    train = arrays["image"][found["train"]].astype(np.float64)
    assert np.allclose(std["image"]["mean"], train.mean(0), atol=1e-5)
    assert np.allclose(std["image"]["std"], train.std(0), atol=1e-5)
    assert sorted(np.concatenate(list(found.values())).tolist()) == list(range(120))
    from mmbalance.data.features import split_sha256

    assert record["split"]["sha256"] == split_sha256(found)
    assert record["class_names"] == ["3", "7", "9"]
    assert [r["value"] for r in record["labels"]] == [3, 7, 9]


def test_the_model_is_fed_the_standardised_rows(tmp_path: Path, monkeypatch) -> None:
    import mmbalance.eval.robustness as robustness
    from mmbalance.models.encoders import MLPEncoder

    arrays = feature_arrays()
    path = save(arrays, tmp_path / "feats", "npz")
    seen: list[torch.Tensor] = []
    original = MLPEncoder.forward

    def spy(self: Any, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return original(self, x)

    # the end-of-run robustness metrics feed Gaussian noise in place of a modality: those rows
    # are the noise's, not data
    noise: set[bytes] = set()
    sample_noise = robustness.sample_noise

    def recorded_noise(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = sample_noise(*args, **kwargs)
        noise.update(r.numpy().tobytes() for r in out)
        return out

    monkeypatch.setattr(robustness, "sample_noise", recorded_noise)
    MLPEncoder.forward = spy  # type: ignore[method-assign]
    try:
        assert main(["train", "--dataset", "features", f"dataset.path={path}", "--out",
                     str(tmp_path / "run"), *TINY]) == 0  # fmt: skip
    finally:
        MLPEncoder.forward = original  # type: ignore[method-assign]
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    std = record["standardization"]["image"]
    expected = (arrays["image"] - np.float32(std["mean"])) / np.float32(std["std"])
    rows = {r.tobytes() for r in expected}
    fed = [r.tobytes() for r in torch.cat(seen).numpy()]
    data = [r for r in fed if r not in noise]
    assert len(data) >= 120 and all(r in rows for r in data)


def test_the_split_is_stratified_and_the_same_for_every_method_and_seed(tmp_path: Path) -> None:
    arrays = feature_arrays(n=200)
    path = save(arrays, tmp_path / "feats", "npz")
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", "features", f"dataset.path={path}", "--methods",
            "joint,multiloss", "--seeds", "2", "--out", str(out), *TINY]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed*/data.json"))]
    assert len(records) == 4
    assert len({r["split"]["sha256"] for r in records}) == 1
    counts = records[0]["split"]["class_counts"]
    totals = np.bincount(np.unique(arrays["y"], return_inverse=True)[1])
    for split, fraction in (("val", 0.15), ("test", 0.15), ("train", 0.7)):
        for c, total in enumerate(totals):
            assert abs(counts[split][c] - fraction * total) <= 1, (split, c)
    report = (out / "report.md").read_text()
    assert "Every run trained on the same split" in report


def test_text_labels_and_y_names_are_mapped_and_reach_the_report(tmp_path: Path) -> None:
    arrays = feature_arrays()
    words = {3: "cat", 7: "dog", 9: "bird"}
    named = {**arrays, "y": np.array([words[v] for v in arrays["y"]])}
    data = _bundle(save(named, tmp_path / "text", "npz"))
    assert data.class_names == ["bird", "cat", "dog"]  # text labels sort alphabetically
    counts = data.record()["split"]["class_counts"]
    per_class = np.sum([counts[s] for s in ("train", "val", "test")], axis=0).tolist()
    assert per_class == [int((named["y"] == w).sum()) for w in ("bird", "cat", "dog")]
    names = np.array([""] * 10, dtype="<U8")
    for value, word in words.items():
        names[value] = word
    coded = save({**arrays, "y_names": names}, tmp_path / "coded", "npy")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "features", f"dataset.path={coded}", "--out",
                 str(out), *TINY]) == 0  # fmt: skip
    record = json.loads((out / "data.json").read_text())
    assert [(r["value"], r["name"]) for r in record["labels"]] == [
        (3, "cat"),
        (7, "dog"),
        (9, "bird"),
    ]
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    for i, word in enumerate(["cat", "dog", "bird"]):
        assert f"| {i} | {word} |" in report


def test_floats_are_regression_and_masks_mark_missing_samples(tmp_path: Path) -> None:
    arrays = feature_arrays()
    rng = np.random.default_rng(1)
    missing = rng.random(120) < 0.2
    image = arrays["image"].copy()
    image[missing] = np.nan  # ignored where the modality is missing
    target = arrays["image"][:, 0] * 0.5 + 0.25
    data = _bundle(
        save(
            {**arrays, "image": image, "mask_image": missing, "y": target},
            tmp_path / "reg",
            "npz",
        )
    )
    assert data.task == "regression" and data.num_outputs == 1
    record = data.record()
    assert record["missing"] == {"audio": 0, "image": int(missing.sum())}
    for split in ("train", "val", "test"):
        x = data.splits[split].inputs["image"]
        assert torch.isfinite(x).all()
    zero_rows = sum(int((d.inputs["image"] == 0).all(1).sum()) for d in data.splits.values())
    assert zero_rows == int(missing.sum())


def _evil_object_array(marker: Path) -> np.ndarray:
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    out = np.empty(3, dtype=object)
    out[:] = [Evil(), Evil(), Evil()]
    return out


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a = feature_arrays(n=60)
    marker = tmp_path / "unpickled"
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "lengths": ({**a, "audio": a["audio"][:50]}, "the arrays have different lengths"),
        "nan": (
            {**a, "image": np.where(np.arange(60)[:, None] == 7, np.nan, a["image"])},
            "image holds 6 NaN or infinite values (first at sample 7)",
        ),
        "inf": (
            {**a, "image": np.where(np.arange(60)[:, None] >= 58, np.inf, a["image"])},
            "image holds 12 NaN or infinite values (first at sample 58)",
        ),
        "small class": (
            {**a, "y": np.where(np.arange(60) < 3, 11, a["y"])},
            "class '11' has 3 samples, but a split with val_fraction=0.15 and "
            "test_fraction=0.15 needs 6 or more of each class",
        ),
        "unknown key": ({**a, "labels_old": a["y"]}, "unknown key 'labels_old' with shape (60,)"),
        "unknown mask": ({**a, "mask_video": a["y"] > 3}, "unknown key 'mask_video'"),
        "no y": (
            {"image": a["image"], "audio": a["audio"], "labels": a["y"]},
            "has no labels: save them as an array named y (found 'labels': rename it to y)",
        ),
        "single class": ({**a, "y": np.zeros(60, int)}, "y has a single class (0)"),
        "whole floats": (
            {**a, "y": a["y"].astype(np.float32)},
            "set dataset.task=classification or dataset.task=regression",
        ),
    }
    out = {}
    for name, (arrays, message) in cases.items():
        out[name] = (save(arrays, tmp_path / name.replace(" ", "_"), "npz"), message)
    obj = tmp_path / "object.npz"
    np.savez(obj, **a, extra=_evil_object_array(marker))
    out["object array"] = (obj, "member 'extra.npy' is an array of Python objects")
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps(a))
    out["pickle"] = (raw, "is a pickle; a features .npz holds arrays only")
    member = tmp_path / "member.npz"
    np.savez(member, **a)
    with zipfile.ZipFile(member, "a") as archive:
        archive.writestr("extra.pkl", pickle.dumps(_evil_object_array(marker)))
    out["pickle member"] = (member, "member 'extra.pkl' is not an .npy array")
    npy = tmp_path / "npydir"
    save(a, npy, "npy")
    np.save(npy / "extra.npy", _evil_object_array(marker), allow_pickle=True)
    out["object npy"] = (npy, "extra.npy is an array of Python objects")
    return out


def test_every_bad_file_is_one_line_and_nothing_is_unpickled(capsys, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    for name, (path, message) in _bad_files(tmp_path).items():
        code = main(["train", "--dataset", "features", f"dataset.path={path}", "--out",
                     str(tmp_path / "runs" / name), *TINY])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert "\n" not in err and "Traceback" not in err, (name, err)
        assert message in err, (name, err)
    assert not marker.exists()


def test_a_missing_path_and_an_unknown_format_are_one_line(
    capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # a default run directory (runs/...) lands in tmp_path
    for path, message in (
        (tmp_path / "none.npz", "does not exist; set dataset.path"),
        (tmp_path / "x.csv", "is no .npz, .safetensors or directory of .npy files"),
    ):
        if path.suffix == ".csv":
            path.write_text("a,b\n")
        assert main(["train", "--dataset", "features", f"dataset.path={path}", *TINY]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


@pytest.mark.parametrize("fmt", ["npz", "npy"])
def test_the_fingerprint_is_the_content_s_and_needs_no_build(tmp_path: Path, fmt: str) -> None:
    from mmbalance.config import build_dataclass
    from mmbalance.data.features import FeaturesParams, FeaturesSource

    arrays = feature_arrays()
    path = save(arrays, tmp_path / "feats", fmt)

    def source() -> FeaturesSource:
        params = build_dataclass(FeaturesParams, {"path": str(path)}, "dataset.features")
        return FeaturesSource(params, tmp_path)

    before = source().fingerprint()
    assert before == source().build().details["fingerprint"]
    changed = {**arrays, "image": arrays["image"] + np.float32(1)}
    if fmt == "npy":
        np.save(path / "image.npy", changed["image"])
    else:
        save(changed, tmp_path / "feats", fmt)
    assert source().fingerprint() not in (None, before)


def test_a_split_array_is_kept_and_validation_is_carved_from_train(tmp_path: Path) -> None:
    arrays = feature_arrays(n=120)
    given = np.array(["train"] * 90 + ["test"] * 30)
    data = _bundle(save({**arrays, "split": given}, tmp_path / "split", "npz"))
    sizes = data.record()["sizes"]
    assert sizes["test"] == 30 and sizes["train"] + sizes["val"] == 90
    assert abs(sizes["val"] - 90 * 0.15 / 0.85) <= 3  # stratified: rounded per class
    assert "validation carved from train" in data.notes
    codes = np.array([0] * 80 + [1] * 20 + [2] * 20)
    data = _bundle(save({**arrays, "split": codes}, tmp_path / "codes", "npy"))
    assert data.record()["sizes"] == {"train": 80, "val": 20, "test": 20}
    test_rows = data.splits["test"].inputs["audio"].numpy()
    assert np.array_equal(test_rows, arrays["audio"][100:])
