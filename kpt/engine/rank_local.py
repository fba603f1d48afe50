"""Rank-local parameters: weights that differ by design between DDP processes.

A module that shards its parameters over ranks (PartialFC: each rank owns a slice of the class centres)
declares it with a class attribute ``kpt_rank_local = True``. The engine then

* tells DDP to ignore those parameters and buffers (no broadcast from rank 0, no gradient averaging),
* leaves them out of the check that replicas are identical,
* saves them, with each rank's optimizer state, in one shard file per rank next to the checkpoint:
  ``last.step{S}.rank{r}.pt``. The shard files of step S are written before the main file of step S
  replaces the previous one, and older shards are deleted only afterwards, so whatever main file is on
  disk always has its shards (a run killed while saving stays resumable).

Resuming such a run needs the same number of processes (the shards are not re-split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpt.engine import checkpoint as ckpt_io


def rank_local_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.state_dict()``) of parameters and buffers under ``kpt_rank_local`` modules."""
    names: list[str] = []
    for prefix, module in model.named_modules():
        if getattr(module, "kpt_rank_local", False):
            stem = f"{prefix}." if prefix else ""
            names += [stem + n for n, _ in module.named_parameters()]
            names += [stem + n for n, _ in module.named_buffers()]
    return sorted(set(names))


def shard_path(main: Path, step: int, rank: int) -> Path:
    """``last.pt`` -> ``last.step{step}.rank{rank}.pt`` in the same folder."""
    return main.with_name(f"{main.stem}.step{step}.rank{rank}{main.suffix}")


def save_shard(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str], main: Path,
               step: int, rank: int, world_size: int) -> Path:
    """Atomically write this rank's rank-local weights and optimizer state for ``step``."""
    state = model.state_dict()
    shard = {"format": "kpt.rank_shard", "step": step, "rank": rank, "world_size": world_size,
             "model": {n: state[n] for n in names}, "optimizer": optimizer.state_dict()}
    return ckpt_io.save_checkpoint(shard, shard_path(main, step, rank))


def remove_old_shards(main: Path, keep_step: int, rank: int) -> None:
    """Delete this rank's shards of ``main`` for steps other than ``keep_step``."""
    for path in main.parent.glob(f"{main.stem}.step*.rank{rank}{main.suffix}"):
        if path != shard_path(main, keep_step, rank):
            path.unlink(missing_ok=True)


def load_shard(main: Path, ckpt: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Read this rank's shard for the main checkpoint ``ckpt`` (checked against its step and world)."""
    saved_world = int(ckpt["rank_local"]["world_size"])
    if saved_world != world_size:
        raise ckpt_io.CheckpointError(
            f"{main} has rank-local parameters ({', '.join(ckpt['rank_local']['names'][:3])}...) "
            f"sharded over {saved_world} processes; resume it with {saved_world} processes, "
            f"not {world_size}")
    path = shard_path(main, int(ckpt["step"]), rank)
    shard = ckpt_io.load_checkpoint(path)
    if shard.get("step") != ckpt["step"] or shard.get("rank") != rank:
        raise ckpt_io.CheckpointError(f"{path} does not belong to {main} (step {shard.get('step')}, "
                                      f"rank {shard.get('rank')})")
    return shard
