"""Optimizer and learning-rate schedule for the engine, built with timm's factories.

Weight decay is not applied to 1-D parameters (norm weights, biases), to names a model lists in
``no_weight_decay()`` (timm's convention) or to names containing a ``train.no_decay`` fragment (absolute
position embeddings, relative-position and KP-RPE tables): decaying a position table pulls it towards "no
position", which is not a prior we want. The schedule is always stepped per optimizer update, so the
learning rate at step t is a pure function of t and a resumed run follows the same curve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

logger = logging.getLogger(__name__)


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names from every submodule's ``no_weight_decay()`` (timm convention)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            for name in fn():
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_fragments: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Args:
        model: the module to train (unwrapped, not DDP).
        weight_decay: decay of the first group.
        no_decay_fragments: substrings of parameter names that are never decayed.

    Returns:
        ``[{"params": [...], "weight_decay": wd, "names": [...]}, {"params": [...], "weight_decay": 0.,
        "names": [...]}]`` without empty groups.
    """
    skip = _no_weight_decay_names(model)
    fragments = tuple(no_decay_fragments)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name in skip or any(f in name for f in fragments)
        (no_decay if exempt else decay).append((name, param))
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay,
               "names": [n for n, _ in decay]},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0,
               "names": [n for n, _ in no_decay]}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2`` over :func:`param_groups` with ``train.optimizer/lr/momentum``."""
    groups = param_groups(model, train_cfg.weight_decay, train_cfg.no_decay)
    for g in groups:
        logger.debug("param group wd=%s: %d tensors", g["weight_decay"], len(g["params"]))
        del g["names"]  # optimizers keep unknown group keys in their state dict; keep it small
    kwargs: dict[str, Any] = {"lr": train_cfg.lr, "weight_decay": train_cfg.weight_decay}
    if train_cfg.optimizer.lower() in ("sgd", "momentum", "nesterov", "rmsprop", "lars"):
        kwargs["momentum"] = train_cfg.momentum
    return create_optimizer_v2(groups, opt=train_cfg.optimizer, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Any, total_steps: int,
                    steps_per_epoch: int) -> Any:
    """A timm scheduler counted in optimizer steps (``None`` for ``train.sched=none``).

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        train_cfg: ``train`` config section (``sched``, ``warmup_epochs``, ``warmup_lr``, ``min_lr``,
            ``decay_epochs``).
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (converts the epoch-valued keys to steps).

    Call ``scheduler.step_update(num_updates=step)`` before optimizer step ``step`` (0-based).
    """
    sched = train_cfg.sched.lower()
    if sched in ("none", ""):
        return None
    if sched == "plateau":
        raise ValueError("train.sched=plateau needs a metric per epoch; use cosine, step, multistep, "
                         "poly, tanh or none")
    warmup = round(train_cfg.warmup_epochs * steps_per_epoch)
    decay = round(train_cfg.decay_epochs * steps_per_epoch) or max(1, total_steps // 3)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=max(1, total_steps), decay_epochs=decay,
        decay_milestones=[decay * i for i in (1, 2)], warmup_epochs=warmup,
        warmup_lr=train_cfg.warmup_lr, min_lr=train_cfg.min_lr, step_on_epochs=False,
        updates_per_epoch=1)
    return scheduler


def total_training_steps(epochs: int, steps_per_epoch: int, max_steps: int) -> int:
    """Optimizer steps of the run: ``epochs * steps_per_epoch``, capped by ``max_steps`` when > 0."""
    total = epochs * steps_per_epoch
    if max_steps > 0:
        total = min(total, max_steps) if epochs > 0 else max_steps
    return max(0, total)


def epochs_needed(total_steps: int, steps_per_epoch: int) -> int:
    """Epochs the loop must start to perform ``total_steps`` steps."""
    return math.ceil(total_steps / max(1, steps_per_epoch))
