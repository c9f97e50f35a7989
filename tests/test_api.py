"""The Python API: a comparison on a features file gives the command's records, and user
objects (arrays, a DatasetSource instance, encoder factories and modules) go through it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FEATURES_TINY as TINY
from conftest import feature_arrays
from torch import nn

from mmbalance import api
from mmbalance.cli import main
from mmbalance.data import DATASETS
from mmbalance.data.base import DatasetBundle, DatasetSource, ModalitySpec, MultimodalTensorDataset
from mmbalance.errors import ConfigError

pytestmark = pytest.mark.usefixtures("restore_registries")


def test_arrays_through_the_api_give_the_command_s_records(tmp_path: Path) -> None:
    arrays = feature_arrays(n=150)
    path = tmp_path / "feats.npz"
    np.savez(path, **arrays)
    methods = "joint,multiloss[lam_uni=0.5]"
    argv = ["compare", "--dataset", "features", f"dataset.path={path}", "--methods", methods,
            "--seeds", "1", "--out", str(tmp_path / "cli"), *TINY]  # fmt: skip
    assert main(argv) == 0
    by_command = json.loads((tmp_path / "cli" / "results.json").read_text())
    result = api.compare(methods, arrays, out=tmp_path / "api", seeds=1, overrides=TINY)
    assert result.records == by_command
    assert json.loads(result.results.read_text()) == by_command
    assert result.report_html is not None and result.report_html.is_file()
    assert "joint" in result.table and not result.failed
    (data,) = (tmp_path / "api" / "data").glob("features-*.npz")
    with np.load(data) as saved:
        assert all(np.array_equal(saved[k], v) for k, v in arrays.items())


class Tiny(nn.Module):
    """A user's encoder: a linear map of the flattened input.

    Args:
        width: size of the latent.
    """

    def __init__(self, input_shape, width: int = 5) -> None:
        super().__init__()
        self.net = nn.Linear(int(np.prod(input_shape)), width)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


@dataclass
class PairsParams:
    """Options.

    Attributes:
        n: samples per split.
    """

    n: int = 40


class Pairs(DatasetSource):
    """Two views of a binary label."""

    Params = PairsParams

    def build(self) -> DatasetBundle:
        g = torch.Generator().manual_seed(1)
        splits = {}
        for s in ("train", "val", "test"):
            y = torch.randint(0, 2, (self.params.n,), generator=g)
            x = torch.randn(self.params.n, 3, generator=g) + y[:, None]
            splits[s] = MultimodalTensorDataset({"a": x, "b": x.flip(1)}, y)
        specs = {m: ModalitySpec(m, (3,)) for m in ("a", "b")}
        return DatasetBundle("pairs", "classification", 2, specs, splits)


def test_a_source_instance_and_user_encoders_through_fit_and_compare(tmp_path: Path) -> None:
    module = Tiny((3,), width=4)
    weights = module.net.weight.detach().clone()
    result = api.fit(
        "joint",
        Pairs(PairsParams(n=32), Path()),
        out=tmp_path / "fit",
        encoders={"a": Tiny, "b": module},
        overrides={"train.epochs": 1, "train.progress": False, "train.tensorboard": False},
    )
    assert 0 <= result.metrics["test"]["accuracy"] <= 1
    assert DATASETS.origin("Pairs") == f"module {__name__}"
    config = (tmp_path / "fit" / "config.yaml").read_text()
    assert "name: Pairs" in config and "n: 32" in config and "name: Tiny" in config
    # every run trains a copy of the module: the module itself keeps its weights
    assert torch.equal(module.net.weight, weights)
    comparison = api.compare(
        ["joint", "multiloss"],
        Pairs(PairsParams(n=32), Path()),
        out=tmp_path / "cmp",
        seeds=1,
        encoders={"a": Tiny, "b": module},
        overrides=["train.epochs=1", "train.progress=false", "train.tensorboard=false"],
        report=False,
    )
    assert torch.equal(module.net.weight, weights)
    assert {r["method"] for r in comparison.records} == {"joint", "multiloss"}
    assert comparison.report_md is None


def test_bad_api_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset must be a registered name"):
        api.compare("joint", 3.5, out=tmp_path)
    with pytest.raises(ConfigError, match="has no out_dim attribute"):
        api.fit("joint", "synthetic", out=tmp_path, encoders={"m1": nn.Linear(2, 2)})
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        api.compare("joint,nope", "synthetic", out=tmp_path)
