"""Typed configuration: plugin YAML defaults, then the chosen presets, then ``--config FILE``, then
dotted ``key=value`` overrides.

The type of every key is the type of its default. Later values are cast to it, so ``train.lr=1e-3`` is a
float even though PyYAML's YAML 1.1 resolver reads ``1e-3`` as a string (we parse YAML with a YAML 1.2-style
float/bool resolver and still never trust the parsed type). A key that is not in the defaults is an error
with a "did you mean"; a section whose default is an empty mapping is open and accepts any key.

The engine owns the ``train`` section: :data:`ENGINE_DEFAULTS` supplies every key a plugin leaves out.

A *preset* is a named set of config values a plugin declares in the ``presets:`` section of its default
config (an official training recipe, a dataset's schedule, an official model's settings). It is chosen
explicitly (``preset=NAME`` / ``--preset NAME``) or by a value: a preset with ``selected_by: KEY`` is
applied when ``KEY`` equals its name (``model.name=vit_small_kprpe``, ``--data gait3d``). The core
applies presets while it builds the config, never later, and records them in the top-level ``preset``
key, so ``--print-config`` shows exactly what the run uses.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kpt._names import did_you_mean
from kpt.errors import DataError, UserError

if TYPE_CHECKING:
    from kpt.plugin import Plugin

logger = logging.getLogger(__name__)

#: Keys the engine reads. ``train.batch_size`` is the global batch (split over DDP ranks).
ENGINE_DEFAULTS: dict[str, Any] = {
    "preset": [],                  # presets of the plugin applied to this config (see build_config)
    "data": {"name": "", "root": ""},
    "eval": {"test": []},
    "train": {
        "epochs": 1,               # passes over the training set
        "max_steps": 0,            # stop after this many optimizer steps (0: epochs decide)
        "batch_size": 32,          # global batch over all processes
        "lr": 1e-3,
        "weight_decay": 0.05,      # not applied to norms, biases and position tables
        "optimizer": "adamw",      # any timm optimizer name
        "momentum": 0.9,
        "sched": "cosine",         # any timm scheduler name ("cosine", "step", "multistep", "none")
        "warmup_epochs": 0.0,      # may be fractional; the schedule is updated every step
        "warmup_lr": 1e-6,
        "min_lr": 1e-6,
        "decay_epochs": 0.0,       # step/multistep schedules (0: a third of the run)
        "decay_milestones": [],    # multistep: epochs after which the lr is ×0.1 (empty: decay_epochs)
        "warmup_prefix": False,    # cosine: warm-up before the cosine, not inside it (timm)
        "sched_lag": 0,            # step t uses the schedule's lr of step t − lag (CVLface: 1)
        "cooldown_steps": 0,       # last optimizer steps held at min_lr after the schedule (OpenGait)
        "clip_grad": 0.0,          # max gradient norm (0: off)
        "amp": "none",             # none | bf16 | fp16
        "seed": 0,
        "deterministic": False,
        "eval_every": 0,           # steps between evaluations (0: at the end of every epoch)
        "save_every": 0,           # steps between last.pt saves (0: at evaluations and epoch ends)
        "save_every_minutes": 10.0,  # also save last.pt when this much time passed (0: off)
        "log_every": 50,           # steps between log lines / metrics.jsonl records
        "logger": "none",          # extra metrics sink: none | tensorboard | package.module:factory
        "num_workers": 0,
        "device": "auto",          # auto | cpu | cuda | cuda:1 ...
        "no_decay": ["pos_embed", "cls_token", "rpe", "relative_position"],  # name fragments
        "lr_scale": {},            # {name fragment: lr multiplier}, on top of the model's own
    },
}


#: Allowed values of enumerated engine keys (plugins add theirs in ``Plugin.choices``).
#: ``train.optimizer`` is checked against timm's optimizer names (see :func:`validate_config`).
ENGINE_CHOICES: dict[str, tuple[Any, ...]] = {
    "train.amp": ("none", "bf16", "fp16"),
    # timm's step-counted schedulers, minus plateau (it needs a metric every epoch)
    "train.sched": ("cosine", "step", "multistep", "poly", "tanh", "constant", "rsqrt", "none"),
}


class ConfigError(UserError, ValueError):
    """Unknown key, a value that cannot be cast to the declared type, or a value out of range."""


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (``1e-3``) and booleans (only true/false)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers
         if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$"
               r"|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).lower().replace(".inf", "inf").replace(".nan", "nan")
    return float(text)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_yaml(text: str, what: str = "<string>") -> Any:
    """Parse YAML text with the YAML 1.2 float/bool rules; errors name ``what``."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: invalid YAML: {exc}") from exc


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from ``path`` (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def cast_value(value: Any, default: Any, key: str, source: str) -> Any:
    """Cast ``value`` to the type of ``default`` (``None`` default: any type, strings parsed as YAML)."""
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}={value!r}: expected {expected}")

    if default is None:
        return parse_yaml(value, source) if isinstance(value, str) else value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise fail("a boolean (true/false)")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, str):
            try:
                value = float(value) if re.search(r"[.eE]", value) else int(value)
            except ValueError:
                raise fail("an integer") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise fail("an integer")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise fail("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail("a number") from None
    if isinstance(default, str):
        if isinstance(value, (Mapping, list, tuple)):
            raise fail("a string")
        return str(value)
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = parse_yaml(text, source)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if default:
            value = [cast_value(v, default[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
        return type(default)(value)
    return value


class Config(MutableMapping):
    """Nested typed mapping with attribute access (``cfg.train.lr``).

    Setting an existing key casts the value to the declared type; setting an unknown key raises
    :class:`ConfigError` with a suggestion, unless the section is open (its default was ``{}``).
    """

    def __init__(self, data: Mapping | None = None, path: str = "", open_: bool | None = None) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_data", {})
        object.__setattr__(self, "_open", (not data) if open_ is None else open_)
        for key, value in (data or {}).items():
            self._data[str(key)] = self._wrap(str(key), value)

    def _wrap(self, key: str, value: Any) -> Any:
        if isinstance(value, Config):
            value = value.to_dict()
        if isinstance(value, Mapping):
            return Config(value, f"{self._path}{key}.")
        return copy.deepcopy(value)

    # -- mapping protocol ---------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if "." in key:
            head, _, rest = key.partition(".")
            return self[head][rest]
        if key not in self._data:
            raise KeyError(self._unknown(key))
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value, source="code")

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(self._unknown(key)) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self.set(key, value, source="code")

    def __deepcopy__(self, memo: dict) -> Config:
        return Config(self.to_dict(), self._path, self._open)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def _unknown(self, key: str) -> str:
        return (f"unknown config key '{self._path}{key}'.{did_you_mean(key, self._data)} "
                f"Known keys in {self._path.rstrip('.') or 'the top level'}: "
                f"{', '.join(sorted(self._data)) or 'none'}")

    # -- typed updates ------------------------------------------------------------------------------
    def set(self, key: str, value: Any, source: str = "code", strict: bool = True) -> None:
        """Set ``key`` (dotted allowed) to ``value`` cast to the declared type.

        Args:
            key: ``"train.lr"`` or a key of this section.
            value: the new value; strings are parsed/cast (command-line values arrive as strings).
            source: named in error messages (a file, ``"command line"``).
            strict: unknown keys raise (False: they are added, used for plugin defaults).
        """
        head, dot, rest = key.partition(".")
        if head not in self._data:
            if strict and not self._open:
                raise ConfigError(f"{source}: {self._unknown(head)}")
            self._data[head] = Config({}, f"{self._path}{head}.", open_=True) if dot else None
            if not dot:  # undeclared: no type to cast to, so strings are read as YAML
                self._data[head] = self._wrap(head, cast_value(value, None, key, source))
                return
        current = self._data[head]
        if dot:
            if not isinstance(current, Config):
                raise ConfigError(f"{source}: {self._path}{head} is a value, not a section")
            current.set(rest, value, source, strict)
        elif isinstance(current, Config):
            if isinstance(value, str):
                value = parse_yaml(value, source)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {self._path}{head} is a section; expected a mapping")
            current.update_from(value, source, strict)
        else:
            self._data[head] = cast_value(value, current, f"{self._path}{head}", source)

    def update_from(self, values: Mapping, source: str, strict: bool = True) -> Config:
        """Merge a nested mapping into this config (in place); returns self."""
        for key, value in values.items():
            if isinstance(value, Mapping) and isinstance(self._data.get(str(key)), Config):
                self._data[str(key)].update_from(value, source, strict)
            else:
                self.set(str(key), value, source, strict)
        return self

    def override(self, assignments: Iterable[str], source: str = "command line") -> Config:
        """Apply ``["train.lr=1e-3", "model.depth=2"]`` (in place); returns self."""
        for item in assignments:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"{source}: {item!r}: overrides look like section.key=value")
            self.set(key.strip(), value.strip(), source)
        return self

    # -- export -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain nested dict (deep copy)."""
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v)
                for k, v in self._data.items()}

    def to_yaml(self) -> str:
        """YAML text that reads back to the same config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}``."""
        out: dict[str, Any] = {}
        for k, v in self._data.items():
            if isinstance(v, Config):
                out.update({f"{k}.{kk}": vv for kk, vv in v.flat().items()})
            else:
                out[k] = v
        return out


