"""One format for kpt's model files, one resolver and one ``load_model``.

A weight file holds a model alone plus a header of strings that says how to rebuild it (schema
``kpt.weights``). In a ``.safetensors`` file the header is the metadata; in a ``.pt``/``.pth``/``.ckpt``
file it is the dict saved next to ``"state_dict"``::

    format="kpt.weights", version="2", kpt_version, and either
      plugin, model_class, config (JSON), info (JSON), excluded (JSON list)  -- a run's weights.safetensors
      model (registered name), kwargs (JSON constructor arguments)          -- kpt.models.save_model

Files of the older bare-model schema (``kpt_format="kpt-model"``, ``model``, ``kwargs``) and version-1
``kpt.weights`` files (no ``version`` field) still load, and so do training checkpoints (``last.pt``,
``best.pt``, see :mod:`kpt.engine.checkpoint`), whose keys are checked here too. Files are read only
with safetensors or ``torch.load(weights_only=True)``; every write goes through
:func:`kpt.engine.atomic.atomic_write`. A file that cannot be read, or belongs to another plugin,
raises :class:`CheckpointError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpt._version import __version__
from kpt.engine.atomic import atomic_write
from kpt.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "kpt.checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_FORMAT = "kpt.weights"
WEIGHTS_VERSION = 2  # 2: bare registered models (model + kwargs) joined the plugin-run weights
LEGACY_MODEL_FORMAT = "kpt-model"  # the former kpt.models.serialization schema, read only
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
# what a run folder resolves to, in order of preference (final weights first)
RUN_WEIGHT_FILES = ("weights.safetensors", "best.pt", "last.pt")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weight file cannot be read, or belongs to another plugin or model."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The path, or the weights a run folder should hold, does not exist."""


def to_plain(obj: Any) -> Any:
    """Nested data reduced to JSON types (tuples -> lists, numpy scalars -> numbers, others -> str)."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def model_class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


# -- reading files --------------------------------------------------------------------------------------
def _existing_file(path: Path, what: str) -> None:
    if not path.exists():
        raise MissingCheckpointError(f"{path} does not exist; expected {what}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; expected {what}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): its write never completed; expected {what}")


def read_torch_file(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` whose errors name the file and what was expected."""
    _existing_file(path, "a kpt checkpoint (torch file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; name only the refused object
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" ({found[1]})" if found else ""
        raise CheckpointError(f"{path} holds objects other than tensors and plain data{what}, which "
                              "kpt refuses to unpickle; expected a kpt checkpoint") from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint (truncated or not a torch "
                              f"file?): {type(exc).__name__}: {exc}") from exc


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    _existing_file(path, "a kpt weights file (safetensors)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # SafetensorError: bad header length, bad JSON, truncated data
        raise CheckpointError(f"cannot read {path} as safetensors (truncated or not a safetensors "
                              f"file?): {exc}") from exc


def _safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read the tensors of {path} (truncated?): {exc}") from exc


def _field(meta: Mapping[str, Any], key: str, kind: type, path: Path, what: str) -> Any:
    """``meta[key]`` checked to be a ``kind``, or a CheckpointError naming file, key and expectation."""
    if key not in meta:
        raise CheckpointError(f"{path}: the {what} lacks the key {key!r}; the file is damaged or was "
                              "not written by kpt")
    value = meta[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{path}: {what} key {key!r} is a {type(value).__name__}, expected "
                              f"{'a' if kind is not int else 'an'} {kind.__name__}")
    return value


def _json_field(meta: Mapping[str, Any], key: str, kind: type, path: Path,
                default: Any = None) -> Any:
    """A header value holding JSON (safetensors metadata are strings), decoded and type-checked."""
    if key not in meta and default is not None:
        return default
    text = _field(meta, key, str, path, "header")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: header key {key!r} is not valid JSON ({exc}); the file is "
                              "damaged") from exc
    if not isinstance(value, kind):
        expected = {dict: "a JSON object", list: "a JSON list"}[kind]
        raise CheckpointError(f"{path}: header key {key!r} holds a {type(value).__name__}, "
                              f"expected {expected}")
    return value


# -- checks shared with training checkpoints ---------------------------------------------------------
# keys every kpt.checkpoint has (the trainer always writes them), with their types
_CHECKPOINT_KEYS = {"plugin": str, "model_class": str, "config": dict, "info": dict, "model": dict,
                    "optimizer": dict, "scaler": dict, "step": int, "epoch": int,
                    "batch_in_epoch": int, "rng": list}


def check_checkpoint(ckpt: Any, path: Path) -> dict[str, Any]:
    """Raise CheckpointError unless ``ckpt`` has the keys and types of a kpt training checkpoint."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a kpt training "
                              "checkpoint (a dict)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a kpt training checkpoint (format "
                              f"{ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); use "
                              "kpt.load_model for weight files")
    version = _field(ckpt, "version", int, path, "checkpoint")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is a version {version} checkpoint, this kpt reads up to "
                              f"version {CHECKPOINT_VERSION}; upgrade kpt")
    for key, kind in _CHECKPOINT_KEYS.items():
        _field(ckpt, key, kind, path, "checkpoint")
    bad = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)][:3]
    if bad:
        raise CheckpointError(f"{path}: checkpoint key 'model' holds non-tensor entries {bad}")
    return ckpt


def other_plugin_error(path: Path, written_by: str, wanted: str) -> CheckpointError:
    """The error for a file of plugin ``written_by`` given to plugin ``wanted``."""
    return CheckpointError(f"{path} was written by plugin {written_by!r}, not {wanted!r}; use it with "
                           f"`kpt eval {written_by}` / `kpt train {written_by}`, or pass a run of "
                           f"{wanted}")


def check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
              skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise CheckpointError unless ``state`` has every tensor of ``model`` with the same shape.

    Names in ``skip`` (rank-local shards, excluded on save) may be absent or differ; a name missing from
    ``state`` is accepted when it aliases a tensor that ``state`` holds (tied weights are saved once).
    """
    current = model.state_dict()
    loaded = {(t.untyped_storage().data_ptr(), t.storage_offset()) for n, t in current.items()
              if n in state}
    missing = sorted(n for n in current if n not in state and n not in skip and (
        current[n].untyped_storage().data_ptr(), current[n].storage_offset()) not in loaded)
    extra = sorted(n for n in state if n not in current and n not in skip)
    shapes = [f"{n}: {tuple(state[n].shape)} vs {tuple(current[n].shape)}" for n in sorted(state)
              if n in current and n not in skip and state[n].shape != current[n].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]} (file vs model)")
        raise CheckpointError(f"{path} does not fit this model ({'; '.join(parts)}); it was written "
                              "for another model config")


