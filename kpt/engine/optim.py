"""Optimizer and learning-rate schedule for the engine, built with timm's factories.

Weight decay is not applied to 1-D parameters (norm weights, biases), to names a model lists in
``no_weight_decay()`` (timm's convention) or to names containing a ``train.no_decay`` fragment (absolute
position embeddings, relative-position and KP-RPE tables): decaying a position table pulls it towards "no
position", which is not a prior we want. The schedule is always stepped per optimizer update, so the
learning rate at step t is a pure function of t and a resumed run follows the same curve.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2
from torch import nn

from kpt.errors import UserError

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


def lr_scale_of(name: str, lr_scales: Mapping[str, float]) -> float:
    """Learning-rate multiplier of parameter ``name``: the first fragment of ``lr_scales`` it contains."""
    for fragment, scale in lr_scales.items():
        if fragment in name:
            return float(scale)
    return 1.0


def param_groups(model: nn.Module, weight_decay: float, no_decay_fragments: Iterable[str] = (),
                 lr_scales: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Split trainable parameters by weight decay (decayed / not) and learning-rate multiplier.

    Args:
        model: the module to train (unwrapped, not DDP).
        weight_decay: decay of the decayed groups.
        no_decay_fragments: substrings of parameter names that are never decayed.
        lr_scales: ``{name fragment: multiplier}``; a parameter takes the first fragment it contains
            (default 1). Groups with a multiplier carry timm's ``lr_scale`` key, which timm's
            schedulers multiply into every scheduled learning rate.

    Returns:
        ``[{"params": [...], "weight_decay": wd, "names": [...]}, ...]``, decayed groups first, without
        empty groups; groups whose multiplier is not 1 also hold ``"lr_scale"``.
    """
    skip = _no_weight_decay_names(model)
    fragments = tuple(no_decay_fragments)
    scales = dict(lr_scales or {})
    buckets: dict[tuple[bool, float], list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name in skip or any(f in name for f in fragments)
        buckets.setdefault((exempt, lr_scale_of(name, scales)), []).append((name, param))
    groups = []
    for (exempt, scale), members in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        group: dict[str, Any] = {"params": [p for _, p in members],
                                 "weight_decay": 0.0 if exempt else weight_decay,
                                 "names": [n for n, _ in members]}
        if scale != 1.0:
            group["lr_scale"] = scale
        groups.append(group)
    return groups


def build_optimizer(model: nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2`` over :func:`param_groups` with ``train.optimizer/lr/momentum``.

    Learning-rate multipliers come from the model's ``lr_scale_prefixes`` attribute (a plugin's
    recipe, e.g. OpenGait's 0.1× for the gait stem and head) and ``train.lr_scale``; a parameter
    matching fragments of both takes the config's.
    """
    scales = dict(getattr(train_cfg, "lr_scale", None) or {})  # first: the config's fragments win
    for fragment, scale in (getattr(model, "lr_scale_prefixes", None) or {}).items():
        scales.setdefault(fragment, scale)
    groups = param_groups(model, train_cfg.weight_decay, train_cfg.no_decay, scales)
    for g in groups:
        logger.debug("param group wd=%s lr_scale=%s: %d tensors", g["weight_decay"],
                     g.get("lr_scale", 1.0), len(g["params"]))
        del g["names"]  # optimizers keep unknown group keys in their state dict; keep it small
        # timm's schedulers multiply lr_scale into every scheduled value (their base is the group's
        # initial lr, so it must stay unscaled); without a scheduler nobody would apply it
        if "lr_scale" in g and train_cfg.sched.lower() in ("none", ""):
            g["lr"] = train_cfg.lr * g["lr_scale"]
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
            ``decay_epochs``, ``decay_milestones``, ``warmup_prefix``, ``sched_lag``,
            ``cooldown_steps``: the last steps of the run held at ``min_lr``).
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
    # OpenGait's Gait3D recipe: cosine over the first 60k of 80k iterations, then min_lr; timm's
    # schedules hold min_lr once past their length, so the cooldown only shortens that length
    cooldown = int(getattr(train_cfg, "cooldown_steps", 0) or 0)
    if cooldown and cooldown >= total_steps:
        raise UserError(f"train.cooldown_steps={cooldown} must be below the run's {total_steps} "
                        f"optimizer steps")
    scheduled = total_steps - cooldown
    decay = round(train_cfg.decay_epochs * steps_per_epoch) or max(1, scheduled // 3)
    num_steps = max(1, scheduled)
    prefix = bool(getattr(train_cfg, "warmup_prefix", False))
    if prefix:
        # timm's t_initial counts the schedule after the warm-up (CVLface: total − warmup)
        num_steps = max(1, scheduled - warmup)
    if sched == "multistep" and getattr(train_cfg, "decay_milestones", None):
        scheduler = MilestoneScheduler(
            optimizer, decay_t=milestone_steps(train_cfg.decay_milestones, steps_per_epoch),
            decay_rate=0.1, warmup_t=warmup, warmup_lr_init=train_cfg.warmup_lr,
            warmup_prefix=prefix, t_in_epochs=False)
    else:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=sched, num_epochs=num_steps, decay_epochs=decay,
            decay_milestones=[decay * i for i in (1, 2)], warmup_epochs=warmup,
            warmup_prefix=prefix, warmup_lr=train_cfg.warmup_lr, min_lr=train_cfg.min_lr,
            step_on_epochs=False, updates_per_epoch=1)
    lag = int(getattr(train_cfg, "sched_lag", 0) or 0)
    return LaggedScheduler(scheduler, lag) if lag > 0 else scheduler


def milestone_steps(milestones: Iterable[Any], steps_per_epoch: int) -> list[int]:
    """Optimizer steps ``round(milestone · steps_per_epoch)`` of milestones given in epochs (sorted)."""
    steps = []
    for m in milestones:
        try:
            epoch = float(m)
        except (TypeError, ValueError):
            raise UserError(f"train.decay_milestones: {m!r} is not a number of epochs") from None
        if not math.isfinite(epoch) or epoch < 0:
            raise UserError(f"train.decay_milestones: {m!r} is not a finite number of epochs >= 0")
        steps.append(round(epoch * steps_per_epoch))
    return sorted(steps)


class MilestoneScheduler(MultiStepLRScheduler):
    """timm's multistep schedule, decaying once the step is *past* each milestone (``t > m``).

    That is CVLface's ``StepScheduler`` rule; timm's own class decays at ``t + 1 >= m``, two
    steps earlier (a convention it keeps for compatibility), so the rule is written out here.
    """

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        if self.warmup_prefix:
            t = t - self.warmup_t
        passed = bisect.bisect_left(self.decay_t, t)  # milestones strictly below t
        return [v * self.decay_rate ** passed for v in self.base_values]


class LaggedScheduler:
    """A timm scheduler whose step ``t`` uses the learning rate of step ``t − lag`` (≥ 0).

    CVLface calls its scheduler after ``optimizer.step()`` with the step just taken, so optimizer
    step t runs at the schedule's value of t − 1 (and step 0 at the initial warm-up value);
    ``train.sched_lag=1`` reproduces that exactly.
    """

    def __init__(self, scheduler: Any, lag: int) -> None:
        self.scheduler, self.lag = scheduler, int(lag)

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        self.scheduler.step_update(num_updates=max(0, num_updates - self.lag), metric=metric)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["scheduler"], name)


def total_training_steps(epochs: int, steps_per_epoch: int, max_steps: int) -> int:
    """Optimizer steps of the run: ``epochs * steps_per_epoch``, capped by ``max_steps`` when > 0."""
    total = epochs * steps_per_epoch
    if max_steps > 0:
        total = min(total, max_steps) if epochs > 0 else max_steps
    return max(0, total)


def epochs_needed(total_steps: int, steps_per_epoch: int) -> int:
    """Epochs the loop must start to perform ``total_steps`` steps."""
    return math.ceil(total_steps / max(1, steps_per_epoch))
