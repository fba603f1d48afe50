"""The one inference loop plugins evaluate with: ``predict(model, data, forward, ...)``.

It owns everything around the forward pass that every evaluation needs and that is easy to get
subtly wrong when each plugin writes its own loop: eval mode (restored afterwards, also on error),
no autograd, autocast exactly as the run trains (``train.amp``), batching, moving batches to the
device and the outputs back to the CPU, and joining the per-batch outputs. A plugin's ``evaluate``
then only says what one forward returns and computes its metrics on the result.

The training loop takes :func:`autocast_context` and :func:`move_to_device` from here too, so that
training and evaluation autocast and move data the same way.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate

from kpt.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["autocast_context", "default_forward", "move_to_device", "predict"]


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Tensors of a (nested) batch moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def autocast_context(amp: str, device: torch.device | str) -> Any:
    """Autocast for ``train.amp`` (none | bf16 | fp16)."""
    device = torch.device(device)
    if amp == "none":
        return nullcontext()
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError(f"train.amp=fp16 needs a CUDA GPU, but this run uses {device.type} "
                            f"(train.device); on a CPU use train.amp=bf16 (CPU autocast) or "
                            f"train.amp=none")
        return torch.autocast("cuda", dtype=torch.float16)
    raise UserError(f"train.amp={amp!r}: expected none, bf16 or fp16")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(images, keypoints)`` for a kpt batch.

    A dict batch gives ``model(batch["image"], batch.get("keypoints"))`` (the plugin batch
    convention), a tuple/list ``model(*batch)``, anything else ``model(batch)``.
    """
    if isinstance(batch, Mapping):
        return model(batch["image"], batch.get("keypoints"))
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def _to_cpu(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach().cpu()
    if isinstance(out, Mapping):
        return {k: _to_cpu(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_cpu(v) for v in out)
    return out


def _concat(outputs: list[Any]) -> Any:
    """Per-batch outputs (tensors, or tuples/dicts of them) joined along the batch dimension."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs)
    if isinstance(first, Mapping):
        return {k: _concat([o[k] for o in outputs]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(parts)) for parts in zip(*outputs))
    raise TypeError(f"predict: cannot concatenate outputs of type {type(first).__name__}; "
                    "return tensors (or tuples/dicts of them) from forward, or pass concat=False")


def predict(model: nn.Module, data: Iterable[Any] | Dataset,
            forward: Callable[[nn.Module, Any], Any] | None = None, *,
            batch_size: int | None = None, collate_fn: Callable[[list[Any]], Any] | None = None,
            device: torch.device | str = "cpu", amp: str = "none", concat: bool = True,
            progress: bool | None = None, desc: str = "eval") -> Any:
    """Run ``forward`` over every batch in eval mode, without autograd, under the run's autocast.

    Args:
        model: the network (a DDP wrapper is unwrapped: evaluation must not all-reduce).
        data: ready batches (any iterable) when ``batch_size`` is None; otherwise a dataset
            (``len`` and indexing) read in order, ``batch_size`` items at a time.
        forward: ``forward(model, batch) -> Tensor`` (or a tuple/dict of tensors) on the device;
            default :func:`default_forward`. Put the plugin's per-batch work here (flip fusion,
            argmax, picking one output), so it runs on the device under autocast.
        batch_size: items per batch when ``data`` is a dataset.
        collate_fn: joins a list of dataset items into a batch (default: torch's
            ``default_collate``); only with ``batch_size``.
        device: where batches go before ``forward``.
        amp: ``train.amp`` of the run (none | bf16 | fp16), so evaluation sees the numerics
            training saw.
        concat: join the per-batch outputs along dimension 0 (tensors, tuples or dicts of
            tensors); False returns the list of per-batch outputs.
        progress: show a progress bar named ``desc`` (default: when stderr is a terminal); it
            disappears when the loop ends.

    Returns:
        The outputs on the CPU: e.g. (N, ...) for a forward returning (B, ...) per batch, or a
        list of per-batch outputs when ``concat`` is False.

    Raises:
        ValueError: no batches to concatenate, or an unknown ``amp``.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    forward = forward or default_forward
    if batch_size is not None:
        data = DataLoader(data, batch_size=batch_size, shuffle=False,  # type: ignore[arg-type]
                          collate_fn=collate_fn or default_collate)
    elif collate_fn is not None:
        raise ValueError("predict: collate_fn needs batch_size (data is read as ready batches)")
    autocast_context(amp, device)  # an unknown amp fails before any batch is read
    was_training = model.training
    model.eval()
    outputs: list[Any] = []
    try:
        # no_grad rather than inference_mode: buffers a model creates lazily here must stay
        # usable when training continues after the evaluation
        from tqdm import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        # fork_rng: the DataLoader draws its base seed from the global generator; evaluating in
        # the middle of a run must not change what the run does afterwards
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for batch in tqdm(data, total=total, desc=desc, unit="batch", leave=False,
                              file=sys.stderr, disable=not show, dynamic_ncols=True):
                with autocast_context(amp, device):
                    out = forward(model, move_to_device(batch, device))
                outputs.append(_to_cpu(out))
    finally:
        model.train(was_training)
    if not concat:
        return outputs
    if not outputs:
        raise ValueError("predict: no batches (empty data)")
    return _concat(outputs)
