"""Named-component registries: ``kpt.create(kind, name, **kw)`` and ``kpt.list(kind)``.

One :class:`Registry` per kind of component (model, head, keypoints, dataset, metric, ...). Each registry
states its contract in ``doc``; ``create`` checks what it built against an optional ``check`` callable, in the
detectron2 spirit. Components come from three places, the first two of them lazily:

* ``registry.yaml`` (shipped with kpt): built-in plugins list ``components: {kind: {name: "module:attr"}}``;
  the module is imported only when the name is created.
* Third-party plugins (entry-point group ``kpt.plugins``) list the same mapping in ``Plugin.components``.
  They are loaded only when a name is not found among the built-ins, or when everything is listed,
  through the hook :mod:`kpt.plugin` installs (:func:`add_component_hook`): this module imports no
  plugin machinery.
* ``@registry.register()`` decorators in code that is imported (``kpt.models`` registers its backbones).

A third party never silently replaces a built-in: the clash is logged and recorded in
:data:`CONFLICTS`, and the built-in keeps the name.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from kpt._names import did_you_mean, import_object

logger = logging.getLogger(__name__)

REGISTRY_YAML = Path(__file__).with_name("registry.yaml")

# Modules imported before a registry of that kind is searched, so that decorator registrations exist.
# The core registers its own components; plugins are never imported by name here.
_CORE_MODULES: dict[str, tuple[str, ...]] = {"model": ("kpt.models",), "metric": ("kpt.metrics",)}

#: Clashes found while loading components: human-readable lines, also logged as warnings.
CONFLICTS: list[str] = []


class RegistryError(KeyError):
    """An unknown name, or a component that could not be imported or built."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


_BUILTIN_MODULES = ("kpt", "kpt_plugins")


def _module_is_builtin(module: str) -> bool:
    """Whether ``module`` is part of kpt itself (the core or an in-tree plugin)."""
    return module.partition(".")[0] in _BUILTIN_MODULES


def _record_conflict(msg: str) -> None:
    if msg not in CONFLICTS:
        CONFLICTS.append(msg)
        logger.warning(msg)


class _Lazy:
    """A component known by its import path, imported on first use."""

    def __init__(self, target: str, source: str) -> None:
        self.target = target
        self.source = source

    def resolve(self, kind: str, name: str) -> Any:
        return import_object(self.target, what=f"{kind} {name!r} (from {self.source})")


