"""Input the data layer must refuse in one line: hostile pickles, paths that leave their
directory, malformed feature files, preparations that produced nothing, degenerate sizes."""

from __future__ import annotations

import codecs
import os
import pickle
import struct
import subprocess
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.testing._private.utils as np_testing_utils
import pytest
import torch
from conftest import no_hang

from mmbalance.builder import build_dataset, resolve_config
from mmbalance.config import check
from mmbalance.data import DATASETS, DatasetSource, preparable_datasets
from mmbalance.data.base import DatasetBundle, ModalitySpec, MultimodalTensorDataset
from mmbalance.data.safe_unpickler import UnsafePickleError, load_arrays
from mmbalance.errors import ConfigError, DataError

FAST = {"train.epochs": 1, "train.progress": False, "train.tensorboard": False}
MOSI_DIMS = {"vision": 20, "audio": 5, "text": 300}


def one_line_error(err: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from mmbalance.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --------------------------------------------------------------------------- hostile pickles


class Call:
    """Pickles as ``func(*args)``: what a hostile file asks the unpickler to run."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args

    def __call__(self, *args: Any) -> Any:  # the pickler wants a callable; it is never called
        raise AssertionError("a payload is only pickled here")


class Reduced:
    """Pickles as ``func(*args)`` followed by ``BUILD`` with ``state``."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, tuple[Any, ...], Any]:
        return self.func, self.args, self.state


def create_file(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def evil_npy(marker: Path) -> Path:
    """A ``.npy`` whose object array unpickles to ``exec(create_file)``."""
    path = marker.with_name("evil.npy")
    np.save(path, np.array([Call(exec, create_file(marker))], dtype=object), allow_pickle=True)
    return path


#: gadget name -> payload(marker); each payload tries to create ``marker``.
GADGETS = {
    "numpy.testing runstring": lambda m: Call(np_testing_utils.runstring, create_file(m), {}),
    "numpy.load with allow_pickle": lambda m: Call(np.load, str(evil_npy(m)), None, True),
    "numpy.save writes a file": lambda m: Call(np.save, str(m), np.zeros(2)),
    "builtins.eval": lambda m: Call(eval, create_file(m)),
    "builtins.exec": lambda m: Call(exec, create_file(m)),
    "builtins.open": lambda m: Call(open, str(m), "w"),
    "builtins.getattr": lambda m: Call(
        Call(getattr, Call(__import__, "os"), "system"), f"touch {m}"
    ),
    "os.system": lambda m: Call(os.system, f"touch {m}"),
    "subprocess.Popen": lambda m: Call(subprocess.Popen, ["touch", str(m)]),
    "pathlib touch": lambda m: Call(Path.touch, m),
    "OrderedDict fed by exec": lambda m: Call(OrderedDict, Call(exec, create_file(m))),
}

#: Names that genuine array files use, called the way NumPy never does.
MISUSES: dict[str, Any] = {
    "numpy.ndarray called over a buffer": Call(np.ndarray, (2,), np.dtype("f4"), b"\0" * 8),
    "_frombuffer with an object dtype": Call(
        np._core.numeric._frombuffer, b"\0" * 8, np.dtype("O"), (1,), "C"
    ),
    "_reconstruct of another class": Call(
        np._core.multiarray._reconstruct, OrderedDict, (0,), b"b"
    ),
    "structured dtype with an object field": Call(np.dtype, [("a", "O"), ("b", "f8")]),
    "dtype state adding object fields": Reduced(
        np.dtype,
        ("V16", False, True),
        (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 16, 8, 63),
    ),
    "float dtype given fields": Reduced(
        np.dtype, ("f8", False, True), (3, "<", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 8, 0)
    ),
    "array data shorter than its shape": Reduced(
        np._core.multiarray._reconstruct,
        (np.ndarray, (0,), b"b"),
        (1, (1000,), np.dtype("f8"), False, b"\0" * 8),
    ),
    "object array from raw bytes": Reduced(
        np._core.multiarray._reconstruct,
        (np.ndarray, (0,), b"b"),
        (1, (1,), np.dtype("O"), False, b"\0" * 8),
    ),
    "_codecs.encode with another codec": Call(codecs.encode, "payload", "rot13"),
    "bytes of a size": Call(bytes, 1 << 20),
}

#: Hand-written: ``BUILD`` on an allowed global itself (``numpy.ndarray``), setting attributes.
BUILD_ON_GLOBAL = b"\x80\x02cnumpy\nndarray\n}X\x01\x00\x00\x00xK\x01sb."


def mosi_shaped(payload: Any) -> dict[str, Any]:
    """A MOSI-looking file whose feature holds the payload (as a real attack would hide it)."""
    rng = np.random.default_rng(0)
    part = {m: rng.normal(size=(4, 3, d)).astype(np.float32) for m, d in MOSI_DIMS.items()}
    return {
        "train": {**part, "labels": payload},
        "valid": {**part, "labels": np.zeros((4, 1))},
        "test": {**part, "labels": np.zeros((4, 1))},
    }


def load_through_mosi(path: Path) -> pytest.ExceptionInfo:
    cfg = resolve_config({"dataset": "mosi", "dataset.path": str(path), **FAST})
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    return err


@pytest.mark.parametrize("gadget", sorted(GADGETS))
@pytest.mark.parametrize("protocol", [2, 5])
def test_hostile_pickles_are_refused_without_side_effect(
    gadget: str, protocol: int, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned.npy"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(mosi_shaped(GADGETS[gadget](marker)), protocol=protocol))
    try:
        err = load_through_mosi(path)
    finally:
        assert not marker.exists(), "the payload ran"
    one_line_error(err, str(path), "was not loaded: it asks for more than arrays (refusing")
    with pytest.raises(UnsafePickleError):
        load_arrays(path.read_bytes())
    assert not marker.exists()


@pytest.mark.parametrize("misuse", sorted(MISUSES))
def test_allowed_names_misused_are_refused(misuse: str, tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(mosi_shaped(MISUSES[misuse])))
    with pytest.raises(UnsafePickleError):
        load_arrays(path.read_bytes())
    one_line_error(load_through_mosi(path), "was not loaded: it asks for more than arrays")


def test_build_on_an_allowed_global_is_refused() -> None:
    from mmbalance.data.safe_unpickler import ALLOWED

    with pytest.raises(UnsafePickleError, match=r"setting the state of numpy\.ndarray"):
        load_arrays(BUILD_ON_GLOBAL)
    assert not hasattr(ALLOWED[("numpy", "ndarray")], "x")


def test_hostile_pickle_under_train_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(mosi_shaped(GADGETS["numpy.testing runstring"](marker))))
    rc, _, err = run_cli(
        ["train", "--dataset", "mosi", f"dataset.path={path}", "--out", str(tmp_path / "run")],
        capsys,
    )
    assert rc == 2 and err.count("\n") == 1 and "refusing numpy.testing" in err
    assert not marker.exists()


# --------------------------------------------------------------------------- genuine pickles


class Numpy1Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes NumPy's globals under their NumPy 1.x names (``numpy.core``, not ``numpy._core``),
    as files made with NumPy 1.x have them."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        name = name or obj.__name__
        module = pickle.whichmodule(obj, name)
        if not module.startswith("numpy._core"):
            super().save_global(obj, name)
            return
        module = module.replace("numpy._core", "numpy.core", 1)
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def genuine_mosi(n: tuple[int, int, int] = (6, 3, 3), length: int = 4) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    data: dict[str, Any] = {}
    for split, count in zip(("train", "valid", "test"), n, strict=True):
        part: dict[str, Any] = {
            m: rng.normal(size=(count, length, d)).astype(np.float32) for m, d in MOSI_DIMS.items()
        }
        part["vision"] = np.asfortranarray(part["vision"])  # a Fortran-ordered array too
        part["audio"][0, 0, 0] = -np.inf
        part["labels"] = rng.uniform(-3, 3, size=(count, 1, 1)).astype(np.float64)
        part["id"] = np.array([[f"clip{i}", i] for i in range(count)], dtype=object)
        data[split] = part
    return data


@pytest.mark.parametrize("numpy_names", ["numpy 1.x", "numpy 2.x"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_mosi_pickles_still_load(numpy_names: str, protocol: int, tmp_path: Path) -> None:
    data = genuine_mosi()
    path = tmp_path / "mosi.pkl"
    with path.open("wb") as f:
        if numpy_names == "numpy 1.x":
            Numpy1Pickler(f, protocol=protocol).dump(data)
        else:
            pickle.dump(data, f, protocol=protocol)
    core = b"numpy.core." if numpy_names == "numpy 1.x" else b"numpy._core."
    assert core in path.read_bytes()
    loaded = load_arrays(path.read_bytes())
    for split, part in data.items():
        for key, value in part.items():
            got = loaded[split][key]
            assert got.dtype == value.dtype and got.shape == value.shape
            assert (got == value).all()
    bundle = build_dataset(resolve_config({"dataset": "mosi", "dataset.path": str(path), **FAST}))
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        ds = bundle.splits[split]
        expected = np.nan_to_num(data[key]["audio"], neginf=0.0)
        assert torch.equal(ds.inputs["audio"], torch.from_numpy(expected))
        assert torch.equal(ds.inputs["vision"], torch.from_numpy(data[key]["vision"].copy()))
        labels = data[key]["labels"].reshape(-1).astype(np.float32)
        assert torch.equal(ds.targets, torch.from_numpy(labels))


def test_python2_numpy1_array_pickle_loads() -> None:
    """The exact bytes NumPy 1.x writes under Python 2 (protocol 2, data as a byte string,
    integer dtype flags)."""
    values = np.array([1.5, -2.0, 3.25], dtype="<f4")
    raw = values.tobytes()
    data = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85"
        b"U\x01b\x87Rq\x03(K\x01K\x03\x85cnumpy\ndtype\nq\x04U\x02f4K\x00K\x01\x87Rq\x05"
        b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U"
        + struct.pack("<B", len(raw))
        + raw
        + b"tb."
    )
    loaded = load_arrays(data)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, values)


def test_numpy_scalars_and_containers_load() -> None:
    data = {
        "scalar": np.float32(1.5),
        "count": np.int64(7),
        "ordered": OrderedDict(a=np.arange(3)),
        "nested": [np.eye(2), (np.zeros(0), {"k": np.array(["ab", "c"])})],
        "big_endian": np.arange(4, dtype=">i4"),
        "names": {"x", "y"},
        "blob": b"",
    }
    for protocol in range(6):
        loaded = load_arrays(pickle.dumps(data, protocol=protocol))
        assert loaded["scalar"] == 1.5 and loaded["count"] == 7
        assert isinstance(loaded["ordered"], OrderedDict)
        assert np.array_equal(loaded["ordered"]["a"], np.arange(3))
        assert np.array_equal(loaded["nested"][1][1]["k"], data["nested"][1][1]["k"])
        assert loaded["big_endian"].dtype == np.dtype(">i4")
        assert loaded["names"] == {"x", "y"} and loaded["blob"] == b""


# --------------------------------------------------------------------------- MOSI input gaps


def mosi_with(split_change: dict[str, Any]) -> dict[str, Any]:
    data = genuine_mosi()
    data["train"].update(split_change)
    return data


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {m: np.zeros((0, 4, d), np.float32) for m, d in MOSI_DIMS.items()}
            | {"labels": np.zeros((0, 1))},
            "split 'train' holds no samples",
        ),
        ({"vision": np.full((6, 4, 20), "a")}, "train/vision holds text values, not numbers"),
        ({"labels": np.array(list("abcdef"))}, "train/labels holds text values, not numbers"),
        ({"audio": [[[0.0]], [[1.0, 2.0]]]}, "train/audio is a ragged list, not an array"),
        ({"text": "not an array"}, "train/text is a str, not an array"),
        ({"labels": np.full((6, 1), np.nan)}, "train/labels holds NaN or infinite"),
        ({"labels": np.zeros((6, 2))}, "train/labels has 2 values per sample"),
        ({"labels": np.zeros((5, 1))}, "has 6 samples but there are 5 targets"),
    ],
)
def test_mosi_malformed_features(change: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "mosi.pkl"
    path.write_bytes(pickle.dumps(mosi_with(change)))
    cfg = resolve_config({"dataset": "mosi", "dataset.path": str(path), **FAST})
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(err, message)


# --------------------------------------------------------------------------- paths


ESCAPES = ["../../../../etc/passwd", "/etc/passwd", "..", "frames/../../x", "a\\..\\b"]


def prepared_av(root: Path, clips: dict[str, tuple[str, str]]) -> Path:
    """A prepared audio-visual directory: ``clip -> (label, split)``, tiny arrays."""
    for sub in ("audio_stft", "audio_fbank", "frames"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for clip in clips:
        np.save(root / "audio_stft" / f"{clip}.npy", rng.normal(size=(5, 6)).astype(np.float32))
        np.save(root / "audio_fbank" / f"{clip}.npy", rng.normal(size=(6, 5)).astype(np.float32))
        frames = rng.integers(0, 255, size=(2, 8, 8, 3), dtype=np.uint8)
        np.save(root / "frames" / f"{clip}.npy", frames)
    write_manifest(root, [(c, label, split) for c, (label, split) in clips.items()])
    return root


def write_manifest(root: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["clip,label,split", *(",".join(row) for row in rows)]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


#: dataset -> (a label it knows, extra prepared files)
LOADERS = {
    "cremad": ("NEU", {}),
    "ave": ("Bark", {}),
    "kinetics_sounds": ("0", {"classes.txt": "0\n1\n"}),
    "ucf101": ("YoYo", {"classes.txt": "YoYo\n"}),
}


@pytest.mark.parametrize("dataset", sorted(LOADERS))
@pytest.mark.parametrize("clip", ESCAPES)
def test_manifest_clip_names_cannot_leave_the_root(dataset: str, clip: str, tmp_path: Path) -> None:
    label, extra = LOADERS[dataset]
    root = tmp_path / "prepared"
    root.mkdir()
    write_manifest(root, [("ok_clip", label, "train"), (clip, label, "test")])
    for name, text in extra.items():
        (root / name).write_text(text)
    cfg = resolve_config({"dataset": dataset, "dataset.root": str(root), **FAST})
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(err, f"manifest.csv:3: clip name {clip!r} is not a plain file name")


def test_prepared_file_linking_outside_the_root_is_refused(tmp_path: Path) -> None:
    clips = {f"10{k}_X_{e}_Y": (e, s) for e in ("NEU", "HAP") for k, s in enumerate("tt")}
    root = prepared_av(tmp_path / "prepared", {c: (e, "train") for c, (e, _) in clips.items()})
    secret = tmp_path / "elsewhere.npy"
    np.save(secret, np.zeros((5, 6), np.float32))
    target = root / "audio_stft" / "100_X_NEU_Y.npy"
    target.unlink()
    target.symlink_to(secret)
    cfg = resolve_config({"dataset": "cremad", "dataset.root": str(root), **FAST})
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(
        err, f"resolves to {secret.resolve()}, outside the prepared directory {root.resolve()}"
    )


def test_symlinked_prepared_root_is_fine(tmp_path: Path) -> None:
    clips = {
        f"10{k}_X_{e}_Y": (e, "test" if k == 0 else "train")
        for e in ("NEU", "HAP")
        for k in range(4)
    }
    real = prepared_av(tmp_path / "real", clips)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    cfg = resolve_config(
        {"dataset": "cremad", "dataset.root": str(link), "dataset.val_fraction": 0.34, **FAST}
    )
    bundle = build_dataset(cfg)
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 4, "val": 2, "test": 2}


def raw_with_hostile_list(dataset: str, raw: Path, name: str) -> None:
    """The dataset's raw split list, naming ``name`` as a clip."""
    if dataset == "cremad":
        (raw / "AudioWAV").mkdir()
        (raw / "AudioWAV" / "1001_DFA_NEU_XX.wav").write_bytes(b"")
        (raw / "train.csv").write_text(f"1001_DFA_NEU_XX,NEU\n{name},NEU\n")
    elif dataset == "ave":
        (raw / "trainSet.txt").write_text(f"Bark&okVID&good&0&10\nBark&{name}&good&0&10\n")
    elif dataset == "kinetics_sounds":
        (raw / "my_train.txt").write_text(f"ok_clip 3\n{name} 3\n")
    else:
        (raw / "ucfTrainTestlist").mkdir()
        (raw / "ucfTrainTestlist" / "classInd.txt").write_text("1 YoYo\n")
        (raw / "ucfTrainTestlist" / "testlist01.txt").write_text("YoYo/v_YoYo_g01_c01.avi\n")
        (raw / "ucfTrainTestlist" / "trainlist01.txt").write_text(f"YoYo/{name}.avi 1\n")


@pytest.mark.parametrize("dataset", sorted(LOADERS))
@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/tmp/x", ".."])
def test_release_lists_cannot_name_paths_outside(dataset: str, name: str, tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    raw_with_hostile_list(dataset, raw, name)
    source = DATASETS.get(dataset)
    with pytest.raises(DataError) as err:
        source.prepare(raw, out, progress=False)
    text = one_line_error(err, "is not a plain file name")
    assert text.startswith(str(raw))
    assert not out.exists()


def test_ucf_list_entry_with_a_class_outside(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    raw_with_hostile_list("ucf101", raw, "v_ok")
    (raw / "ucfTrainTestlist" / "trainlist01.txt").write_text("../../etc/passwd 1\n")
    with pytest.raises(DataError) as err:
        DATASETS.get("ucf101").prepare(raw, tmp_path / "out", progress=False)
    one_line_error(err, "trainlist01.txt:1: clip name '..' is not a plain file name")


# --------------------------------------------------------------------------- FIFOs


def replace_with_fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


#: dataset -> its release's split list (as ``raw_with_hostile_list`` writes it)
RELEASE_LISTS = {
    "cremad": "train.csv",
    "ave": "trainSet.txt",
    "kinetics_sounds": "my_train.txt",
    "ucf101": "ucfTrainTestlist/trainlist01.txt",
}


@pytest.mark.parametrize("dataset", sorted(RELEASE_LISTS))
def test_a_fifo_as_a_release_list_is_one_line(dataset: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    raw_with_hostile_list(dataset, raw, "ok_clip2")
    fifo = replace_with_fifo(raw / RELEASE_LISTS[dataset])
    with no_hang(), pytest.raises(DataError) as err:
        DATASETS.get(dataset).prepare(raw, tmp_path / "out", progress=False)
    one_line_error(err, f"{str(fifo)!r} is not a regular file")


def _fifo_features(tmp_path: Path, fmt: str) -> Path:
    if fmt == "npy directory":
        (tmp_path / "feats").mkdir()
        np.save(tmp_path / "feats" / "y.npy", np.zeros(4, np.int64))
        replace_with_fifo(tmp_path / "feats" / "x.npy")
        return tmp_path / "feats"
    return replace_with_fifo(tmp_path / f"feats.{fmt}")


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "npy directory"])
def test_a_fifo_as_a_features_file_is_one_line(fmt: str, tmp_path: Path) -> None:
    path = _fifo_features(tmp_path, fmt)
    cfg = resolve_config({"dataset": "features", "dataset.path": str(path), **FAST})
    with no_hang(), pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(err, "is not a regular file")


def test_a_fifo_as_a_manifest_table_or_one_of_its_files_is_one_line(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "data"
    root.mkdir()
    rows = ["image,label"]
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / f"i{i}.png")
        rows.append(f"i{i}.png,{i % 2}")
    table = root / "table.csv"
    table.write_text("\n".join(rows) + "\n")
    replace_with_fifo(root / "i2.png")
    cfg = resolve_config({"dataset": "manifest", "dataset.path": str(table), **FAST})
    with no_hang(), pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(err, f"{table}:4 (column image): 'i2.png' is not a regular file")
    replace_with_fifo(table)
    with no_hang(), pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(err, f"{str(table)!r} is not a regular file")


def test_a_manifest_table_with_one_sample_in_two_splits_is_refused(tmp_path: Path) -> None:
    """The split column puts the same files, or copies of them, in train and in test."""
    from PIL import Image

    root = tmp_path / "data"
    root.mkdir()
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    rows = ["image,photo,label,split"]
    for i, split in enumerate(splits):
        Image.new("RGB", (8, 8), (30 * i, 255 - 30 * i, 0)).save(root / f"i{i}.png")
        Image.new("RGB", (8, 8), (0, 30 * i, 255 - 30 * i)).save(root / f"p{i}.png")
        rows.append(f"i{i}.png,p{i}.png,{i % 2},{split}")
    table = root / "table.csv"
    table.write_text("\n".join(rows) + "\n")
    cfg = resolve_config({"dataset": "manifest", "dataset.path": str(table), **FAST})
    assert len(build_dataset(cfg).splits["test"]) == 2  # disjoint: fine
    table.write_text("\n".join([*rows, "./i1.png,p1.png,1,test"]) + "\n")
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(err, "1 clip(s) are listed in two splits (e.g. 'i1.png + p1.png' in train and")
    for name in ("i0", "p0"):
        (root / f"{name}_copy.png").write_bytes((root / f"{name}.png").read_bytes())
    table.write_text("\n".join([*rows, "i0_copy.png,p0_copy.png,0,2"]) + "\n")
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(
        err,
        "1 clip(s) have the same content",
        "'i0_copy.png + p0_copy.png' in test and 'i0.png + p0.png' in train",
    )


# --------------------------------------------------------------------------- prepare


def raw_cremad_without_videos(raw: Path) -> None:
    (raw / "AudioWAV").mkdir(parents=True)
    for clip in ("1001_DFA_NEU_XX", "1002_DFA_HAP_XX"):
        (raw / "AudioWAV" / f"{clip}.wav").write_bytes(b"")


def test_prepare_with_every_clip_failed_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw_cremad_without_videos(raw)
    args = ["prepare", "cremad", "--raw", str(raw), "--out", str(out), "--no-progress"]
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "no CREMA-D clip could be prepared: all 2 failed (first, 1001_DFA_NEU_XX: " in err
    assert "missing video file VideoFlash/1001_DFA_NEU_XX.flv" in err
    report = (out / "prepare_report.json").read_text()
    assert "1002_DFA_HAP_XX" in report and str(out / "prepare_report.json") in err


@pytest.mark.parametrize(
    "dataset, args, message",
    [
        ("ucf101", ["--fbank-frames", "64"], "--fbank-frames does not apply to ucf101"),
        ("cremad", ["--clip-frames", "4"], "--clip-frames does not apply to cremad"),
        ("ave", ["--image-size", "8"], "--image-size must be in [16, 512], got 8"),
        ("kinetics_sounds", ["--workers", "0"], "--workers must be >= 1, got 0"),
        ("mosi", [], "dataset 'mosi' needs no preparation"),
        ("nonesuch", [], "prepare knows: ave, cremad, kinetics_sounds"),
    ],
)
def test_prepare_options_are_checked_against_the_dataset(
    dataset: str, args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "raw").mkdir()
    cmd = ["prepare", dataset, "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o")]
    rc, _, err = run_cli([*cmd, *args], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_every_prepare_option_has_a_flag() -> None:
    from dataclasses import fields

    from mmbalance.cli import PREPARE_OPTIONS

    assert {"ave", "cremad", "kinetics_sounds", "ucf101"} <= set(preparable_datasets())
    assert "mosi" not in preparable_datasets() and "synthetic" not in preparable_datasets()
    for name in preparable_datasets():
        source = DATASETS.get(name)
        assert getattr(source, "name", name) == name  # hints and cache files use the class's
        params = source.PrepareParams
        for field in fields(params):
            assert "--" + field.name.replace("_", "-") in PREPARE_OPTIONS, (name, field.name)


@dataclass
class ToyParams:
    size: int = 1


@dataclass
class ToyPrepareParams:
    workers: int = 3
    clip_frames: int = 5

    def __post_init__(self) -> None:
        check(self.clip_frames >= 1, "--clip-frames must be >= 1")


class ToySource(DatasetSource):
    """A dataset that exists only in this test: registered, it becomes preparable."""

    Params = ToyParams
    PrepareParams = ToyPrepareParams
    calls: list[tuple[Path, Path, Any]] = []

    @classmethod
    def prepare(
        cls, raw: Path, out: Path, params: Any, *, progress: bool = True, console: Any = None
    ) -> dict[str, Any]:
        cls.calls.append((raw, out, params))
        return {"prepared": params.clip_frames}

    @classmethod
    def print_prepare_report(cls, report: Any, console: Any) -> None:
        console.print(f"toy prepared {report['prepared']}")


def test_prepare_comes_from_the_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(DATASETS._items, "toy", ToySource)
    monkeypatch.setattr(ToySource, "calls", [])
    assert "toy" in preparable_datasets()
    cmd = ["prepare", "toy", "--raw", str(tmp_path), "--out", str(tmp_path / "o")]
    rc, out, _ = run_cli([*cmd, "--clip-frames", "7", "--no-progress"], capsys)
    assert rc == 0 and "toy prepared 7" in out
    assert ToySource.calls == [(tmp_path, tmp_path / "o", ToyPrepareParams(3, 7))]  # workers: 3
    rc, _, err = run_cli([*cmd, "--image-size", "64"], capsys)
    assert rc == 2 and len(ToySource.calls) == 1
    assert "--image-size does not apply to toy; its options: --workers, --clip-frames" in err
    rc, _, err = run_cli([*cmd, "--clip-frames", "0"], capsys)
    assert rc == 2 and "--clip-frames must be >= 1" in err


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"dataset.n_train": 1}, ConfigError, "dataset.n_train must be >= 2, got 1"),
        ({"dataset.n_train": 0}, ConfigError, "dataset.n_train must be >= 2, got 0"),
        ({"dataset.n_val": 0}, ConfigError, "dataset.n_val must be >= 1"),
    ],
)
def test_synthetic_sizes_are_checked(overrides: dict, error: type, message: str) -> None:
    with pytest.raises(error) as err:
        resolve_config({"dataset": "synthetic", **overrides, **FAST})
    one_line_error(err, message)