#: Key inside a preset naming the config key whose value selects it (``selected_by: data.name``).
PRESET_SELECTOR = "selected_by"


def _plugin_config(plugin: Plugin) -> tuple[dict, str]:
    """The plugin's whole default config mapping (``presets`` included) and where it came from."""
    from kpt.plugin import plugin_module_dir

    if isinstance(plugin.default_config, Mapping):
        return copy.deepcopy(dict(plugin.default_config)), f"default config of plugin {plugin.name!r}"
    path = Path(plugin.default_config)
    if not path.is_absolute():
        path = plugin_module_dir(plugin) / path
    return load_yaml(path), str(path)


def plugin_defaults(plugin: Plugin) -> dict:
    """The plugin's default config as a dict (a relative YAML path is read next to its module).

    The ``presets`` section is not part of the config; :func:`plugin_presets` reads it.
    """
    data, _ = _plugin_config(plugin)
    data.pop("presets", None)
    return data


def plugin_presets(plugin: Plugin) -> dict[str, dict]:
    """The presets the plugin declares: ``{name: {dotted key or section: value, ...}}``, in order.

    A preset may hold ``selected_by: KEY`` (a dotted config key): it is then also chosen when that key's
    final value equals the preset's name.

    Raises:
        ConfigError: the section is not a mapping of names to mappings, or ``selected_by`` is not a key
            name.
    """
    data, where = _plugin_config(plugin)
    raw = data.get("presets") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: presets: expected a mapping of preset names to settings")
    presets: dict[str, dict] = {}
    for name, values in raw.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: presets.{name}: expected a mapping of keys to values, got "
                              f"{type(values).__name__}")
        selector = values.get(PRESET_SELECTOR)
        if selector is not None and (not isinstance(selector, str) or not selector):
            raise ConfigError(f"{where}: presets.{name}.{PRESET_SELECTOR}: expected a config key "
                              f"such as data.name, got {selector!r}")
        if "preset" in values:
            raise ConfigError(f"{where}: presets.{name}: a preset cannot choose other presets")
        presets[str(name)] = dict(values)
    return presets