class Registry:
    """Name -> constructor mapping for one kind of component.

    Args:
        kind: the kind, as used in ``kpt.create(kind, name)``.
        doc: the contract every registered component fulfils (shown by ``kpt plugins`` and in errors).
        check: optional ``check(obj, name) -> None`` run on what ``create`` built; raises on a violation.
    """

    def __init__(self, kind: str, doc: str, check: Callable[[Any, str], None] | None = None) -> None:
        self.kind = kind
        self.doc = doc
        self.check = check
        self._entries: dict[str, Any] = {}
        self._sources: dict[str, str] = {}

    # -- registration -------------------------------------------------------------------------------
    def register(self, name: str | Callable | None = None, *, source: str = "code",
                 override: bool = False) -> Callable:
        """Decorator registering a class or factory function under ``name`` (default: its ``__name__``).

        Usable as ``@reg.register()``, ``@reg.register("name")`` or ``@reg.register``. Registering a
        different object under a taken name raises unless ``override=True`` (re-importing the same
        module re-registers the same qualified object, which is accepted).
        """
        if callable(name) and not isinstance(name, str):
            return self.register(None, source=source, override=override)(name)

        def decorator(obj: Callable) -> Callable:
            key = name or obj.__name__
            self._add(key, obj, source, override)
            return obj

        return decorator

    def register_lazy(self, name: str, target: str, source: str) -> bool:
        """Register ``"module:attr"`` under ``name`` without importing it.

        A name that is already taken keeps its first owner; the clash is recorded in :data:`CONFLICTS`.

        Returns:
            True when registered, False on a clash.
        """
        if name in self._entries:
            if isinstance(self._entries[name], _Lazy) and self._entries[name].target == target:
                return True
            new_builtin = _module_is_builtin(target.partition(":")[0])
            if new_builtin and not self._is_builtin(name):
                # a third party got the name first (its module was imported early): kpt's own wins
                _record_conflict(f"{self.kind} {name!r} from {self._describe(name)} conflicts with "
                                 f"the built-in one from {source}; keeping the built-in one from "
                                 f"{source}")
            else:
                _record_conflict(f"{self.kind} {name!r} from {source} conflicts with the one from "
                                 f"{self._describe(name)}; keeping the one from "
                                 f"{self._describe(name)}")
                return False
        self._entries[name] = _Lazy(target, source)
        self._sources[name] = source
        return True

    def _is_builtin(self, name: str) -> bool:
        """Whether the entry ``name`` comes from kpt itself (core or an in-tree plugin)."""
        entry = self._entries[name]
        module = entry.target.partition(":")[0] if isinstance(entry, _Lazy) else getattr(
            entry, "__module__", "") or ""
        return _module_is_builtin(module)

    def _describe(self, name: str) -> str:
        """Where the entry ``name`` came from, for conflict lines."""
        entry, source = self._entries[name], self._sources.get(name, "")
        if source != "code" or isinstance(entry, _Lazy):
            return source
        return f"module {getattr(entry, '__module__', '?')}"

    def _add(self, key: str, obj: Any, source: str, override: bool) -> None:
        old = self._entries.get(key)
        new_builtin = _module_is_builtin(getattr(obj, "__module__", "") or "")
        if old is not None and new_builtin != self._is_builtin(key):
            # A third party never replaces a built-in, override or not, whichever registers first
            # (a plugin module may be imported before kpt's own registering module).
            where = f"module {getattr(obj, '__module__', '?')}" if source == "code" else source
            if new_builtin:
                _record_conflict(f"{self.kind} {key!r} from {self._describe(key)} conflicts with "
                                 f"the built-in one from {where}; keeping the built-in one from "
                                 f"{where}")
            else:
                _record_conflict(f"{self.kind} {key!r} from {where} conflicts with the built-in "
                                 f"one from {self._describe(key)}; keeping the built-in one from "
                                 f"{self._describe(key)}")
                return
        elif old is not None and not override:
            same = (not isinstance(old, _Lazy)
                    and getattr(old, "__qualname__", None) == getattr(obj, "__qualname__", 0)
                    and getattr(old, "__module__", None) == getattr(obj, "__module__", 0))
            lazy_same = isinstance(old, _Lazy) and old.target.replace(":", ".").endswith(
                f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
            if not (same or lazy_same):
                raise RegistryError(f"{self.kind} {key!r} is already registered (by "
                                    f"{self._sources.get(key)}); pick another name")
            source = self._sources.get(key, source) if lazy_same else source
        self._entries[key] = obj
        self._sources[key] = source

    # -- lookup -------------------------------------------------------------------------------------
    def _ensure_loaded(self, name: str | None = None) -> None:
        for module in _CORE_MODULES.get(self.kind, ()):
            try:
                importlib.import_module(module)
            except ImportError as exc:  # core package not built yet: its names are simply absent
                logger.debug("cannot import %s: %s", module, exc)
        load_builtin_components()
        if name is None or name not in self._entries:
            load_plugin_components()

    def get(self, name: str) -> Any:
        """Return the registered class/factory (importing it if it is lazy)."""
        self._ensure_loaded(name)
        if name not in self._entries:
            avail = ", ".join(sorted(self._entries)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} "
                                f"Available: {avail}.")
        entry = self._entries[name]
        if isinstance(entry, _Lazy):
            entry = entry.resolve(self.kind, name)
            self._entries[name] = entry
        return entry

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the component ``name`` with ``kwargs`` and run the registry's check on it."""
        obj = self.get(name)(**kwargs)
        if self.check is not None:
            self.check(obj, name)
        return obj

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the shell-style ``pattern``."""
        self._ensure_loaded()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def source(self, name: str) -> str:
        """Where ``name`` was registered from (``"code"``, ``"builtin plugin mnist"``, ...)."""
        return self._sources.get(name, "")

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded(str(name))
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _check_module(obj: Any, name: str) -> None:
    from torch import nn

    if not isinstance(obj, nn.Module):
        raise RegistryError(f"{name!r} built a {type(obj).__name__}, expected a torch.nn.Module")


MODELS = Registry("model", "Backbone: model(images (B,C,H,W), keypoints (B,K,2) in [0,1] | None) -> "
                           "Tensor (B, num_classes or embed_dim). Keyword arguments per DESIGN §4.",
                  check=_check_module)
HEADS = Registry("head", "Margin head: head(embeddings (B,D), labels (B,)) -> logits (B, num_classes), "
                         "scaled with the margin applied; parameter `weight` (num_classes, D).",
                 check=_check_module)
KEYPOINTS = Registry("keypoints", "Keypoint source: source(images) -> keypoints (B,K,2) (x, y) in [0,1] "
                                  "(optionally with found (B,) bool); never NaN.")
DATASETS = Registry("dataset", "Dataset factory: returns a torch Dataset whose items are dicts with at "
                               "least 'image', 'keypoints' and 'label'.")
METRICS = Registry("metric", "Metric function returning a flat dict of named floats.")

REGISTRIES: dict[str, Registry] = {r.kind: r for r in (MODELS, HEADS, KEYPOINTS, DATASETS, METRICS)}


def get_registry(kind: str, create_missing: bool = False) -> Registry:
    """Return the registry of ``kind``; plugins may declare new kinds (``create_missing=True``)."""
    if kind not in REGISTRIES and not create_missing:  # a kind that only plugins declare
        load_builtin_components()
        load_plugin_components()
    if kind not in REGISTRIES:
        if not create_missing:
            raise RegistryError(f"unknown component kind {kind!r}.{did_you_mean(kind, REGISTRIES)} "
                                f"Kinds: {', '.join(sorted(REGISTRIES))}.")
        REGISTRIES[kind] = Registry(kind, f"{kind} components registered by plugins.")
    return REGISTRIES[kind]


def read_registry_yaml(path: Path | str = REGISTRY_YAML) -> dict[str, dict[str, Any]]:
    """Read the built-in plugin table: ``{name: {"object": "module:attr", "components": {...}}}``.

    Accepts the short form ``name: "module:attr"`` too. Raises TypeError naming the file and field.
    """
    path = Path(path)
    if not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    plugins = raw.get("plugins") or {}
    if not isinstance(plugins, dict):
        raise TypeError(f"{path}: 'plugins' must map name -> entry, got {type(plugins).__name__}")
    table: dict[str, dict[str, Any]] = {}
    for name, entry in plugins.items():
        if isinstance(entry, str):
            entry = {"object": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("object"), str):
            raise TypeError(f"{path}: plugins.{name} needs 'object: module:attr'")
        comps = entry.get("components") or {}
        if not isinstance(comps, dict) or not all(isinstance(v, dict) for v in comps.values()):
            raise TypeError(f"{path}: plugins.{name}.components must map kind -> {{name: module:attr}}")
        table[str(name)] = {"object": entry["object"], "components": comps}
    return table


_BUILTINS_LOADED = False
_PLUGINS_LOADED = False


def register_components(components: dict, source: str) -> None:
    """Lazily register ``{kind: {name: "module:attr"}}`` from ``source`` (a plugin)."""
    for kind, names in (components or {}).items():
        registry = get_registry(str(kind), create_missing=True)
        for name, target in (names or {}).items():
            registry.register_lazy(str(name), str(target), source)


def load_builtin_components() -> None:
    """Register the components listed in registry.yaml (once; imports nothing)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for plugin_name, entry in read_registry_yaml().items():
        register_components(entry["components"], f"builtin plugin {plugin_name}")


