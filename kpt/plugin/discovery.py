"""Plugin discovery: which plugins are installed, and loading one by name.

Built-ins are listed in ``registry.yaml``; third parties declare an entry point in the group
``kpt.plugins`` (``pip install kpt-plugin-xyz`` makes ``kpt train xyz`` work). Discovery imports
nothing: a plugin module is imported when that plugin is used or listed. A plugin that fails to import
or to validate is reported as broken (never crashes the CLI), and a third-party plugin that claims a
built-in's name is reported as a conflict and not used.

Importing this module also hands the component registry its source of third-party components
(:func:`kpt.registry.add_component_hook`), so that the registry never imports the plugin machinery.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from kpt._names import did_you_mean, import_object
from kpt.plugin.contract import Plugin, PluginError, validate_plugin
from kpt.registry import add_component_hook, read_registry_yaml

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kpt.plugins"


@dataclass
class PluginEntry:
    """A discovered plugin, not necessarily imported yet.

    Attributes:
        name: the domain name.
        target: ``"module:attr"`` of the Plugin object.
        builtin: listed in kpt's registry.yaml (else: an entry point).
        package: the distribution that provides it (``kpt`` for built-ins).
        status: ``"unloaded"``, ``"ok"``, ``"broken"`` or ``"conflict"``.
        error: why it is broken / conflicting.
    """

    name: str
    target: str
    builtin: bool
    package: str
    status: str = "unloaded"
    error: str = ""
    plugin: Plugin | None = None

    @property
    def where(self) -> str:
        kind = "built-in" if self.builtin else "third-party"
        return f"plugin {self.name!r} ({kind}, package {self.package}, object {self.target})"

    def load(self, raise_errors: bool = True) -> Plugin | None:
        """Import and validate the plugin; on failure mark it broken (and raise PluginError)."""
        if self.status == "unloaded":
            try:
                obj = import_object(self.target, what=self.where)
                problems = validate_plugin(obj, self.where)
                if not problems and obj.name != self.name:
                    problems = [f"{self.where}: registered as {self.name!r} but named {obj.name!r}"]
                if problems:
                    raise PluginError("; ".join(problems))
                self.plugin, self.status = obj, "ok"
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - broken third-party code (even one calling
                # sys.exit() while it is imported) must not crash kpt: it is listed as broken
                self.status = "broken"
                self.error = str(exc) if not isinstance(exc, SystemExit) else (
                    f"{self.where}: called sys.exit({exc.code!r}) while loading")
                logger.debug("%s", exc)
        if self.status != "ok" and raise_errors:
            raise PluginError(self.error)
        return self.plugin


_DISCOVERED: dict[str, PluginEntry] | None = None
_REJECTED: list[PluginEntry] = []


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def discover_plugins(refresh: bool = False) -> dict[str, PluginEntry]:
    """All usable plugin names -> entries (built-ins first). Imports nothing.

    Third-party entry points that clash with a built-in or with each other are kept out and listed by
    :func:`rejected_plugins` with status ``"conflict"``.
    """
    global _DISCOVERED
    if _DISCOVERED is not None and not refresh:
        return _DISCOVERED
    found: dict[str, PluginEntry] = {}
    _REJECTED.clear()
    for name, entry in read_registry_yaml().items():
        found[name] = PluginEntry(name, entry["object"], builtin=True, package="kpt")
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "unknown"
        entry = PluginEntry(ep.name, ep.value, builtin=False, package=package)
        if ep.name in found:
            other = found[ep.name]
            if other.target == ep.value:  # the same plugin seen twice (e.g. two sys.path entries)
                continue
            entry.status = "conflict"
            entry.error = (f"{entry.where} wants the name {ep.name!r}, already taken by "
                           f"{other.where}; it is ignored. Rename its entry point.")
            logger.warning("%s", entry.error)
            _REJECTED.append(entry)
            continue
        found[ep.name] = entry
    _DISCOVERED = found
    return found


def rejected_plugins() -> list[PluginEntry]:
    """Entry points that were not used because their name was taken."""
    discover_plugins()
    return list(_REJECTED)


def load_plugin(name: str) -> Plugin:
    """Import, validate and return the plugin ``name``.

    Raises:
        PluginError: unknown name (with "did you mean" and the list), broken plugin, or contract violation.
    """
    found = discover_plugins()
    if name not in found:
        avail = ", ".join(sorted(found)) or "none"
        raise PluginError(f"unknown plugin {name!r}.{did_you_mean(name, found)} Installed: {avail}. "
                          f"See `kpt plugins`.")
    plugin = found[name].load(raise_errors=True)
    assert plugin is not None
    return plugin


def list_plugins(load: bool = True) -> list[PluginEntry]:
    """Every discovered plugin (loaded when ``load``), then the rejected ones, sorted by name."""
    entries = list(discover_plugins().values())
    if load:
        for entry in entries:
            entry.load(raise_errors=False)
    return sorted(entries, key=lambda e: e.name) + rejected_plugins()


def plugin_module_dir(plugin: Plugin) -> Path:
    """Folder of the module that defines ``plugin`` (base of a relative ``default_config`` path)."""
    for entry in (_DISCOVERED or {}).values():
        if entry.plugin is plugin:
            module = sys.modules.get(entry.target.partition(":")[0])
            if module is not None and getattr(module, "__file__", None):
                return Path(module.__file__).parent
    fn = plugin.build_data
    source = inspect.getsourcefile(fn) if callable(fn) else None
    return Path(source).parent if source else Path.cwd()


def _third_party_components() -> list[tuple[Mapping, str]]:
    """``(components, source)`` of every usable third-party plugin (imports their plugin objects).

    Built-ins list their components in registry.yaml, which the registry reads itself.
    """
    found = []
    for entry in discover_plugins().values():
        if entry.builtin:
            continue
        plugin = entry.load(raise_errors=False)
        if plugin is None:
            logger.warning("skipping the components of a broken plugin: %s", entry.error)
        else:
            found.append((dict(getattr(plugin, "components", {}) or {}),
                          f"plugin {entry.name} ({entry.package})"))
    return found


add_component_hook(_third_party_components)
