"""Frozen copies of parts of a model, kept in a method's state: the unimodal teachers of UMT and
G2D, taken at ``on_train_start`` and restored by a resume."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn


class FrozenTeachers:
    """Named frozen modules: snapshot weights until the modules are first needed, then deep
    copies of a template (for their architecture and device) loaded with them, never optimised
    and always in eval mode. Not registered in any module, so no optimizer reaches them."""

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Tensor]] | None = None
        self._modules: dict[str, nn.Module] | None = None

    def capture(self, modules: Mapping[str, nn.Module]) -> None:
        """Snapshot the weights of ``modules`` as they are now."""
        self._state = {
            name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in modules.items()
        }
        self._modules = None

    @property
    def built(self) -> dict[str, nn.Module] | None:
        """The frozen modules, once :meth:`modules` has built them."""
        return self._modules

    def modules(self, template: Callable[[], Mapping[str, nn.Module]]) -> dict[str, nn.Module]:
        """The frozen modules, built on first use from ``template()`` and the snapshot (without
        one, copies of the template as it is)."""
        if self._modules is None:
            built = {}
            for name, module in template().items():
                frozen = copy.deepcopy(module)
                if self._state is not None:
                    frozen.load_state_dict(self._state[name])
                frozen.requires_grad_(False)
                built[name] = frozen.eval()
            self._modules = built
            self._state = None  # the modules hold the weights from now on
        return self._modules

    def state_dict(self) -> dict[str, Any] | None:
        """The weights by name (``None`` before anything was captured)."""
        if self._modules is not None:
            return {name: dict(m.state_dict()) for name, m in self._modules.items()}
        return self._state

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]] | None) -> None:
        """Restore what :meth:`state_dict` returned; the modules are rebuilt on next use."""
        self._state = None if state is None else {n: dict(s) for n, s in state.items()}
        self._modules = None
