"""Plugins: the user's own datasets, encoders, fusion heads and methods, without editing mmbalance.

A plugin is a Python module that registers components with the same decorators as the built-ins
(``@DATASETS.register("name")``, ``ENCODERS.register("name")(factory)``,
``@FUSION_HEADS.register``, ``@METHODS.register``). It is imported only when the user names it
on the command that runs:

* ``--plugin my_module`` or ``--plugin path/to/my_plugin.py`` on any command (repeatable);
* ``plugins: [my_module, path/to/my_plugin.py]`` in a YAML config that the user passes on the
  command line (a relative path is relative to that YAML file);
* the entry-point group ``mmbalance.plugins`` of an installed package, loaded by every command.
  Installing a package is the user's own act on their own environment, and an installed
  package's code already runs whenever anything imports it; a run directory, a shared
  ``config.yaml`` or a results file can neither install a package nor add an entry point, so
  loading entry points adds no way for a file someone else wrote to run code.

A run directory records its plugins (module, file, SHA-256 of the source, and the components
each provides) in ``config.yaml`` and ``provenance.json``, but ``evaluate``, ``--resume``,
``report`` and ``compare`` never import a plugin named only there (nor one named by a YAML file
that the user did not pass): :func:`expect_recorded` turns the record into hints, so a missing
component is a one-line error saying which plugin provides it and how to pass it. A DDP worker
loads the plugins its parent was given (:func:`loaded_specs`, :func:`load_specs`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.registry import all_registries, expect, forget_expected, registering_as

#: The entry-point group of installed plugins.
ENTRY_POINT_GROUP = "mmbalance.plugins"
#: Prefix of the module names under which plugin files are imported.
FILE_MODULE_PREFIX = "mmbalance_plugin_"


@dataclass
class Plugin:
    """A loaded plugin.

    Attributes:
        name: the plugin's name as the user knows it (module name or file stem).
        module: the module it was imported as.
        file: its source file (None for a module without one).
        sha256: SHA-256 of that file's bytes.
        how: how it was given (``--plugin``, ``config``, ``entry point``, ``python``).
        spec: what reloads it: the file path or the module name.
        provides: component kind -> names it registered.
    """

    name: str
    module: str
    file: str | None
    sha256: str | None
    how: str
    spec: str
    provides: dict[str, list[str]] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        """How ``mmbalance list`` and clash errors name it."""
        where = self.file or f"module {self.module}"
        return f"plugin {self.name} ({where})"

    def record(self) -> dict[str, Any]:
        """What ``config.yaml`` and ``provenance.json`` record of it."""
        return {
            "name": self.name,
            "module": self.module,
            "file": self.file,
            "sha256": self.sha256,
            "loaded_by": self.how,
            "provides": {k: list(v) for k, v in self.provides.items()},
        }


#: Loaded plugins by module name, in load order.
_LOADED: dict[str, Plugin] = {}
_ENTRY_POINTS_LOADED = False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _provided(origin: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for registry in all_registries():
        names = registry.registered_by(origin)
        if names:
            out.setdefault(registry.kind, []).extend(names)
    return out


def _import(plugin: Plugin, run: Any) -> Plugin:
    """Run ``run()`` (the import) with ``plugin``'s origin on every name it registers; an error
    inside it unregisters what it registered and is one line naming the plugin."""
    try:
        with registering_as(plugin.origin):
            run()
    except MMBalanceError as err:
        _unload(plugin)
        text = str(err) if plugin.origin in str(err) else f"plugin {plugin.name}: {err}"
        raise ConfigError(text) from None
    except Exception as err:
        _unload(plugin)
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(
            f"plugin {plugin.name} ({plugin.file or plugin.module}) failed to import: "
            f"{type(err).__name__}{': ' + text if text else ''}"
        ) from None
    plugin.provides = _provided(plugin.origin)
    _LOADED[plugin.module] = plugin
    return plugin


def _unload(plugin: Plugin) -> None:
    for registry in all_registries():
        for name in registry.registered_by(plugin.origin):
            registry.unregister(name)
    _LOADED.pop(plugin.module, None)
    sys.modules.pop(plugin.module, None)


def load_plugin(spec: str, how: str = "--plugin", base: Path | None = None) -> Plugin:
    """Import the plugin ``spec`` (an importable module or a ``.py`` file; a relative path is
    relative to ``base`` when given) unless it is loaded already; one-line errors."""
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("--plugin needs a module name or a .py file")
    if _is_path(spec):
        path = Path(spec).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise ConfigError(f"plugin file {str(path)!r} does not exist")
        path = path.resolve()
        module = FILE_MODULE_PREFIX + re.sub(r"\W", "_", path.stem)
        loaded = _LOADED.get(module)
        if loaded is not None:
            if loaded.file != str(path):
                raise ConfigError(
                    f"plugin files {loaded.file!r} and {str(path)!r} have the same name; "
                    "rename one of them"
                )
            return loaded
        plugin = Plugin(path.stem, module, str(path), _sha256(path), how, str(path))
        module_spec = importlib.util.spec_from_file_location(module, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"plugin file {str(path)!r} cannot be imported as Python")

        def run() -> None:
            new = importlib.util.module_from_spec(module_spec)
            sys.modules[module] = new
            module_spec.loader.exec_module(new)  # type: ignore[union-attr]

        return _import(plugin, run)
    if spec in _LOADED:
        return _LOADED[spec]
    if not re.fullmatch(r"[A-Za-z_][\w.]*", spec):
        raise ConfigError(f"plugin {spec!r} is neither a module name nor a .py file")
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError(
            f"plugin module {spec!r} is not importable; pass a .py file "
            "(--plugin path/to/plugin.py) or install the package that has it"
        )
    file = found.origin if found.origin and Path(found.origin).is_file() else None
    digest = _sha256(Path(file)) if file else None
    plugin = Plugin(spec.rpartition(".")[2], spec, file, digest, how, spec)
    if spec in sys.modules:
        # imported already (by the user's own script): its names carry their module's origin
        plugin.provides = {}
        for registry in all_registries():
            names = registry.reassign(f"module {spec}", plugin.origin)
            if names:
                plugin.provides[registry.kind] = names
        _LOADED[spec] = plugin
        return plugin
    return _import(plugin, lambda: importlib.import_module(spec))


def load_plugins(specs: Iterable[str], how: str = "--plugin", base: Path | None = None) -> list:
    """:func:`load_plugin` of each spec, in order."""
    return [load_plugin(s, how, base) for s in specs]


def load_entry_points() -> list[Plugin]:
    """Import the installed plugins (entry-point group ``mmbalance.plugins``) once per process.

    An entry point names a module (``name = package.module``) whose import registers its
    components, or a function (``package.module:register``) that is called to register them.
    """
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return [p for p in _LOADED.values() if p.how == "entry point"]
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module = ep.module
        if module in _LOADED:
            continue
        found = importlib.util.find_spec(module) if module not in sys.modules else None
        origin = getattr(found, "origin", None) or getattr(
            sys.modules.get(module), "__file__", None
        )
        file = origin if origin and Path(origin).is_file() else None
        dist = getattr(ep.dist, "name", None) or "?"
        plugin = Plugin(
            ep.name,
            module,
            file,
            _sha256(Path(file)) if file else None,
            "entry point",
            module,
        )

        def run(ep: Any = ep) -> None:
            loaded = ep.load()
            if ep.attr and callable(loaded):
                loaded()

        try:
            out.append(_import(plugin, run))
        except ConfigError as err:
            raise ConfigError(
                f"{err} (installed by the package {dist}, entry point group "
                f"{ENTRY_POINT_GROUP}); uninstall it or fix it"
            ) from None
    return out


def loaded() -> list[Plugin]:
    """The plugins loaded in this process, in load order."""
    return list(_LOADED.values())


def loaded_specs() -> list[tuple[str, str]]:
    """``(spec, how)`` of every loaded plugin: what a DDP worker loads to see what its parent
    sees (entry points are loaded again by :func:`load_specs`)."""
    return [(p.spec, p.how) for p in _LOADED.values() if p.how != "entry point"]


def load_specs(specs: Sequence[tuple[str, str]]) -> None:
    """Load the entry points and the plugins of :func:`loaded_specs` (in a DDP worker)."""
    load_entry_points()
    for spec, how in specs:
        load_plugin(spec, how)


def records() -> list[dict[str, Any]]:
    """:meth:`Plugin.record` of every loaded plugin (``config.yaml``, ``provenance.json``)."""
    return [p.record() for p in _LOADED.values()]


def expect_recorded(recorded: Any, where: str) -> None:
    """Turn the plugins a run directory or a YAML file records (``where``) into hints for
    unknown names, without importing anything: a component of a plugin that is not loaded is
    then a one-line error naming the plugin and how to pass it."""
    if not isinstance(recorded, list):
        return
    for entry in recorded:
        if not isinstance(entry, Mapping):
            continue
        name = str(entry.get("name") or entry.get("module") or "?")
        spec = entry.get("file") or entry.get("module") or name
        hint = (
            f"it comes from the plugin {name}, which {where} names but this command was not "
            f"given (a plugin named only by a file is never imported); pass --plugin {spec}"
        )
        provides = entry.get("provides")
        if isinstance(provides, Mapping):
            for kind, names in provides.items():
                for component in names if isinstance(names, list) else []:
                    expect(str(kind), str(component), hint)


def split_plugins(flat: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(plugins, the other keys)`` of flat config keys (``plugins`` is no run option)."""
    rest = dict(flat)
    return rest.pop("plugins", None), rest


def plugin_specs(value: Any, where: str) -> list[str]:
    """The plugins a YAML file's ``plugins:`` names: module names, ``.py`` paths, or the
    records a run directory's ``config.yaml`` holds (their file, else their module)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"plugins in {where} must be a list of modules or .py files")
    out = []
    for entry in value:
        if isinstance(entry, Mapping):  # a run's record: its file, else its module
            if entry.get("loaded_by") == "entry point":
                continue  # installed: every command loads it
            entry = entry.get("file") or entry.get("module")
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"plugins in {where} must be a list of modules or .py files")
        out.append(entry)
    return out


def reset() -> None:
    """Unload every plugin (unregister its names, forget its module) and every hint; for tests
    and notebooks that load plugins again."""
    global _ENTRY_POINTS_LOADED
    for plugin in list(_LOADED.values()):
        _unload(plugin)
    _ENTRY_POINTS_LOADED = False
    forget_expected()