def _unshared_state(model: nn.Module, exclude: set[str]) -> dict[str, torch.Tensor]:
    """State dict on the CPU without ``exclude`` and with tied tensors stored once.

    safetensors refuses aliases; a name whose storage another kept name already holds is dropped, and
    loading restores it through the module's own tying (as ``safetensors.torch.save_model`` does).
    """
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name in exclude:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().cpu().contiguous()
    return state


def _write_weights(path: Path, state: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Write ``state`` with ``header`` (strings) atomically; the suffix picks safetensors or torch."""
    header = {"format": WEIGHTS_FORMAT, "version": str(WEIGHTS_VERSION),
              "kpt_version": __version__, **header}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state, metadata=header)  # bytes, so that the one atomic writer writes them
        return atomic_write(path, lambda fh: fh.write(data))
    if path.suffix in TORCH_SUFFIXES:
        return atomic_write(path, lambda fh: torch.save({**header, "state_dict": state}, fh))
    raise ValueError(f"{path}: suffix must be .safetensors, .pt, .pth or .ckpt")


def save_weights(model: nn.Module, path: str | Path, plugin: str, config: dict, info: dict,
                 exclude: list[str] | tuple[str, ...] = ()) -> Path:
    """Write a plugin run's model with what rebuilds it: plugin name, config and data info.

    Args:
        model: the run's model. path: destination (``weights.safetensors``).
        plugin: plugin name; config: the run's config dict; info: ``TaskData.info``.
        exclude: state-dict names left out (rank-local shards of a DDP run); :func:`load_model` leaves
            them at their initial values.
    """
    header = {"plugin": plugin, "model_class": model_class_name(model),
              "config": json.dumps(to_plain(config)), "info": json.dumps(to_plain(info)),
              "excluded": json.dumps(sorted(exclude))}
    return _write_weights(Path(path), _unshared_state(model, set(exclude)), header)


def save_model(model: nn.Module, path: str | Path, name: str | None = None,
               kwargs: dict[str, Any] | None = None) -> Path:
    """Write a registered backbone's weights with its name and constructor kwargs.

    Args:
        model: the backbone. path: destination; ``.safetensors`` or ``.pt``/``.pth``/``.ckpt``.
        name: registered model name; default ``model.kpt_spec["name"]`` (set by kpt factories).
        kwargs: constructor keyword arguments (JSON-serialisable); default ``model.kpt_spec``.

    Returns:
        The written path (written atomically).
    """
    spec = getattr(model, "kpt_spec", None) or {}
    name = name or spec.get("name")
    kwargs = spec.get("kwargs") if kwargs is None else kwargs
    if not name or kwargs is None:
        raise ValueError("save_model: the model has no kpt_spec (it was not built by "
                         "kpt.create_model); pass name= and kwargs= explicitly.")
    try:
        kwargs_json = json.dumps(dict(kwargs), sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"save_model: kwargs for {name!r} are not JSON-serialisable: {exc}") from exc
    path = Path(path)
    state = _unshared_state(model, set())
    _write_weights(path, state, {"model": name, "kwargs": kwargs_json})
    logger.info("saved %s (%d tensors) to %s", name, len(state), path)
    return path


def _parse_header(meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """A weights header (either schema) as :func:`read_header` returns it."""
    header: dict[str, Any] = {"plugin": None, "model_class": None, "config": None, "info": None,
                              "excluded": [], "model": None, "kwargs": None, "step": None,
                              "kpt_version": str(meta.get("kpt_version", ""))}
    if "format" not in meta and meta.get("kpt_format") == LEGACY_MODEL_FORMAT:
        header.update(format=LEGACY_MODEL_FORMAT, version=0,
                      model=_field(meta, "model", str, path, "header"),
                      kwargs=_json_field(meta, "kwargs", dict, path))
        return header
    if meta.get("format") != WEIGHTS_FORMAT:
        found = meta.get("format", meta.get("kpt_format"))
        what = "has no kpt header (no 'format' key)" if found is None else f"has format {found!r}"
        raise CheckpointError(f"{path} {what}; expected a {WEIGHTS_FORMAT!r} file written by `kpt "
                              "train`, kpt.models.save_model or `kpt convert`")
    try:
        version = int(meta.get("version", "1"))  # version-1 files carry no version field
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: header key 'version' is {meta.get('version')!r}, expected "
                              "a whole number") from exc
    if version > WEIGHTS_VERSION:
        raise CheckpointError(f"{path} is a version {version} weights file, this kpt reads up to "
                              f"version {WEIGHTS_VERSION}; upgrade kpt")
    header.update(format=WEIGHTS_FORMAT, version=version)
    if "plugin" in meta:
        header.update(plugin=_field(meta, "plugin", str, path, "header"),
                      model_class=_field(meta, "model_class", str, path, "header"),
                      config=_json_field(meta, "config", dict, path),
                      info=_json_field(meta, "info", dict, path),
                      excluded=_json_field(meta, "excluded", list, path, default=[]))
    elif "model" in meta:
        header.update(model=_field(meta, "model", str, path, "header"),
                      kwargs=_json_field(meta, "kwargs", dict, path))
    else:
        raise CheckpointError(f"{path}: the header names neither a plugin nor a model; expected "
                              "'plugin' (run weights) or 'model' (a bare backbone)")
    return header


def _checkpoint_header(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    check_checkpoint(ckpt, path)
    return {"format": CHECKPOINT_FORMAT, "version": ckpt["version"],
            "kpt_version": str(ckpt.get("kpt_version", "")), "plugin": ckpt["plugin"],
            "model_class": ckpt["model_class"], "config": ckpt["config"], "info": ckpt["info"],
            "excluded": [], "model": None, "kwargs": None, "step": ckpt["step"]}


def _read_file(path: Path, tensors: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and state dict of a checkpoint or weights file (the state is {} when not ``tensors``)."""
    if path.suffix == ".safetensors":
        header = _parse_header(_safetensors_metadata(path), path)
        return header, (_safetensors_state(path) if tensors else {})
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: not a kpt weights file; expected a run folder or a "
                              ".safetensors / .pt / .pth / .ckpt file")
    obj = read_torch_file(path, mmap=not tensors)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a kpt checkpoint or "
                              "weights dict")
    if obj.get("format") == CHECKPOINT_FORMAT:
        return _checkpoint_header(obj, path), obj["model"]
    header = _parse_header(obj, path)
    state = _field(obj, "state_dict", dict, path, "weights file")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' holds entries that are not tensors")
    return header, state


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a kpt weights file or training checkpoint, without loading the model.

    Returns:
        ``{"format", "version", "kpt_version", "plugin", "model_class", "config", "info",
        "excluded", "model", "kwargs", "step"}``: ``plugin`` to ``excluded`` for a run's weights and
        checkpoints (``step`` for checkpoints), ``model`` and ``kwargs`` for a bare backbone; the
        fields of the other kind are None.

    Raises:
        CheckpointError: unreadable file, or not a kpt file (names the file and what is missing).
    """
    return _read_file(Path(path), tensors=False)[0]


def is_model_file(path: str | Path) -> bool:
    """True if :func:`load_model` can rebuild a model from ``path`` (reads the header only)."""
    try:
        read_header(path)
    except (CheckpointError, OSError):
        return False
    return True


def resolve_run_weights(path: str | Path) -> Path:
    """``path`` itself, or for a run folder the first of ``RUN_WEIGHT_FILES`` inside it.

    Raises:
        MissingCheckpointError (a FileNotFoundError): ``path`` does not exist, or is a folder without
            any of ``RUN_WEIGHT_FILES``.
    """
    path = Path(path)
    if path.is_dir():
        for name in RUN_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise MissingCheckpointError(f"{path} is a folder without any of {list(RUN_WEIGHT_FILES)}; "
                                     "pass a run folder or one of its weight files")
    if not path.exists():
        raise MissingCheckpointError(f"{path} does not exist; expected a run folder or a weights "
                                     f"file ({', '.join(RUN_WEIGHT_FILES)}, a converted model)")
    return path


def _build(header: dict[str, Any], path: Path) -> nn.Module:
    """The model a header describes: through its plugin, or from the model registry."""
    if header["plugin"] is not None:
        from kpt.config import Config
        from kpt.plugin import PluginError, load_plugin

        try:
            plugin = load_plugin(header["plugin"])
        except PluginError as exc:
            raise CheckpointError(f"{path} was written by plugin {header['plugin']!r}, which cannot "
                                  f"be loaded: {exc}") from exc
        return plugin.build_model(Config(header["config"]), header["info"])
    from kpt.registry import create_model

    try:
        return create_model(header["model"], **header["kwargs"])
    except TypeError as exc:  # kwargs that the constructor does not take
        raise CheckpointError(f"{path}: cannot build {header['model']!r} from the kwargs in its "
                              f"header: {exc}") from exc


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], excluded: list[str],
                path: Path) -> None:
    check_fit(model, state, path, set(excluded))
    model.load_state_dict(state, strict=False)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a model from any kpt file; the architecture is read from the file.

    Args:
        path: a run folder (resolved with :func:`resolve_run_weights`), a run's ``last.pt`` /
            ``best.pt`` / ``weights.safetensors`` (rebuilt through its plugin), or a bare backbone
            written by :func:`save_model` / ``kpt convert`` (either header schema).
        map_location: device of the returned model.

    Returns:
        The model in eval mode.
    """
    path = resolve_run_weights(path)
    header, state = _read_file(path)
    model = _build(header, path)
    _load_state(model, state, header["excluded"], path)
    return model.to(map_location).eval()


