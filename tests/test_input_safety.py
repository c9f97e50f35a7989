"""What mmbalance reads: caches and reuse keyed on the data's content, inputs that cannot hang
or exhaust memory, and one line (exit 2, no traceback) for every bad input, including random
ones (a property test over every option of train, compare, report and evaluate).

Behaviour tests drive the command line in-process (``main``) or build datasets, so that each of
them also runs, and fails, against the code before its fix.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import shutil
import typing
import zipfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    KS_CLIPS,
    KS_PREPARE_ARGS,
    TINY_RUN_ARGS,
    cli_one_line,
    no_hang,
    write_ks_release,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mmbalance.builder import build_dataset, resolve_config
from mmbalance.cli import main
from mmbalance.errors import DataError

FAST = {"train.epochs": 1, "train.progress": False, "train.tensorboard": False}
#: Kinetics-Sounds on a prepared tiny release, with tiny encoders.
KS_TRAIN = [
    "--dataset",
    "kinetics_sounds",
    "dataset.val_fraction=0.34",
    "dataset.frames=2",
    "encoder.audio.width=4",
    "encoder.video.width=4",
    "train.batch_size=2",
    "train.epochs=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.epoch_curves=false",
]


@pytest.fixture(scope="module")
def ks_prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared Kinetics-Sounds directory of six clips (prepared once; tests copy it)."""
    root = tmp_path_factory.mktemp("ks")
    raw = write_ks_release(root / "raw", KS_CLIPS)
    argv = ["prepare", "kinetics_sounds", "--raw", str(raw), "--out", str(root / "prepared")]
    assert main([*argv, *KS_PREPARE_ARGS]) == 0
    return root / "prepared"


@pytest.fixture
def prepared(ks_prepared_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ks_prepared_dir, tmp_path / "prepared", symlinks=True))


def _ks_config(root: Path) -> Any:
    from mmbalance.config import parse_overrides

    args = parse_overrides(a for a in KS_TRAIN if "=" in a)
    return resolve_config({"dataset": "kinetics_sounds", "dataset.root": str(root), **args})


# --- item 3: caches and reuse keyed on content ---------------------------------------------------
def test_changed_prepared_files_are_read_again_and_nan_is_refused(prepared: Path) -> None:
    cfg = _ks_config(prepared)
    before = build_dataset(cfg)
    path = prepared / "audio_fbank" / "a0.npy"
    array = np.load(path)
    np.save(path, array + 1.0)  # a changed file: the cache must not serve the old arrays
    after = build_dataset(cfg)
    assert after.details["fingerprint"] != before.details["fingerprint"]
    # the rebuilt arrays hold the new values (clip a0 is the first row)
    new, old = after.splits["train"].arrays["audio"], before.splits["train"].arrays["audio"]
    assert torch.allclose(new[0], old[0] + 1.0) and torch.equal(new[1:], old[1:])
    np.save(path, np.full_like(array, np.nan))
    with pytest.raises(DataError, match=r"a0\.npy holds NaN or infinite values") as err:
        build_dataset(cfg)
    assert "\n" not in str(err.value)


def test_compare_never_reuses_a_run_trained_on_other_data(
    capsys, ks_prepared_dir: Path, tmp_path: Path
) -> None:
    """Clips added to the prepared dataset after seed 0 was trained: seed 0 is not reused next to
    a seed 1 tested on other clips."""
    raw = write_ks_release(tmp_path / "raw", KS_CLIPS)
    prepared = tmp_path / "prepared"
    prepare = ["prepare", "kinetics_sounds", "--raw", str(raw), "--out", str(prepared)]
    assert main([*prepare, *KS_PREPARE_ARGS]) == 0
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "joint", "--out", str(out), *KS_TRAIN]
    argv.append(f"dataset.root={prepared}")
    assert main([*argv, "--seeds", "1"]) == 0
    more = {**KS_CLIPS, "c0": (0, "test"), "c1": (1, "test")}
    write_ks_release(raw, more)
    assert main([*prepare, *KS_PREPARE_ARGS]) == 0
    capsys.readouterr()
    err = cli_one_line(capsys, [*argv, "--seeds", "2"])
    assert "holds a run trained on other data" in err and "seed0" in err
    assert not (out / "joint" / "seed1").exists()


