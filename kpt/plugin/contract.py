"""The plugin contract (DESIGN §5): what a domain plugin is, and the check that an object is one.

A domain plugin is one :class:`Plugin` object; its ``build_data`` returns a :class:`TaskData`.
:func:`validate_plugin` lists every way an object breaks the contract. How plugins are found and
loaded is :mod:`kpt.plugin.discovery`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import Tensor, nn
    from torch.utils.data import Dataset, Sampler

    from kpt.config import Config

PLUGIN_API_VERSION = 1
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
    load_weights: Callable[[Path, Config], nn.Module | None] | None = None


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
    if obj.load_weights is not None and not callable(obj.load_weights):
        problems.append("load_weights must be callable or None")
    return [f"{where}: {p}" for p in problems]