def _preset_values(name: str, preset: Mapping) -> dict[str, Any]:
    """Flat ``{dotted key: value}`` a preset sets, its selector key (set to its name) included."""
    def flatten(tree: Mapping, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, Mapping) and value:
                out.update(flatten(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    values = flatten({k: v for k, v in preset.items() if k != PRESET_SELECTOR}, "")
    if preset.get(PRESET_SELECTOR):
        values[preset[PRESET_SELECTOR]] = name
    return values


def _apply_preset(cfg: Config, plugin: Plugin, name: str, preset: Mapping) -> None:
    """Set every value of preset ``name`` on ``cfg`` (strict: unknown keys are errors)."""
    source = f"preset {name!r} of plugin {plugin.name!r}"
    for key, value in _preset_values(name, preset).items():
        cfg.set(key, value, source)


def _select_presets(cfg: Config, plugin: Plugin, presets: Mapping[str, Mapping],
                    explicit: Iterable[str], defaults: Mapping) -> list[str]:
    """Names of the presets ``cfg`` asks for: named in ``explicit``, or chosen by a selector value.

    A selector whose plugin default is ``""`` (such as face's ``recipe``) exists only to choose
    presets, so any other value is an error.
    """
    wanted = set()
    for name in explicit:
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r} of plugin {plugin.name!r}."
                              f"{did_you_mean(name, presets)} Presets: "
                              f"{', '.join(presets) or 'none'}")
        wanted.add(name)
    selectors: dict[str, list[str]] = {}
    for name, preset in presets.items():
        if preset.get(PRESET_SELECTOR):
            selectors.setdefault(preset[PRESET_SELECTOR], []).append(name)
    for key, names in selectors.items():
        try:
            value = cfg[key]
        except KeyError as exc:
            raise ConfigError(f"preset(s) {', '.join(names)} of plugin {plugin.name!r}: "
                              f"{PRESET_SELECTOR}: {exc.args[0]}") from None
        if value in names:
            wanted.add(value)
        elif value != "" and _default_of(defaults, key) == "":
            raise ConfigError(f"{key}={value!r}: plugin {plugin.name!r} has no such preset."
                              f"{did_you_mean(str(value), names)} Expected one of "
                              f"{', '.join(names)} (or '' for none)")
    return [name for name in presets if name in wanted]


