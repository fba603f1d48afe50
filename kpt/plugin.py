"""The plugin contract (DESIGN §5) and plugin discovery.

A domain plugin is one :class:`Plugin` object. Built-ins are listed in ``registry.yaml``; third parties
declare an entry point in the group ``kpt.plugins`` (``pip install kpt-plugin-xyz`` makes
``kpt train xyz`` work). Discovery imports nothing: a plugin module is imported when that plugin is used or
listed. A plugin that fails to import or to validate is reported as broken (never crashes the CLI), and a
third-party plugin that claims a built-in's name is reported as a conflict and not used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpt.registry import did_you_mean, import_object, read_registry_yaml

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
    from torch.utils.data import Dataset, Sampler

    from kpt.config import Config

logger = logging.getLogger(__name__)

PLUGIN_API_VERSION = 1
ENTRY_POINT_GROUP = "kpt.plugins"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass
class TaskData:
    """What ``Plugin.build_data`` returns.

    Attributes:
        train: training set; items are dicts of tensors with at least ``"image"`` (C,H,W),
            ``"keypoints"`` (K,2) or (T,K,2) in [0,1], ``"label"`` ().
        evals: named evaluation sets, consumed only by the plugin's ``evaluate``.
        info: plain data (ints, floats, strings, lists, dicts) such as ``num_classes``; saved in
            checkpoints and passed to ``build_model``.
        batch_sampler: optional ``(dataset, batch_size, seed, rank, world_size) -> batch sampler``
            (e.g. :class:`kpt.data.samplers.PKBatchSampler`); ``batch_size`` is the per-process batch.
            The sampler may define ``set_epoch(epoch)``. Default: a shuffled sampler sharded over ranks.
        collate_fn: optional collate function for the DataLoader.
    """

    train: Dataset
    evals: dict[str, object] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    batch_sampler: Callable[..., Sampler] | None = None
    collate_fn: Callable | None = None


@dataclass(frozen=True)
class Plugin:
    """One domain: data, model, loss and evaluation protocol.

    Attributes:
        name: the domain name (``kpt train <name>``): lowercase letters, digits, ``_`` or ``-``.
        description: one line shown by ``kpt plugins``.
        default_config: path of a YAML file (relative to the module that defines the plugin) or a nested
            mapping; every value typed; sections ``model``, ``data``, ``train``, ``eval`` (+ own).
        build_data: ``(cfg) -> TaskData``.
        build_model: ``(cfg, data.info) -> nn.Module`` (backbone + head; what is trained and saved).
        training_step: ``(model, batch on device, cfg) -> loss`` or ``(loss, {name: float})``.
        evaluate: ``(model, data, cfg, device) -> {metric: float}`` (flat).
        datasets: names accepted by ``--data`` / ``--test``.
        keypoint_sources: name -> ``"module:attr"``.
        commands: ``"data get"``, ``"data prepare"``, ``"data validate"``, ``"predict"``, ``"eval"``
            -> ``fn(argv_rest) -> exit code``.
        primary_metric: metric choosing ``best.pt`` (higher is better); empty: no best.pt.
        api_version: the contract version the plugin was written for.
        components: ``{kind: {name: "module:attr"}}`` registered lazily (third parties; built-ins list
            them in registry.yaml).
        check_config: dotted overrides applied by ``kpt plugins check`` to make the dry run tiny,
            e.g. ``{"data.name": "synthetic", "model.depth": 1}``.
        choices: allowed values of enumerated config keys, ``{"model.pos": ("none", "kprpe")}``;
            the config is checked against them when it is built (an unknown value is an error with
            a "did you mean"). For a list-valued key every item must be a choice.
    """

    name: str
    description: str
    default_config: str | Mapping
    build_data: Callable[[Config], TaskData]
    build_model: Callable[[Config, dict], nn.Module]
    training_step: Callable[[nn.Module, dict, Config], Tensor | tuple[Tensor, dict[str, float]]]
    evaluate: Callable[[nn.Module, TaskData, Config, torch.device], dict[str, float]]
    datasets: tuple[str, ...] = ()
    keypoint_sources: Mapping[str, str] = field(default_factory=dict)
    commands: Mapping[str, Callable[[list[str]], int]] = field(default_factory=dict)
    primary_metric: str = ""
    api_version: int = PLUGIN_API_VERSION
    components: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    check_config: Mapping[str, Any] = field(default_factory=dict)
    choices: Mapping[str, Sequence[Any]] = field(default_factory=dict)


class PluginError(RuntimeError):
    """A plugin is unknown, broken, conflicting or violates the contract."""


_KNOWN_COMMANDS = ("data get", "data prepare", "data validate", "predict", "embed", "eval")


def validate_plugin(obj: Any, where: str) -> list[str]:
    """List every contract violation of ``obj``; ``where`` names the plugin and its package.

    Returns:
        Problems as sentences (empty when the plugin is valid).
    """
    if not isinstance(obj, Plugin):
        got = f"{type(obj).__module__}.{type(obj).__qualname__}"
        return [f"{where}: expected a kpt.plugin.Plugin, got {got}"]
    problems = []
    if not isinstance(obj.name, str) or not _NAME_RE.match(obj.name):
        problems.append(f"name {obj.name!r} must be lowercase letters, digits, '_' or '-'")
    if obj.api_version != PLUGIN_API_VERSION:
        problems.append(f"api_version {obj.api_version} is not supported by this kpt "
                        f"(PLUGIN_API_VERSION {PLUGIN_API_VERSION})")
    for attr in ("build_data", "build_model", "training_step", "evaluate"):
        if not callable(getattr(obj, attr)):
            problems.append(f"{attr} must be callable, got {type(getattr(obj, attr)).__name__}")
    if not isinstance(obj.default_config, (str, Mapping)):
        problems.append("default_config must be a YAML path or a mapping")
    if not isinstance(obj.datasets, (tuple, list)) or not all(isinstance(d, str) for d in obj.datasets):
        problems.append("datasets must be a tuple of names")
    for key, target in dict(obj.keypoint_sources).items():
        if not isinstance(target, str) or ":" not in target:
            problems.append(f"keypoint_sources[{key!r}] must be 'module:attr', got {target!r}")
    for key, fn in dict(obj.commands).items():
        if key not in _KNOWN_COMMANDS:
            problems.append(f"commands[{key!r}] is not one of {', '.join(_KNOWN_COMMANDS)}")
        elif not callable(fn):
            problems.append(f"commands[{key!r}] must be callable")
    for kind, names in dict(obj.components).items():
        if not isinstance(names, Mapping) or not all(isinstance(t, str) and ":" in t
                                                     for t in names.values()):
            problems.append(f"components[{kind!r}] must map name -> 'module:attr'")
    if not isinstance(obj.primary_metric, str):
        problems.append("primary_metric must be a string")
    if not isinstance(obj.choices, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and v
            for k, v in dict(obj.choices).items()):
        problems.append("choices must map a dotted config key -> a non-empty list of values")
    return [f"{where}: {p}" for p in problems]


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
    import inspect
    import sys

    for entry in (_DISCOVERED or {}).values():
        if entry.plugin is plugin:
            module = sys.modules.get(entry.target.partition(":")[0])
            if module is not None and getattr(module, "__file__", None):
                return Path(module.__file__).parent
    fn = plugin.build_data
    source = inspect.getsourcefile(fn) if callable(fn) else None
    return Path(source).parent if source else Path.cwd()
