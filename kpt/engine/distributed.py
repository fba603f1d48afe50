"""torchrun / DDP support. A single process never starts a process group.

``torchrun --nproc-per-node N -m kpt train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; then
:func:`init_distributed` starts the group (NCCL on CUDA, gloo on CPU). Everything else here works the same
with and without a group, so the trainer calls these helpers unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands. ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by torchrun with more than one process.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; under DDP on CUDA each process takes
            ``cuda:LOCAL_RANK``.

    Returns:
        ``(DistInfo, torch.device)`` for this process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device!r} but CUDA is not available; use train.device=cpu")
    if world > 1:
        if use_cuda:
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            # Evaluation runs on rank 0 while the others wait: allow long protocols (IJB, Gait3D).
            minutes = float(os.environ.get("KPT_DIST_TIMEOUT_MIN", "180"))
            dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                    timeout=timedelta(minutes=minutes))
        return DistInfo(rank, world, local), dev
    if use_cuda:
        dev = torch.device(device if device.startswith("cuda") else "cuda")
    else:
        dev = torch.device("cpu")
    return DistInfo(), dev


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each scalar over ranks (identity for one process). Keys must match over ranks."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    backend_cuda = dist.get_backend() == "nccl"
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device="cuda" if backend_cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def assert_in_sync(model: torch.nn.Module, info: DistInfo, skip: Sequence[str] = ()) -> None:
    """Raise if any parameter differs between ranks (cheap: compares per-tensor sums).

    DDP keeps replicas identical only if every gradient flows through the wrapped ``forward``; a
    ``training_step`` that calls submodules directly silently trains diverging replicas.
    """
    if not info.enabled:
        return
    skipped = set(skip)  # rank-local (sharded) parameters differ by design
    named = [(n, p) for n, p in model.named_parameters() if n not in skipped]
    if not named:
        return
    names, params = zip(*named)
    device = params[0].device if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.stack([p.detach().double().sum() for p in params]).to(device)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    diverged = [n for n, lo, hi in zip(names, low.tolist(), high.tolist())
                if abs(hi - lo) > 1e-6 * max(1.0, abs(hi))]
    if diverged:
        raise RuntimeError(f"model replicas diverged over {info.world_size} processes in "
                           f"{diverged[:5]}: training_step must call model(...) (the DDP wrapper)")


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (identity for one process)."""
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
