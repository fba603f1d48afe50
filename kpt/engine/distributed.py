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


# -- whole-batch losses and statistics under DDP ------------------------------------------------------
def group_world_size() -> int:
    """Processes in the default group (1 when no group was started)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order.

    Only this rank's slice stays in the autograd graph: the others are constants here, and their
    gradients are computed by their own ranks (OpenGait's ``ddp_all_gather``). A loss over the
    gathered batch must therefore scale its gradient by the world size for DDP's gradient mean to
    give the gradient of the loss of the whole batch (see :func:`scale_grad`). Identity without a
    process group.

    Args:
        tensor: (n, ...) with the same shape and dtype on every rank.

    Returns:
        (world_size * n, ...).
    """
    world = group_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts, 0)


def scale_grad(value: torch.Tensor, factor: float) -> torch.Tensor:
    """``value`` unchanged in the forward pass, its gradient multiplied by ``factor``.

    OpenGait multiplies the gathered triplet loss itself by the world size; scaling only the
    gradient gives the same update while the logged loss stays the loss of the whole batch.
    """
    if factor == 1:
        return value
    return value * factor - value.detach() * (factor - 1)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the incoming gradients over ranks as well."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlooSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch, for CPU (gloo) process groups.

    torch's ``SyncBatchNorm`` runs on GPUs only; this computes the same thing with differentiable
    all-reduces: mean and biased variance over every rank's samples normalise the input, the
    running variance takes the unbiased one, and the backward pass sums the statistics' gradients
    over ranks as ``SyncBatchNorm`` does. Outside training, or without a process group, it is a
    plain BatchNorm. Input (N, C, ...), any number of trailing dimensions.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or group_world_size() == 1:
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch's BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / x.shape[1]])
        totals = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
        n = totals[-1].detach()
        mean = totals[:-1] / n
        centred = x - mean.reshape(shape)
        var = _SumOverRanks.apply(centred.pow(2).sum(dims)) / n  # two passes: exact for any mean
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), factor)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased, factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm of ``module`` synchronised over the running process group.

    NCCL groups get torch's ``SyncBatchNorm``, gloo (CPU) groups :class:`GlooSyncBatchNorm`;
    weights and running statistics are kept and the state-dict keys do not change. Without a
    group of more than one process ``module`` is returned unchanged. Call it before wrapping the
    model in DDP.

    Returns:
        ``module`` (converted in place) or, when ``module`` itself is a BatchNorm, its replacement.
    """
    if group_world_size() == 1:
        return module
    if dist.get_backend() == "nccl":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_gloo_sync(module)


def _to_gloo_sync(module: torch.nn.Module) -> torch.nn.Module:
    norm = torch.nn.modules.batchnorm._BatchNorm
    if isinstance(module, norm) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        for name, param in new.named_parameters():  # frozen norms stay frozen
            param.requires_grad_(getattr(module, name).requires_grad)
        new.train(module.training)
        return new.to(next(module.buffers(), torch.empty(0)).device)
    for name, child in module.named_children():
        new_child = _to_gloo_sync(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
