"""Checkpoints and weights: atomic writes, ``weights_only`` loading, compatibility checks, load_model.

A checkpoint (``last.pt``, ``best.pt``) is a dict of plain types and tensors, so that it loads with
``torch.load(weights_only=True)``::

    {"format": "kpt.checkpoint", "version": 1, "kpt_version", "plugin", "model_class", "config", "info",
     "model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch", "best", "rng"}

Writes go to a temporary file in the same folder, are fsync'ed and then renamed over the old file with
``os.replace`` (atomic on POSIX and Windows): a run killed while saving leaves the previous file intact.
``weights.safetensors`` holds the model alone, with the plugin, config and info in its metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "kpt.checkpoint"
WEIGHTS_FORMAT = "kpt.weights"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or belongs to another plugin or model."""


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


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened on some systems (Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_tmp(path: Path) -> None:
    """Delete temporary files of ``path`` left by writers that were killed (their pid is gone)."""
    if os.name != "posix":  # os.kill(pid, 0) is a liveness probe only on POSIX
        return
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except OSError:  # the process exists but belongs to someone else: leave its file alone
            pass


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it over ``path``.

    Args:
        path: destination.
        write: writes the whole content to the open file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically ``torch.save`` a checkpoint dict (see module docstring for the keys)."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    return ckpt


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The ``config`` of a checkpoint, memory-mapped (tensors are not read into memory)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a kpt training checkpoint (no config)")
    return ckpt["config"]


def model_class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def check_compatible(ckpt: dict[str, Any], path: str | Path, plugin_name: str, model: nn.Module,
                     skip: list[str] | tuple[str, ...] = ()) -> None:
    """Raise CheckpointError unless ``ckpt`` was written by ``plugin_name`` for this model.

    Compares the plugin, the model class and every parameter/buffer name and shape (except ``skip``:
    rank-local weights, whose shapes differ per rank), and names what differs.
    """
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a kpt training checkpoint (no format "
                              f"{CHECKPOINT_FORMAT!r}); use kpt.load_model for weight files")
    if ckpt.get("plugin") != plugin_name:
        raise CheckpointError(f"{path} was written by plugin {ckpt.get('plugin')!r}, this run is plugin "
                              f"{plugin_name!r}; pass a checkpoint of a {plugin_name} run")
    if ckpt.get("model_class") != model_class_name(model):
        raise CheckpointError(f"{path} holds a {ckpt.get('model_class')}, this run builds a "
                              f"{model_class_name(model)}; check the model section of the config")
    saved = {k: tuple(v.shape) for k, v in ckpt["model"].items() if k not in skip}
    current = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    shapes = [f"{k}: {saved[k]} vs {current[k]}" for k in sorted(set(saved) & set(current))
              if saved[k] != current[k]]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]} (checkpoint vs model)")
        raise CheckpointError(f"{path} does not fit this model ({'; '.join(parts)}); it was trained "
                              f"with another model config")


def save_weights(model: nn.Module, path: str | Path, plugin: str, config: dict, info: dict,
                 exclude: list[str] | tuple[str, ...] = ()) -> Path:
    """Write ``model``'s weights as safetensors; metadata records how to rebuild it.

    ``exclude``: state-dict names left out (rank-local shards of a DDP run); ``load_model`` leaves them
    at their initial values.
    """
    from safetensors.torch import save_file

    metadata = {"format": WEIGHTS_FORMAT, "plugin": plugin, "model_class": model_class_name(model),
                "config": json.dumps(to_plain(config)), "info": json.dumps(to_plain(info)),
                "excluded": json.dumps(sorted(exclude))}
    state = _unshared_state(model, set(exclude))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:  # safetensors writes by path: same tmp + fsync + replace as atomic_write
        save_file(state, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the writer creates 0600; give it the usual permissions
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _unshared_state(model: nn.Module, exclude: set[str]) -> dict[str, torch.Tensor]:
    """State dict without ``exclude`` and with tied tensors stored once (safetensors refuses aliases).

    A name whose storage another kept name already holds is dropped; ``load_state_dict(strict=False)``
    plus the module's own tying restores it (as ``safetensors.torch.save_model`` does).
    """
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name in exclude:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous()
    return state


def _build_plugin_model(plugin_name: str, config: dict, info: dict, path: Path) -> nn.Module:
    from kpt.config import Config
    from kpt.plugin import PluginError, load_plugin

    try:
        plugin = load_plugin(plugin_name)
    except PluginError as exc:
        raise CheckpointError(f"{path} was written by plugin {plugin_name!r}, which cannot be loaded: "
                              f"{exc}") from exc
    return plugin.build_model(Config(config), info)


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], excluded: set[str],
                  path: Path) -> None:
    """Load ``state``; only excluded names and aliases of loaded tensors may be missing."""
    result = model.load_state_dict(state, strict=False)
    loaded = {(t.untyped_storage().data_ptr(), t.storage_offset()) for n, t in
              model.state_dict().items() if n in state}
    missing = [n for n in result.missing_keys if n not in excluded and (
        model.state_dict()[n].untyped_storage().data_ptr(),
        model.state_dict()[n].storage_offset()) not in loaded]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit the model built from its metadata: missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")


# what a run directory is resolved to, in order of preference (final weights first)
RUN_WEIGHT_FILES = ("weights.safetensors", "best.pt", "last.pt")


def resolve_run_weights(path: str | Path) -> Path:
    """``path`` itself, or for a run directory the first of ``RUN_WEIGHT_FILES`` inside it."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in RUN_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} is a directory without any of {list(RUN_WEIGHT_FILES)}; "
                            "pass a run directory or one of its weight files")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a model from a run's ``last.pt``/``best.pt``/``weights.safetensors``.

    Other files (bare models written by ``kpt.models``) go to ``kpt.models.serialization.load_model``.
    A run directory is accepted too and resolves to the first of ``RUN_WEIGHT_FILES`` it holds.
    The model is returned in eval mode.
    """
    path = resolve_run_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") == WEIGHTS_FORMAT and meta.get("plugin"):
            model = _build_plugin_model(meta["plugin"], json.loads(meta["config"]),
                                        json.loads(meta["info"]), path)
            _load_weights(model, load_file(str(path)), set(json.loads(meta.get("excluded", "[]"))),
                          path)
            return model.to(map_location).eval()
    else:
        ckpt = load_checkpoint(path, map_location)
        if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
            model = _build_plugin_model(ckpt["plugin"], ckpt["config"], ckpt["info"], path)
            model.load_state_dict(ckpt["model"])
            return model.to(map_location).eval()
    try:
        from kpt.models.serialization import load_model as load_bare_model
    except ImportError as exc:
        raise CheckpointError(f"{path} is not a kpt run checkpoint and kpt.models.serialization is not "
                              f"available to read bare model files ({exc})") from exc
    return load_bare_model(path, map_location=map_location)


def find_resume_checkpoint(resume: str, out_dir: Path | None, runs_root: Path) -> Path | None:
    """Resolve ``--resume auto|PATH``.

    Args:
        resume: ``"auto"``, a checkpoint file or a run folder.
        out_dir: ``--out`` if given (``auto`` looks there first).
        runs_root: ``runs/DOMAIN``; ``auto`` takes its newest ``*/last.pt``.

    Returns:
        The checkpoint path, or None for ``auto`` when there is nothing to resume.
    """
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            path = path / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"--resume {resume}: no checkpoint at {path}")
        return path
    if out_dir is not None:
        return out_dir / "last.pt" if (out_dir / "last.pt").is_file() else None
    candidates = sorted(runs_root.glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None
