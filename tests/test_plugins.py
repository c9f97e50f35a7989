"""Plugins: a user's encoder and dataset reach every command (train, compare --search, DDP
workers, evaluate, list) without editing mmbalance, are recorded in the run directory, and are
never imported because a run directory or a YAML file the user did not pass names them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mmbalance import plugins
from mmbalance.cli import main
from mmbalance.data import DATASETS
from mmbalance.models import ENCODERS

QUIET = ["train.progress=false", "train.tensorboard=false", "train.epoch_curves=false"]
TINY = [*QUIET, "train.epochs=1", "train.batch_size=16"]

#: A plugin with an encoder and a dataset of its own; importing it appends a line to the file
#: named by ``MARKER`` (so a test sees whether it was imported).
PLUGIN = '''
"""A plugin: the tiny_gru encoder and the toy_pairs dataset."""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmbalance.data import DATASETS
from mmbalance.data.base import DatasetBundle, DatasetSource, ModalitySpec, MultimodalTensorDataset
from mmbalance.models import ENCODERS

with open(MARKER, "a") as fh:
    fh.write("imported\\n")


class TinyGRU(nn.Module):
    """A one-layer GRU over (L, d) sequences, its last state as the latent.

    Args:
        hidden: size of the state (and of the latent).
    """

    def __init__(self, input_shape, hidden: int = 8):
        super().__init__()
        self.gru = nn.GRU(input_shape[-1], hidden, batch_first=True)
        self.out_dim = hidden

    def forward(self, x):
        return self.gru(x)[1][0]


ENCODERS.register("tiny_gru")(TinyGRU)


@dataclass
class ToyParams:
    """Options of toy_pairs.

    Attributes:
        n: samples per split.
    """

    n: int = 48


@DATASETS.register("toy_pairs")
class ToyPairs(DatasetSource):
    """Two noisy views of a binary label: a vector and a sequence."""

    Params = ToyParams

    def build(self):
        g = torch.Generator().manual_seed(0)
        splits = {}
        for s in ("train", "val", "test"):
            y = torch.randint(0, 2, (self.params.n,), generator=g)
            a = torch.randn(self.params.n, 4, generator=g) + y[:, None]
            b = torch.randn(self.params.n, 5, 3, generator=g) + y[:, None, None]
            splits[s] = MultimodalTensorDataset({"a": a, "b": b}, y)
        specs = {"a": ModalitySpec("a", (4,), "mlp"), "b": ModalitySpec("b", (5, 3), "tiny_gru")}
        return DatasetBundle("toy_pairs", "classification", 2, specs, splits)
'''


pytestmark = pytest.mark.usefixtures("restore_registries")


def write_plugin(tmp_path: Path, name: str = "my_plugin") -> tuple[Path, Path]:
    marker = tmp_path / f"{name}.imported"
    path = tmp_path / f"{name}.py"
    path.write_text(f"MARKER = {str(marker)!r}\n" + textwrap.dedent(PLUGIN))
    return path, marker


def test_a_plugin_reaches_train_list_and_the_run_records_it(capsys, tmp_path: Path) -> None:
    path, marker = write_plugin(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--plugin", str(path), "--dataset", "toy_pairs", "--out", str(out), *TINY]
    assert main(argv) == 0
    assert marker.read_text() == "imported\n"
    assert ENCODERS.origin("tiny_gru") == f"plugin my_plugin ({path})"
    provenance = json.loads((out / "provenance.json").read_text())["invocations"][0]
    (recorded,) = provenance["plugins"]
    import hashlib

    assert recorded["file"] == str(path)
    assert recorded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert recorded["module"] == "mmbalance_plugin_my_plugin"
    assert recorded["provides"] == {"dataset": ["toy_pairs"], "encoder": ["tiny_gru"]}
    assert yaml.safe_load((out / "config.yaml").read_text())["plugins"] == [recorded]
    capsys.readouterr()
    assert main(["list", "--plugin", str(path)]) == 0  # loaded already: not imported again
    listing = capsys.readouterr().out
    assert "tiny_gru" in listing and "my_plugin" in listing and "built-in" in listing
    assert marker.read_text() == "imported\n"
    assert main(["list", "tiny_gru"]) == 0
    assert f"from plugin my_plugin ({path})" in capsys.readouterr().out


def test_a_run_directory_never_imports_its_plugins(capsys, tmp_path: Path) -> None:
    path, marker = write_plugin(tmp_path)
    out = tmp_path / "run"
    train = ["train", "--dataset", "toy_pairs", "--out", str(out), *TINY]
    assert main([*train, "--plugin", str(path)]) == 0
    plugins.reset()  # a new command in a new process: nothing loaded
    marker.unlink()
    hint = f"it comes from the plugin my_plugin, which '{out / 'config.yaml'}' names"
    for argv in (
        ["evaluate", str(out)],
        ["train", "--out", str(out), "--resume", "train.epochs=2", *QUIET],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert f"unknown dataset 'toy_pairs': {hint}" in err, err
        assert f"pass --plugin {path}" in err, err
    compare = ["compare", "--dataset", "toy_pairs", "--methods", "joint", "--seeds", "1"]
    assert main([*compare, "--out", str(tmp_path / "cmp"), *TINY]) == 2
    assert "unknown dataset 'toy_pairs'" in capsys.readouterr().err
    assert main(["report", str(out)]) == 0  # the report reads files only
    assert not marker.exists()
    # given the plugin, evaluate sees its components
    assert main(["evaluate", str(out), "--plugin", str(path), "--json"]) == 0
    assert marker.exists()


def test_a_yaml_that_the_user_passes_loads_its_plugins(tmp_path: Path) -> None:
    path, marker = write_plugin(tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(f"plugins: [{path.name}]\ndataset: {{name: toy_pairs, n: 32}}\n")
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), *TINY]) == 0
    assert marker.exists()
    plugins.reset()
    marker.unlink()
    # the run's own config.yaml, passed by the user, trains again with the plugin it records
    assert main(["train", str(out / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert marker.exists()


def test_a_plugin_under_compare_search_and_ddp(tmp_path: Path) -> None:
    path, _ = write_plugin(tmp_path)
    out = tmp_path / "cmp"
    argv = ["compare", "--plugin", str(path), "--dataset", "toy_pairs", "--methods", "joint",
            "--seeds", "1", "--search", "--out", str(out), *TINY]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "search.json").read_text())[0]["method"] == "joint"
    run = tmp_path / "ddp"
    argv = ["train", "--plugin", str(path), "--dataset", "toy_pairs", "--out", str(run),
            "train.devices=2", "train.accelerator=cpu", *TINY]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((run / "metrics.json").read_text())["metrics"]["test"]["accuracy"] > 0


def test_clashes_and_missing_plugins_are_one_line(capsys, tmp_path: Path) -> None:
    path, _ = write_plugin(tmp_path)
    clash = tmp_path / "clash.py"
    clash.write_text(
        "from mmbalance.models import ENCODERS\n"
        "from mmbalance.models.encoders import MLPEncoder\n"
        "class Mine(MLPEncoder):\n    pass\n"
        "ENCODERS.register('tiny_gru')(Mine)\n"
    )
    builtin = tmp_path / "builtin_clash.py"
    builtin.write_text(
        "from mmbalance.models import ENCODERS\nENCODERS.register('mlp')(lambda shape: None)\n"
    )
    cases = [
        (
            ["list", "--plugin", str(path), "--plugin", str(clash)],
            f"encoder 'tiny_gru' of plugin clash ({clash}) clashes with the encoder "
            f"'tiny_gru' of plugin my_plugin ({path})",
        ),
        (
            ["list", "--plugin", str(builtin)],
            f"encoder 'mlp' of plugin builtin_clash ({builtin}) clashes with the encoder "
            "'mlp' of built-in (mmbalance.models.encoders)",
        ),
        (["list", "--plugin", "no_such_plugin_module"], "plugin module 'no_such_plugin_module'"),
        (["list", "--plugin", str(tmp_path / "gone.py")], "gone.py' does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        plugins.reset()
    assert "tiny_gru" not in ENCODERS and "toy_pairs" not in DATASETS


def test_an_installed_package_s_entry_point_is_loaded(tmp_path: Path) -> None:
    site = tmp_path / "site"
    package = site / "acme_mm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from mmbalance.models import ENCODERS\n"
        "from mmbalance.models.encoders import MLPEncoder\n"
        "class AcmeEncoder(MLPEncoder):\n    '''Acme's encoder.'''\n"
        "ENCODERS.register('acme')(AcmeEncoder)\n"
    )
    dist = site / "acme_mm-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-mm\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mmbalance.plugins]\nacme = acme_mm\n")
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    listing = subprocess.run(
        [sys.executable, "-m", "mmbalance.cli", "list", "acme"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "from plugin acme" in listing and "acme_mm" in listing
