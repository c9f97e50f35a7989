"""The engine of a run: the devices, the precision and the processes it trains on.

:func:`check_engine` refuses settings that this machine cannot run before any process starts;
:func:`make_fabric` builds the Lightning Fabric of the settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmbalance.builder.resolve import ResolvedConfig
from mmbalance.errors import ConfigError

if TYPE_CHECKING:
    from lightning.fabric import Fabric


def _runs_on_cpu(cfg: ResolvedConfig) -> bool:
    import torch

    t = cfg.train
    return t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())


def check_engine(cfg: ResolvedConfig) -> None:
    """Refuse engine settings this machine cannot run, before any process is started (an error
    inside spawned workers would reach the user as tracebacks, a missing node as a hang)."""
    import torch

    t = cfg.train
    if t.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.accelerator={t.accelerator} but CUDA is not available on this machine; "
            "use train.accelerator=cpu (or auto)"
        )
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.accelerator=mps but MPS is not available on this machine")
    on_cpu = _runs_on_cpu(cfg)
    if on_cpu and t.precision == "16-mixed":
        # Lightning would silently switch to bf16-mixed: refuse instead of training another run
        raise ConfigError(
            "train.precision=16-mixed needs a CUDA GPU (mixed precision on CPU is bfloat16); "
            "use train.precision=bf16-mixed or 32-true"
        )
    if on_cpu and t.num_nodes > 1:
        raise ConfigError(
            f"train.num_nodes={t.num_nodes}: CPU training runs its processes on this one "
            "machine (train.devices); several nodes need GPUs started by a cluster launcher"
        )
    if not on_cpu and t.accelerator != "mps" and t.devices > torch.cuda.device_count():
        raise ConfigError(
            f"train.devices={t.devices} but this machine has {torch.cuda.device_count()} GPUs"
        )
    world = t.devices * t.num_nodes
    if t.batch_size % world:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by the {world} processes "
            "(train.devices x train.num_nodes)"
        )


def make_fabric(cfg: ResolvedConfig) -> Fabric:
    """The Lightning Fabric of ``cfg``'s engine settings (DDP over gloo processes on CPU, one
    process per GPU otherwise); settings Lightning refuses are a one-line ConfigError."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    t = cfg.train
    world = t.devices * t.num_nodes
    strategy: Any = "auto"
    if world > 1:
        cpu = _runs_on_cpu(cfg)
        strategy = DDPStrategy(
            find_unused_parameters=True,
            start_method="spawn" if cpu else "popen",
            process_group_backend="gloo" if cpu else None,
        )
    try:
        return Fabric(
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=strategy,
            precision=t.precision,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"the train engine settings cannot run here: {first}") from None