#: Sources of third-party components, each ``() -> [(components, source), ...]`` with ``components``
#: as in :func:`register_components`. :mod:`kpt.plugin` adds the one that reads the installed plugins,
#: so that this module never imports plugin code (nor the plugin machinery) itself.
ComponentHook = Callable[[], Iterable[tuple[Mapping, str]]]
_COMPONENT_HOOKS: list[ComponentHook] = []


def add_component_hook(hook: ComponentHook) -> None:
    """Register a source of third-party components, read once by :func:`load_plugin_components`."""
    if hook not in _COMPONENT_HOOKS:
        _COMPONENT_HOOKS.append(hook)


def load_plugin_components() -> None:
    """Register the components of third-party plugins (once; imports their plugin objects)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for hook in tuple(_COMPONENT_HOOKS):  # (`list` is this module's public function)
        for components, source in hook():
            register_components(dict(components or {}), source)


def reset() -> None:
    """Forget lazily loaded state (tests use it after changing installed plugins)."""
    global _BUILTINS_LOADED, _PLUGINS_LOADED
    _BUILTINS_LOADED = _PLUGINS_LOADED = False
    CONFLICTS.clear()
    for registry in REGISTRIES.values():
        for name in [n for n, s in registry._sources.items() if s != "code"]:
            del registry._entries[name], registry._sources[name]


# -- the public functions (re-exported by kpt/__init__.py) --------------------------------------------
def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Build component ``name`` of ``kind`` ("model", "head", "keypoints", "dataset", "metric", ...)."""
    return get_registry(kind).create(name, **kwargs)


def list(kind: str | None = None, pattern: str = "*") -> dict[str, list[str]]:
    """``{kind: [names]}`` for one kind or all kinds."""
    kinds = [kind] if kind is not None else sorted(REGISTRIES)
    if kind is None:  # plugins may add kinds: load them before enumerating
        load_builtin_components()
        load_plugin_components()
        kinds = sorted(REGISTRIES)
    return {k: get_registry(k).list(pattern) for k in kinds}


def create_model(name: str, **kwargs: Any) -> Any:
    """Build a backbone by name (``"vit"``, ``"swin"`` or a registered preset) with ``kwargs``."""
    return MODELS.create(name, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching ``pattern``."""
    return MODELS.list(pattern)
