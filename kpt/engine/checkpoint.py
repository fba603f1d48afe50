"""Training checkpoints: atomic saves, ``weights_only`` loading, compatibility checks, ``--resume``.

A checkpoint (``last.pt``, ``best.pt``) is a dict of plain types and tensors, so that it loads with
``torch.load(weights_only=True)``::

    {"format": "kpt.checkpoint", "version": 1, "kpt_version", "plugin", "model_class", "config", "info",
     "model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch", "best", "rng"}

Writes go through :func:`kpt.engine.atomic.atomic_write` (a killed save leaves the previous file
intact). Weight files, the resolver for run folders and ``load_model`` live in :mod:`kpt.engine.weights`;
their names are re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpt.engine.atomic import atomic_write, stale_temp_files
from kpt.engine.weights import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    RUN_WEIGHT_FILES,
    WEIGHTS_FORMAT,
    CheckpointError,
    MissingCheckpointError,
    check_checkpoint,
    check_fit,
    load_model,
    model_class_name,
    other_plugin_error,
    read_torch_file,
    resolve_run_weights,
    save_weights,
    to_plain,
)

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "RUN_WEIGHT_FILES", "WEIGHTS_FORMAT",
           "CheckpointError", "MissingCheckpointError", "atomic_write", "check_compatible",
           "find_resume_checkpoint", "load_checkpoint", "load_model", "model_class_name",
           "read_checkpoint_config", "resolve_run_weights", "save_checkpoint", "save_weights",
           "stale_temp_files", "to_plain"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically ``torch.save`` a checkpoint dict (see module docstring for the keys)."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that name the file.

    A dict with ``format="kpt.checkpoint"`` is checked for every key the trainer writes; other dicts
    (rank shards) are returned as read.
    """
    path = Path(path)
    ckpt = read_torch_file(path, map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a kpt checkpoint (a "
                              "dict)")
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        check_checkpoint(ckpt, path)
    return ckpt


def read_checkpoint_config(path: str | Path, plugin_name: str | None = None) -> dict[str, Any]:
    """The ``config`` of a training checkpoint, memory-mapped (tensors are not read into memory).

    Args:
        path: a ``last.pt`` / ``best.pt``.
        plugin_name: when given, a checkpoint of another plugin raises CheckpointError (resuming a gait
            run as mnist must not fail later on gait's config keys).
    """
    path = Path(path)
    ckpt = check_checkpoint(read_torch_file(path, mmap=True), path)
    if plugin_name is not None and ckpt["plugin"] != plugin_name:
        raise other_plugin_error(path, ckpt["plugin"], plugin_name)
    return ckpt["config"]


def check_compatible(ckpt: dict[str, Any], path: str | Path, plugin_name: str, model: nn.Module,
                     skip: list[str] | tuple[str, ...] = ()) -> None:
    """Raise CheckpointError unless ``ckpt`` was written by ``plugin_name`` for this model.

    Compares the plugin, the model class and every parameter/buffer name and shape (except ``skip``:
    rank-local weights, whose shapes differ per rank), and names what differs.
    """
    path = Path(path)
    check_checkpoint(ckpt, path)
    if ckpt["plugin"] != plugin_name:
        raise other_plugin_error(path, ckpt["plugin"], plugin_name)
    if ckpt["model_class"] != model_class_name(model):
        raise CheckpointError(f"{path} holds a {ckpt['model_class']}, this run builds a "
                              f"{model_class_name(model)}; check the model section of the config")
    check_fit(model, ckpt["model"], path, set(skip))


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
            raise MissingCheckpointError(f"--resume {resume}: no checkpoint at {path}")
        return path
    if out_dir is not None:
        return out_dir / "last.pt" if (out_dir / "last.pt").is_file() else None
    candidates = sorted(runs_root.glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None
