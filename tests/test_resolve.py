"""A configuration is resolved once: every option is built and checked by ``resolve_config``,
and nothing downstream (the run directory, the assembly of the method, the trainer) builds it
again; a changed run is checked again; the identity of a run does not depend on how it was
spelled."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY

from mmbalance.builder import ResolvedConfig, resolve_config
from mmbalance.config import flatten_yaml, load_yaml
from mmbalance.errors import ConfigError
from mmbalance.methods.mcr import MCRParams


def test_the_resolved_configuration_holds_built_options() -> None:
    run = resolve_config({**TINY, "method": "mcr", "method.lam": 2, "fusion": "concat_mlp"})
    assert isinstance(run, ResolvedConfig)
    assert isinstance(run.method.params, MCRParams)
    assert run.method.params.lam == 2.0 and isinstance(run.method.params.lam, float)
    # the fusion head's options: every keyword of its constructor, the defaults included
    assert run.fusion.params == {"hidden": 128, "layers": 2, "dropout": 0.0}


def test_fit_builds_no_option_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once resolved, training a run (its directory checks, ``config.yaml``, the method, the
    model) builds no ``Params`` and checks no option again."""
    import mmbalance.builder.resolve
    import mmbalance.config
    import mmbalance.methods.base
    from mmbalance.train import fit

    run = resolve_config({**TINY, "method": "mcr", "method.lam": 2.0})

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an option was built again after the configuration was resolved")

    for module in (mmbalance.builder.resolve, mmbalance.config, mmbalance.methods.base):
        monkeypatch.setattr(module, "build_dataclass", refuse)
    result = fit(run, tmp_path / "run")
    assert result.epochs_run == 1
    monkeypatch.undo()
    saved = resolve_config(load_yaml(tmp_path / "run" / "config.yaml"))
    assert saved.identity() == run.identity()


def test_a_default_spelled_out_is_the_same_run() -> None:
    implicit = resolve_config({**TINY, "method": "mcr", "fusion": "concat_mlp"})
    spelled = {"method.lam": MCRParams().lam, "fusion.dropout": 0}  # an int for a float
    explicit = resolve_config({**TINY, "method": "mcr", "fusion": "concat_mlp", **spelled})
    assert implicit.identity() == explicit.identity()
    again = resolve_config(flatten_yaml(implicit.to_dict()))
    assert again.identity() == implicit.identity()
    assert implicit.with_option("method.lam", 2 * MCRParams().lam).identity() != explicit.identity()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fusion": "concat_mlp", "fusion.depth": 3}, "unknown fusion.concat_mlp key 'depth'"),
        ({"fusion": "concat_mlp", "fusion.hidden": "wide"}, "fusion.concat_mlp.hidden='wide'"),
        ({"encoder.m1": "mlp", "encoder.m1.width": 3}, "unknown encoder.m1 key 'width'"),
    ],
    ids=["fusion key", "fusion value", "encoder key"],
)
def test_head_and_encoder_options_are_checked_when_resolved(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config({**TINY, **overrides})


def test_a_changed_run_is_checked_again() -> None:
    run = resolve_config({**TINY, "method": "opm", "method.warmup_epochs": 1, "train.epochs": 3})
    assert run.with_train(seed=4).train.seed == 4
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        run.with_train(epochs=1)  # the warm-up now outlasts the run: OPM would never act
    with pytest.raises(ConfigError, match=r"train\.lr must be > 0"):
        run.with_option("train.lr", -1.0)
    with pytest.raises(ConfigError, match=r"unknown method\.opm key"):
        run.with_option("method.nope", 1)
    with pytest.raises(ConfigError, match="cannot set option"):
        run.with_option("unimodal_heads", True)


@pytest.mark.parametrize("key", ["train.epoch_analysis", "epoch_analysis"])
def test_the_old_name_of_the_curves_option_names_the_new_one(key: str, tmp_path: Path) -> None:
    message = "train key 'epoch_analysis' was renamed: use 'epoch_curves' instead"
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config({**TINY, key: False})
    saved = tmp_path / "old.yaml"
    saved.write_text("method: joint\ntrain:\n  epoch_analysis: false\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(load_yaml(saved))
    assert resolve_config({**TINY, "train.epoch_curves": False}).train.epoch_curves is False