def _default_of(defaults: Mapping, key: str) -> Any:
    node: Any = defaults
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _check_preset_conflicts(chosen: list[str], presets: Mapping[str, Mapping]) -> None:
    """Two chosen presets must not set one key to different values (order would then decide)."""
    seen: dict[str, tuple[str, Any]] = {}
    for name in chosen:
        for key, value in _preset_values(name, presets[name]).items():
            if key in seen and seen[key][1] != value:
                raise ConfigError(f"presets {seen[key][0]!r} and {name!r} set {key} to "
                                  f"{seen[key][1]!r} and {value!r}: choose one, or set {key} "
                                  f"yourself after choosing one")
            seen.setdefault(key, (name, value))


class DataNameError(ConfigError, DataError):
    """``--data NAME`` that is neither a dataset of the plugin nor an existing path."""


def build_config(plugin: Plugin, config_files: Iterable[str | Path] = (),
                 overrides: Iterable[str] = (), data: str | None = None,
                 test: Iterable[str] | None = None, data_root: str | None = None,
                 base: Mapping | None = None, presets: Iterable[str] = ()) -> Config:
    """Engine defaults < plugin defaults < presets < ``base`` (a saved run) < files < --data/--test
    < overrides.

    The presets applied are the ones named by ``presets`` (``--preset``) or by the ``preset`` key of the
    files and overrides, plus those whose ``selected_by`` key ends with their name; the result lists
    them in ``cfg.preset``. Presets sit below every user source, so a user value always wins. With
    ``base`` no preset is applied again: the saved config already holds them, and its ``preset`` list
    is kept.

    Args:
        plugin: the domain plugin.
        config_files: YAML files (``--config``), strict.
        overrides: dotted ``key=value`` strings, strict.
        data: ``--data``: a dataset name (``data.name``) or an existing path (``data.root``).
        test: ``--test`` names (``eval.test``).
        data_root: ``--data-root`` (``data.root``).
        base: a previously saved config (resume), strict.
        presets: names of presets to apply (``--preset``).

    Raises:
        ConfigError: an unknown key, value, dataset or preset, or two chosen presets that disagree.
    """
    defaults = plugin_defaults(plugin)
    declared = plugin_presets(plugin)
    files = [(str(path), load_yaml(path)) for path in config_files]
    overrides, presets = list(overrides), [str(p) for p in presets]
    test = None if test is None else [str(t) for t in test]

    merged = _merge_defaults(ENGINE_DEFAULTS, defaults, f"default config of plugin {plugin.name!r}")

    def layered(chosen: list[str]) -> Config:
        cfg = Config(merged)
        for name in chosen:
            _apply_preset(cfg, plugin, name, declared[name])
        if base:
            cfg.update_from(base, "saved run config")
        for path, values in files:
            cfg.update_from(values, path)
        _apply_data_options(cfg, plugin, data, test, data_root)
        cfg.override(overrides)
        return cfg

    if base:
        cfg = layered([])
        saved = list(base.get("preset") or [])
        try:
            asked = _select_presets(cfg, plugin, declared, [*cfg.preset, *presets], defaults)
        except ConfigError:  # a config saved by an older kpt: nothing is applied, so nothing to check
            asked = saved
        if set(asked) != set(saved):
            logger.warning("the saved run config keeps its presets (%s); presets are not applied "
                           "again (asked for: %s)", ", ".join(saved) or "none",
                           ", ".join(asked) or "none")
        cfg.set("preset", saved, "saved run config")
        validate_config(cfg, plugin)
        return cfg
    # A preset may set another preset's selector (rare): repeat until the choice is stable.
    chosen: list[str] = []
    while True:
        cfg = layered(chosen)
        wanted = _select_presets(cfg, plugin, declared, [*cfg.preset, *presets], defaults)
        if set(wanted) <= set(chosen):
            break
        chosen = [name for name in declared if name in wanted or name in chosen]
    _check_preset_conflicts(chosen, declared)
    if chosen:
        logger.info("presets of plugin %s: %s", plugin.name, ", ".join(chosen))
    cfg.set("preset", chosen, "presets")
    validate_config(cfg, plugin)
    return cfg