def test_prepare_with_other_options_is_refused(capsys, tmp_path: Path) -> None:
    raw = write_ks_release(tmp_path / "raw", KS_CLIPS)
    out = tmp_path / "prepared"
    argv = ["prepare", "kinetics_sounds", "--raw", str(raw), "--out", str(out), "--no-progress"]
    assert main([*argv, "--image-size", "16", "--fbank-frames", "16"]) == 0
    err = cli_one_line(capsys, [*argv, "--image-size", "32", "--fbank-frames", "16"])
    assert "was prepared with --image-size 16 (now 32)" in err
    assert np.load(out / "frames" / "a0.npy").shape[1] == 16


def test_overlapping_splits_are_refused_by_name_and_by_content(prepared: Path) -> None:
    manifest = prepared / "manifest.csv"
    original = manifest.read_text()
    manifest.write_text(original + "a0,0,test\n")
    with pytest.raises(DataError) as err:
        build_dataset(_ks_config(prepared))
    assert "1 clip(s) are listed in two splits (e.g. 'a0' in train and test)" in str(err.value)
    manifest.write_text(original)
    for sub in ("audio_fbank", "audio_stft", "frames"):  # b0 (test) a copy of a0 (train)
        shutil.copyfile(prepared / sub / "a0.npy", prepared / sub / "b0.npy")
    with pytest.raises(DataError) as err:
        build_dataset(_ks_config(prepared))
    assert "1 clip(s) have the same content as a clip of another split" in str(err.value)
    assert "'b0' in test and 'a0' in train" in str(err.value)


# --- item 5: nothing hangs or exhausts memory ----------------------------------------------------
ALIAS_BOMB = (
    "["
    + ",".join(f"&a{i} [" + ",".join([f"*a{i - 1}" if i else "1"] * 9) + "]" for i in range(9))
    + "]"
)


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(capsys, tmp_path: Path) -> None:
    err = cli_one_line(capsys, ["train", "--out", str(tmp_path / "r"), f"train.lr={ALIAS_BOMB}"])
    assert "aliases (*name) are not accepted" in err and len(err) < 200
    run = tmp_path / "planted"
    run.mkdir()
    (run / "config.yaml").write_text(f"train:\n  lr: {ALIAS_BOMB}\n")
    err = cli_one_line(capsys, ["evaluate", str(run)])
    assert "aliases (*name) are not accepted" in err and len(err) < 300


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMBALANCE_CACHE", str(root / "cache"))
        assert main(["train", "--out", str(root / "run"), *TINY_RUN_ARGS]) == 0
    return root / "run"