def read_run_state(path: str | Path, plugin_name: str, allow_bare: bool = False) -> dict[str, Any]:
    """What evaluating a plugin's run needs, from a run folder, ``last.pt``/``best.pt`` or its weights.

    Args:
        path: resolved with :func:`resolve_run_weights`.
        plugin_name: the plugin that evaluates; a file of another plugin, or a bare backbone without a
            plugin, raises CheckpointError.
        allow_bare: return a bare backbone (``kpt convert`` output) with ``plugin``, ``config`` and
            ``info`` None instead of raising; the caller rebuilds it with :func:`load_model`.

    Returns:
        ``{"path", "plugin", "config", "info", "model" (state dict), "excluded", "step"}``; ``step`` is
        ``"final"`` for a ``weights.safetensors``.
    """
    path = resolve_run_weights(path)
    header, state = _read_file(path)
    if header["plugin"] is None and allow_bare:
        return {"path": path, "plugin": None, "config": None, "info": None, "model": state,
                "excluded": header["excluded"], "step": "final"}
    if header["plugin"] is None:
        raise CheckpointError(f"{path} holds a bare {header['model']!r} backbone without a plugin "
                              f"config; evaluating with {plugin_name} needs a run folder, last.pt, "
                              f"best.pt or weights.safetensors of a `kpt train {plugin_name}` run")
    if header["plugin"] != plugin_name:
        raise other_plugin_error(path, header["plugin"], plugin_name)
    step = header["step"] if header["format"] == CHECKPOINT_FORMAT else "final"
    return {"path": path, "plugin": header["plugin"], "config": header["config"],
            "info": header["info"], "model": state, "excluded": header["excluded"], "step": step}


def apply_run_state(model: nn.Module, run: Mapping[str, Any]) -> None:
    """Load :func:`read_run_state`'s weights into ``model`` after checking that every tensor fits."""
    _load_state(model, run["model"], run["excluded"], Path(run["path"]))