def _merge_defaults(engine: Mapping, plugin: Mapping, source: str, prefix: str = "") -> dict:
    """Engine defaults updated with the plugin's: values the engine declares are cast to its type;
    the plugin's own keys keep their YAML value as they are (``""`` stays a string, not ``None``)."""
    out = copy.deepcopy(dict(engine))
    for key, value in plugin.items():
        key = str(key)
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge_defaults(out[key], value, source, f"{prefix}{key}.")
        elif key in out and not isinstance(out[key], Mapping):
            out[key] = cast_value(value, out[key], f"{prefix}{key}", source)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_data_options(cfg: Config, plugin: Plugin, data: str | None, test: list[str] | None,
                        data_root: str | None) -> None:
    """``--data NAME|PATH``, ``--test NAME ...`` and ``--data-root`` onto ``cfg``."""
    known = tuple(plugin.datasets)
    if data is not None:
        if Path(data).exists() or "/" in data or "\\" in data:
            cfg.set("data.root", data, "--data")
        else:
            if known and data not in known:
                raise DataNameError(
                    f"--data {data!r}: plugin {plugin.name!r} has no dataset of that name and no "
                    f"file or folder {str(Path(data).absolute())!r} exists."
                    f"{did_you_mean(data, known)} Datasets: {', '.join(known)}; or give the "
                    f"path of your data")
            cfg.set("data.name", data, "--data")
    if test is not None:
        for name in test:
            is_path = Path(name).exists() or "/" in name or "\\" in name  # e.g. a .bin pair file
            if known and name not in known and not is_path:
                raise ConfigError(f"--test {name!r}: plugin {plugin.name!r} knows no such dataset."
                                  f"{did_you_mean(name, known)} Datasets: {', '.join(known)}")
        cfg.set("eval.test", test, "--test")
    if data_root is not None:
        cfg.set("data.root", data_root, "--data-root")