def test_compressed_or_oversized_checkpoints_are_refused_before_reading(
    capsys, finished_tiny_run: Path, tmp_path: Path, monkeypatch
) -> None:
    run = Path(shutil.copytree(finished_tiny_run, tmp_path / "run"))
    loads: list[Any] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    # a checkpoint whose weights compress to almost nothing: 64 MiB of zeros in a few KiB
    ckpt = real_load(run / "best.ckpt", weights_only=True)
    ckpt["padding"] = torch.zeros(64 << 20, dtype=torch.uint8)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(run / "best.ckpt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert (run / "best.ckpt").stat().st_size < 1 << 20
    err = cli_one_line(capsys, ["evaluate", str(run)])
    assert "holds compressed entries" in err and loads == []
    # stored as torch writes it, but larger than this configuration's weights can be
    ckpt["padding"] = torch.zeros(80 << 20, dtype=torch.uint8)
    torch.save(ckpt, run / "best.ckpt")
    err = cli_one_line(capsys, ["evaluate", str(run)])
    assert "more than this configuration can need" in err and loads == []


def test_a_fifo_in_a_prepared_directory_does_not_hang(prepared: Path) -> None:
    path = prepared / "frames" / "a0.npy"
    path.unlink()
    os.mkfifo(path)
    with no_hang(), pytest.raises(DataError) as err:
        build_dataset(_ks_config(prepared))
    assert "a0.npy' is not a regular file" in str(err.value) and "\n" not in str(err.value)


# --- item 6: one line and exit 2 for every bad input ---------------------------------------------
DEEP = "[" * 3000 + "]" * 3000
COMMAND_LINES: dict[str, tuple[list[str], str]] = {
    "huge batch size": (["train.batch_size=99999999999999999999999"], "out of range"),
    "n_train=1e30": (["dataset.n_train=1e30"], "out of range"),
    "transformer heads=0": (
        ["fusion=transformer", "fusion.heads=0"],
        "fusion head 'transformer' cannot be built",
    ),
    "negative hidden size": (
        ["encoder.m1=mlp", "encoder.m1.hidden=[-1]"],
        "encoder 'mlp' cannot be built",
    ),
    "lr nested 3000 deep": ([f"train.lr={DEEP}"], "nested more than"),
}


@pytest.mark.parametrize("case", sorted(COMMAND_LINES))
def test_bad_command_line_values_are_one_line(capsys, tmp_path: Path, case: str) -> None:
    args, message = COMMAND_LINES[case]
    err = cli_one_line(capsys, ["train", "--out", str(tmp_path / "r"), *TINY_RUN_ARGS, *args])
    assert message in err and len(err) < 400


def test_a_deep_yaml_file_a_long_out_and_a_long_label_are_one_line(capsys, tmp_path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested more than" in cli_one_line(capsys, ["train", str(deep)])
    long_out = tmp_path / ("x" * 300)
    assert "File name too long" in cli_one_line(capsys, ["train", "--out", str(long_out)])
    argv = ["compare", "--out", str(tmp_path / "c"), "--methods"]
    label = "joint,ogm_ge[alpha=0.1" + "0" * 300 + "]"
    assert "longer than 120 bytes" in cli_one_line(capsys, [*argv, label, *TINY_RUN_ARGS])


def test_a_label_with_mathtext_still_gets_its_report(tmp_path: Path) -> None:
    out = tmp_path / "c"
    argv = ["compare", "--out", str(out), "--seeds", "1", *TINY_RUN_ARGS]
    assert main([*argv, "--methods", "joint,ogm_ge[alpha=0.1 #$x^$]"]) == 0
    for name in ("report.md", "report.html", "report_comparison.png"):
        assert (out / name).is_file(), name
    assert "ogm_ge[alpha=0.1 #\\$x^\\$]" in (out / "report.md").read_text()


def _npz_as_npy(path: Path) -> None:
    with path.open("wb") as f:
        np.savez(f, x=np.zeros(3))


PREPARED_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "npz saved as npy": (lambda p: _npz_as_npy(p / "audio_fbank" / "a0.npy"), "not a .npy array"),
    "text npy": (
        lambda p: np.save(p / "audio_fbank" / "a0.npy", np.array(["a", "b"])),
        "holds <U1 values, not numbers",
    ),
    "classes.txt not UTF-8": (
        lambda p: (p / "classes.txt").write_bytes(b"\xff\xfe\x00 not text"),
        "classes.txt is not a UTF-8 text file",
    ),
}


@pytest.mark.parametrize("damage", sorted(PREPARED_DAMAGE))
def test_damaged_prepared_data_is_one_line(capsys, prepared: Path, tmp_path, damage) -> None:
    edit, message = PREPARED_DAMAGE[damage]
    edit(prepared)
    argv = ["train", "--out", str(tmp_path / "r"), *KS_TRAIN, f"dataset.root={prepared}"]
    assert message in cli_one_line(capsys, argv)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("truncated", "cut", "is corrupt"),
        ("corrupt deflate", "flip", "is corrupt"),
        ("not an IDX file", "text", "not an IDX file of unsigned bytes"),
    ],
)
def test_a_damaged_fashion_mnist_file_is_one_line(capsys, tmp_path, name, content, message):
    data = tmp_path / "fashion"
    data.mkdir()
    images = np.zeros((20, 28, 28), np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    blobs = {
        "train-images-idx3-ubyte.gz": header + images.tobytes(),
        "t10k-images-idx3-ubyte.gz": header + images.tobytes(),
        "train-labels-idx1-ubyte.gz": bytes([0, 0, 8, 1]) + (20).to_bytes(4, "big") + bytes(20),
        "t10k-labels-idx1-ubyte.gz": bytes([0, 0, 8, 1]) + (20).to_bytes(4, "big") + bytes(20),
    }
    for file, raw in blobs.items():
        packed = gzip.compress(raw)
        if file.startswith("train-images"):
            if content == "cut":
                packed = packed[: len(packed) // 2]
            elif content == "flip":
                packed = packed[:12] + bytes(b ^ 0xFF for b in packed[12:40]) + packed[40:]
            else:
                packed = gzip.compress(b"this is not Fashion-MNIST" * 100)
        (data / file).write_bytes(packed)
    argv = ["train", "--dataset", "av-fashion", f"dataset.data_dir={data}", "--out"]
    err = cli_one_line(capsys, [*argv, str(tmp_path / "r"), "train.epochs=1"])
    assert "Fashion-MNIST file" in err and message in err


@pytest.fixture(scope="module")
def finished_comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """joint and multiloss, one seed (trained once per module; tests copy it)."""
    root = tmp_path_factory.mktemp("cmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMBALANCE_CACHE", str(root / "cache"))
        argv = ["compare", "--methods", "joint,multiloss", "--seeds", "1", "--out"]
        assert main([*argv, str(root / "cmp"), *TINY_RUN_ARGS]) == 0
    return root / "cmp"


def _results(edit: Callable[[list[dict[str, Any]]], None]) -> Callable[[Path], None]:
    def apply(out: Path) -> None:
        records = json.loads((out / "results.json").read_text())
        edit(records)
        (out / "results.json").write_text(json.dumps(records))

    return apply


def _relabel(label: Any) -> Callable[[Path], None]:
    def apply(out: Path) -> None:
        _results(lambda rs: [r.update(method=label) for r in rs if r["method"] == "multiloss"])(out)
        if isinstance(label, str):
            shutil.copytree(out / "multiloss", out / label)

    return apply


def _edit_text(relative: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(out: Path) -> None:
        path = out / relative
        text = path.read_text()
        assert old in text, (relative, old)
        path.write_text(text.replace(old, new, 1))

    return apply


def _metrics_csv_value(out: Path) -> None:
    path = out / "joint" / "seed0" / "metrics.csv"
    header, row, *rest = path.read_text().splitlines()
    cells = row.split(",")
    for column in ("val_accuracy", "seconds"):
        cells[header.split(",").index(column)] = "1e308"
    path.write_text("\n".join([header, ",".join(cells), *rest]) + "\n")


def _values(metric: str, method: str, value: float) -> Callable[[list[dict[str, Any]]], None]:
    def edit(records: list[dict[str, Any]]) -> None:
        for r in records:
            if r["metric"] == metric and r["method"] == method:
                r["value"] = value

    return edit


#: Edits after which the report is still written (each of them ended in a traceback before).
RENDERED_EDITS: list[Callable[[Path], None]] = [
    _results(_values("accuracy", "joint", math.nan)),  # NaN in results.json
    _results(_values("macro_f1", "multiloss", 1e308)),  # 1e308 in results.json
    _metrics_csv_value,  # 1e308 in metrics.csv
    lambda out: (out / "multiloss" / "seed0" / "steps.csv").write_text(
        "step,epoch,name,value\n0,0,$x^$,1.0\n1,0,$x^$,2.0\n"
    ),  # a $x^$ scalar in steps.csv
    _relabel("$x^$"),  # a $x^$ label
]


def test_report_on_edited_files_is_still_written(finished_comparison: Path, tmp_path) -> None:
    out = Path(shutil.copytree(finished_comparison, tmp_path / "cmp"))
    for edit in RENDERED_EDITS:
        edit(out)
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "\\$x^\\$" in (out / "report.md").read_text()


REFUSED_EDITS: dict[str, tuple[Callable[[Path], None], str]] = {
    "a dict as a method name": (_relabel({"a": 1}), "is not a name"),
    "method: 5 in config.yaml": (
        _edit_text("joint/seed0/config.yaml", "method:\n  name: joint", "method: 5"),
        "'method' is not a section",
    ),
    "errors: 5 in analysis.json": (
        lambda out: (out / "joint" / "seed0" / "analysis.json").write_text('{"errors": 5}'),
        "does not hold an analysis",
    ),
}


@pytest.mark.parametrize("edit", sorted(REFUSED_EDITS))
def test_report_on_damaged_files_is_one_line(
    capsys, finished_comparison: Path, tmp_path: Path, edit: str
) -> None:
    out = Path(shutil.copytree(finished_comparison, tmp_path / "cmp"))
    change, message = REFUSED_EDITS[edit]
    change(out)
    assert message in cli_one_line(capsys, ["report", str(out)])


# --- the property test: random values for every option ------------------------------------------
def _options() -> dict[str, dict[str, Any]]:
    """Every option of train and compare on the synthetic dataset, by key: its annotation."""
    from mmbalance.config import TrainConfig
    from mmbalance.data import DATASETS
    from mmbalance.methods import METHODS

    out: dict[str, dict[str, Any]] = {"": {}}
    out[""] |= {f"train.{k}": v for k, v in typing.get_type_hints(TrainConfig).items()}
    params = DATASETS.get("synthetic").Params
    out[""] |= {f"dataset.{f.name}": typing.get_type_hints(params)[f.name] for f in fields(params)}
    out[""] |= {"dataset": str, "method": str, "fusion": str, "encoder.m1": str}
    out[""] |= {"encoder.m1.hidden": list[int], "encoder.m1.out_dim": int, "unimodal_heads": bool}
    for name in METHODS.names():
        cls = METHODS.get(name).Params
        hints = typing.get_type_hints(cls)
        out[name] = {f"method.{f.name}": hints[f.name] for f in fields(cls)}
    return out


OPTIONS = _options()
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
HUGE = st.integers(2**62 + 1, 10**400) | st.integers(-(10**400), -(2**62) - 1)
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NESTED = st.recursive(
    TEXT | st.floats(allow_nan=True) | HUGE,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3)
        | st.dictionaries(TEXT, inner, min_size=1, max_size=2)
    ),
    max_leaves=6,
)


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


def _bad_text(valid: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """Text that parses as itself (not a number, bool, null or list) and is no valid value."""
    from mmbalance.config import parse_value

    return TEXT.filter(
        lambda t: _not_a_number(t) and t not in valid and parse_value(json.dumps(t)) == t
    )


def _bad_value(annotation: Any) -> st.SearchStrategy[Any]:
    """Values no option of this annotation accepts."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _bad_value(inner[0])
    if origin is typing.Literal:
        return _bad_text(tuple(map(str, args))) | HUGE | st.lists(TEXT, min_size=1)
    if origin in (list, tuple):
        return st.lists(st.lists(_bad_text(), min_size=1), min_size=1) | st.just({"a": 1})
    if origin is dict or annotation is dict:
        return HUGE | _bad_text()
    if annotation is bool:
        return _bad_text(("m1", "m2")) | st.floats(allow_nan=False) | st.lists(TEXT, min_size=1)
    if annotation is int:
        return (
            _bad_text()
            | NONFINITE
            | HUGE
            | st.floats(0.1, 0.9)
            | NESTED.filter(lambda v: isinstance(v, list | dict))
        )
    if annotation is float:
        return (
            _bad_text()
            | NONFINITE
            | st.integers(10**400, 10**401)
            | st.lists(_bad_text(), min_size=1)
        )
    from mmbalance.data import DATASETS
    from mmbalance.methods import METHODS
    from mmbalance.models import ENCODERS, FUSION_HEADS

    names = (*METHODS.names(), *DATASETS.names(), *ENCODERS.names(), *FUSION_HEADS.names())
    return _bad_text((*names, "adam", "adamw", "sgd", "none", "step", "cosine", "m1", "m2"))


def _render(value: Any) -> str:
    """``value`` as YAML on the command line."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value, allow_nan=False) if _finite_json(value) else "[.nan]"


def _finite_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


BAD_OUTS = st.sampled_from(["", " ", "a\x00b", "x" * 300]) | st.builds(
    lambda n: "/proc/" + "y" * n, st.integers(1, 20)
)
BAD_DIRS = BAD_OUTS | _bad_text().map(lambda t: f"missing-{t}")


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_bad_input_is_one_line_without_a_traceback(tmp_path_factory, data) -> None:
    """A random bad value for a random option of train, compare, report or evaluate: exit 2, at
    most three lines on stderr, no traceback (argparse's own errors included)."""
    tmp = tmp_path_factory.mktemp("prop")
    command = data.draw(st.sampled_from(["train", "compare", "report", "evaluate"]))
    if command in ("report", "evaluate"):
        argv = [command, data.draw(BAD_DIRS)]
    else:
        method = data.draw(st.sampled_from(sorted(OPTIONS)))
        keys = {**OPTIONS[""], **OPTIONS[method]}
        choices = [*sorted(keys), "--out"]
        if command == "compare":  # (``method=`` is superseded by --methods there)
            choices = [k for k in choices if k != "method"] + ["--seeds", "--methods"]
        key = data.draw(st.sampled_from(choices))
        base = TINY_RUN_ARGS[2:] + ([f"method={method}"] if method and command == "train" else [])
        out = f"--out={tmp / 'o'}"
        if key == "--out":
            out = f"--out={data.draw(BAD_OUTS)}"
            extra: list[str] = []
        elif key == "--seeds":
            extra = [f"--seeds={data.draw(_bad_text() | HUGE.map(str) | st.just('-3'))}"]
        elif key == "--methods":
            from mmbalance.compare import parse_method_spec, split_methods
            from mmbalance.errors import ConfigError
            from mmbalance.methods import METHODS

            text = data.draw(TEXT | NESTED.map(json.dumps))
            with contextlib.suppress(ConfigError):
                names = [parse_method_spec(m)[0] for m in split_methods(text)]
                assume(not all(n in METHODS for n in names))
            extra = [f"--methods={text}"]
        else:
            value = data.draw(_bad_value(keys[key]))
            extra = [f"{key}={_render(value)}"]
        if command == "compare":
            methods = [] if key == "--methods" else [f"--methods={method or 'joint'}"]
            argv = ["compare", *methods, "--seeds=1", out, *base, *extra]
            argv = [a for a in argv if not (a == "--seeds=1" and key == "--seeds")]
            argv = [a for a in argv if not a.startswith("method=")]
        else:
            argv = ["train", out, *base, *extra]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    err = stderr.getvalue()
    assert code == 2, (argv, err)
    assert "Traceback" not in err, (argv, err)
    assert len(err.strip().splitlines()) <= 3, (argv, err)