def test_n_train_1_under_train_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", "--dataset", "synthetic", "dataset.n_train=1", "--out", str(tmp_path / "r")]
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and err.count("\n") == 1 and "dataset.n_train must be >= 2" in err


def test_training_split_of_one_class_is_refused() -> None:
    def bundle(targets: list[int]) -> DatasetBundle:
        n = len(targets)
        ds = MultimodalTensorDataset(
            {"a": torch.zeros(n, 2), "b": torch.zeros(n, 2)}, torch.tensor(targets)
        )
        specs = {m: ModalitySpec(m, (2,)) for m in ("a", "b")}
        return DatasetBundle(
            "toy", "classification", 3, specs, {"train": ds, "val": ds, "test": ds}
        )

    assert len(bundle([0, 2]).splits["train"]) == 2
    with pytest.raises(DataError) as err:
        bundle([2, 2])
    one_line_error(err, "every training sample has class 2; a classifier needs two classes")


def test_synthetic_two_samples_of_one_class(capsys: pytest.CaptureFixture) -> None:
    # n_train=2 draws both samples from one of 5 classes for some seeds: find one and check it
    from mmbalance.data.synthetic import SyntheticParams, SyntheticProcess

    for seed in range(50):
        process = SyntheticProcess(SyntheticParams(n_train=2, seed=seed))
        _, y, _ = process.sample(2, torch.Generator().manual_seed(seed * 1000))
        if y[0] == y[1]:
            break
    else:  # pragma: no cover - 50 seeds without a repeat has probability 0.8**50
        pytest.fail("no seed drew one class twice")
    cfg = resolve_config(
        {"dataset": "synthetic", "dataset.n_train": 2, "dataset.seed": seed, **FAST}
        | {"dataset.n_bayes": 100, "dataset.n_test": 10, "dataset.n_val": 10}
    )
    with pytest.raises(DataError) as err:
        build_dataset(cfg)
    one_line_error(err, f"every training sample has class {int(y[0])}")
