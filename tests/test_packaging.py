"""The package as users install it: a torch range rather than a pin, ``--version``,
``python -m mmbalance``, the ``py.typed`` marker, and a wheel that works on its own: built with
``python -m build``, installed into a fresh virtual environment without the repository, it
runs a comparison."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import FAST_ARGS
from packaging.requirements import Requirement

import mmbalance

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _torch_requirement() -> Requirement:
    (torch,) = [
        Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")
    ]
    return torch


def test_torch_is_a_range_and_the_exact_pin_lives_in_the_install_script() -> None:
    from importlib.metadata import version

    spec = _torch_requirement().specifier
    assert not any(s.operator == "==" for s in spec), spec  # installs next to any torch
    installed = version("torch").split("+")[0]
    for v in ("2.3.0", "2.13.0", "2.14.1", installed):
        assert spec.contains(v), (v, spec)
    assert not spec.contains("3.0.0")
    # the set-up script (and so CI) installs one exact CPU build inside that range
    pins = re.findall(r"torch==([0-9.]+)", (ROOT / "scripts" / "install.sh").read_text())
    assert pins and all(spec.contains(p) for p in pins), pins


def test_version_comes_from_one_place() -> None:
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "mmbalance.__version__"
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+", mmbalance.__version__)


def test_python_m_mmbalance_prints_the_version() -> None:
    from importlib.metadata import version

    out = subprocess.run(
        [sys.executable, "-m", "mmbalance", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(f"mmbalance {mmbalance.__version__} (")
    assert f"torch {version('torch')}" in out and f"lightning {version('lightning')}" in out


def test_py_typed_marker_is_shipped() -> None:
    assert (ROOT / "mmbalance" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["mmbalance"]


def _source_tree(dest: Path) -> Path:
    """The files of the repository that git tracks or would track, copied to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.mark.timeout(900)
def test_wheel_built_and_installed_alone_runs_a_comparison(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git metadata to list its files")
    src = _source_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    # the sdist, then the wheel from the sdist (what `python -m build` does), with this
    # environment's setuptools instead of downloading a build environment
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True,
        check=True,
    )
    (wheel,) = dist.glob("mmbalance-*.whl")
    assert wheel.name.startswith(f"mmbalance-{mmbalance.__version__}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {n for n in names if not n.startswith(f"mmbalance-{mmbalance.__version__}.dist")}
    assert all(n.startswith("mmbalance/") for n in packaged), sorted(packaged)
    assert not [n for n in names if re.search(r"(^|/)(tests|benchmarks)/", n)]
    assert "mmbalance/py.typed" in names and "mmbalance/__main__.py" in names
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mmbalance").rglob("*.yaml")}
    assert configs and configs <= set(names), sorted(configs - set(names))
    metadata = zipfile.ZipFile(wheel).read(f"mmbalance-{mmbalance.__version__}.dist-info/METADATA")
    requires = [
        Requirement(line.split(": ", 1)[1])
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    assert _torch_requirement() in [r for r in requires if r.name == "torch"]

    # a fresh environment that sees the installed dependencies but not the repository (its
    # editable install in the base environment stays behind the venv's own copy)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            str(wheel),
        ],
        check=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import mmbalance; print(mmbalance.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the repository's

    out = tmp_path / "cmp"
    done = subprocess.run(
        [
            str(venv / "bin" / "mmbalance"),
            "compare",
            "--dataset",
            "synthetic",
            "--methods",
            "joint,mcr",
            "--seeds",
            "1",
            "--out",
            str(out),
            *FAST_ARGS,
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((out / "results.json").read_text())
    tested = {r["method"] for r in records if r["split"] == "test" and r["metric"] == "accuracy"}
    assert tested == {"joint", "mcr"}
    assert (out / "report.html").is_file()
    # the runs' provenance names the installed copy's version
    prov = json.loads((out / "mcr" / "seed0" / "provenance.json").read_text())
    assert prov["invocations"][0]["mmbalance"] == mmbalance.__version__