def _check_choice(key: str, value: Any, choices: Iterable[Any], listing: str = "") -> None:
    """Raise :class:`ConfigError` when ``value`` (or an item of a list value) is not a choice.

    ``listing`` replaces the list of choices in the message (for long lists).
    """
    allowed = list(choices)
    texts = [str(c) for c in allowed]
    for item in value if isinstance(value, (list, tuple)) else [value]:
        # an undeclared top-level key given as "" reads back as YAML null: the same empty choice
        if item in allowed or str(item) in texts or (item is None and "" in allowed):
            continue
        shown = listing or ", ".join(t if t else "''" for t in texts)
        raise ConfigError(f"{key}={item!r} is not a valid choice.{did_you_mean(str(item), texts)} "
                          f"Choices: {shown}")


def _timm_optimizers() -> list[str]:
    from timm.optim import list_optimizers

    return list(list_optimizers())


def _check_numbers(cfg: Config) -> None:
    """Refuse training numbers that cannot give a run (message names the key)."""
    import math

    t = cfg.train

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"train.{key}={t[key]!r}: expected {expected}")

    need(t.batch_size >= 1, "batch_size", "a global batch of at least 1")
    need(math.isfinite(t.lr) and t.lr > 0, "lr", "a finite learning rate > 0")
    need(t.epochs >= 0, "epochs", "0 or more (0: train.max_steps decides)")
    need(t.max_steps >= 0, "max_steps", "0 or more (0: train.epochs decide)")
    for key in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "decay_epochs", "clip_grad",
                "momentum", "save_every_minutes"):
        need(math.isfinite(t[key]) and t[key] >= 0, key, "a finite number >= 0")
    for key in ("eval_every", "save_every", "log_every", "num_workers"):
        need(t[key] >= 0, key, "0 or more")
    need(t.get("sched_lag", 0) >= 0, "sched_lag", "0 or more optimizer steps")
    need(t.get("cooldown_steps", 0) >= 0, "cooldown_steps", "0 or more optimizer steps")
    if t.epochs == 0 and t.max_steps == 0:
        raise ConfigError("train.epochs=0 and train.max_steps=0: the run would take no training "
                          "step; set train.epochs or train.max_steps to at least 1")
    batch = cfg["eval"].get("batch_size") if isinstance(cfg.get("eval"), Config) else None
    if isinstance(batch, int) and not isinstance(batch, bool) and batch < 1:
        raise ConfigError(f"eval.batch_size={batch!r}: expected at least 1")


def validate_config(cfg: Config, plugin: Plugin | None = None) -> None:
    """Check enumerated keys against their choices and the training numbers; called by build_config.

    Args:
        cfg: the merged config.
        plugin: its plugin; ``plugin.choices`` maps dotted keys to their allowed values.

    Raises:
        ConfigError: naming the key, the bad value and (for choices) the closest allowed value.
    """
    flat = cfg.flat()
    choices: dict[str, Iterable[Any]] = dict(ENGINE_CHOICES)
    choices.update(dict(getattr(plugin, "choices", None) or {}))
    if isinstance(flat.get("train.sched"), str):
        flat["train.sched"] = flat["train.sched"].lower()  # the engine reads it case-blind
    for key, allowed in choices.items():
        if key in flat:
            _check_choice(key, flat[key], allowed)
    optimizer = str(flat.get("train.optimizer", "adamw")).lower()
    # timm accepts a "lookahead_" prefix on any of its optimizers
    _check_choice("train.optimizer", optimizer.removeprefix("lookahead_"), _timm_optimizers(),
                  "timm.optim.list_optimizers(), optionally with a 'lookahead_' prefix")
    _check_numbers(cfg)
