"""``kpt plugins check NAME``: a tiny CPU dry run of the plugin contract.

It validates the plugin object, builds its config (with ``Plugin.check_config`` applied to keep it tiny),
its data and its model, checks one batch (keys, keypoints finite and in [0, 1]), runs one training step
through a DDP-like wrapper (so a ``training_step`` that reaches into submodules instead of calling
``model(...)`` fails here and not first on a multi-GPU machine), one optimizer step, and one evaluation.
This is what a plugin author's own test calls.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kpt._names import import_object
from kpt.config import build_config, validate_config
from kpt.data.keypoints import check_keypoints
from kpt.data.samplers import ShardedBatchSampler
from kpt.engine.optim import build_optimizer
from kpt.engine.seeding import seed_everything
from kpt.engine.trainer import evaluate_model, split_step_output
from kpt.plugin import Plugin, TaskData, load_plugin

logger = logging.getLogger(__name__)


@dataclass
class CheckResult:
    """One line of the check report."""

    what: str
    ok: bool
    detail: str = ""


class DDPLike(nn.Module):
    """Exposes only ``forward`` and ``.module``, like ``DistributedDataParallel``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def check_plugin(name: str | Plugin, overrides: Iterable[str] = (),
                 report: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run the dry run; stops at the first failure.

    Args:
        name: a plugin name (discovered as ``kpt`` would) or a Plugin object.
        overrides: extra ``key=value`` overrides after ``Plugin.check_config``.
        report: called with each result as it is produced (the CLI prints them).

    Returns:
        The results; all ``ok`` when the plugin passes.
    """
    results: list[CheckResult] = []

    def add(what: str, ok: bool, detail: str = "") -> bool:
        results.append(CheckResult(what, ok, detail))
        if report is not None:
            report(results[-1])
        return ok

    def attempt(what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a report line
            logger.debug("%s", traceback.format_exc())
            add(what, False, f"{type(exc).__name__}: {exc}")
            return False, None
        return True, value

    ok, plugin = attempt("load and validate", lambda: name if isinstance(name, Plugin)
                         else load_plugin(name))
    if not ok:
        return results
    add("load and validate", True, f"{plugin.name}: {plugin.description}")

    def make_config() -> Any:
        cfg = build_config(plugin)
        for key, value in dict(plugin.check_config).items():
            cfg.set(key, value, source=f"check_config of plugin {plugin.name!r}")
        cfg.override(["train.device=cpu", "train.amp=none", "train.num_workers=0", *overrides])
        validate_config(cfg, plugin)  # the dry run's own keys must be valid choices and numbers
        return cfg

    ok, cfg = attempt("config", make_config)
    if not ok or not add("config", True, f"{len(cfg.flat())} keys"):
        return results
    for src, target in dict(plugin.keypoint_sources).items():
        if not attempt(f"keypoint source {src}", lambda t=target, s=src: import_object(t, s))[0]:
            return results
    seed_everything(cfg.train.seed)
    ok, data = attempt("build_data", lambda: plugin.build_data(cfg))
    if not ok:
        return results
    if not isinstance(data, TaskData) or len(data.train) == 0:
        add("build_data", False, f"expected a TaskData with a non-empty train set, got {data!r:.80}")
        return results
    add("build_data", True, f"train={len(data.train)}, evals={', '.join(data.evals) or 'none'}")
    ok, batch = attempt("one batch", lambda: _first_batch(data, cfg))
    if not ok:
        return results
    ok, _ = attempt("one batch", lambda: _check_batch(batch))
    if not ok:
        return results
    add("one batch", True, f"image {tuple(batch['image'].shape)}, keypoints "
                           f"{tuple(batch['keypoints'].shape)} in [{float(batch['keypoints'].min()):.2f}, "
                           f"{float(batch['keypoints'].max()):.2f}]")
    ok, model = attempt("build_model", lambda: plugin.build_model(cfg, data.info))
    if not ok:
        return results
    if not isinstance(model, nn.Module):
        add("build_model", False, f"expected an nn.Module, got {type(model).__name__}")
        return results
    add("build_model", True, f"{type(model).__name__}, "
                             f"{sum(p.numel() for p in model.parameters()):,} parameters")
    ok, detail = attempt("training step", lambda: _one_step(plugin, model, batch, cfg))
    if not ok or not add("training step", True, detail):
        return results
    ok, metrics = attempt("evaluate", lambda: evaluate_model(plugin, model, data, cfg,
                                                             torch.device("cpu")))
    if not ok:
        return results
    if not metrics:
        add("evaluate", False, "returned no metrics")
    elif plugin.primary_metric and plugin.primary_metric not in metrics:
        add("evaluate", False, f"primary_metric {plugin.primary_metric!r} not among "
                               f"{', '.join(metrics)}")
    else:
        add("evaluate", True, ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:6]))
    return results


def _first_batch(data: TaskData, cfg: Any) -> Any:
    batch_size = min(cfg.train.batch_size, len(data.train))
    if data.batch_sampler is not None:
        sampler = data.batch_sampler(data.train, batch_size, cfg.train.seed, 0, 1)
    else:
        sampler = ShardedBatchSampler(len(data.train), min(batch_size, 8), cfg.train.seed)
    loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=data.collate_fn)
    return next(iter(loader))


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, dict):
        raise TypeError(f"a batch must be a dict, got {type(batch).__name__}")
    missing = [k for k in ("image", "keypoints", "label") if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; items need 'image', 'keypoints', 'label'")
    check_keypoints(batch["keypoints"], what="batch['keypoints']")
    if batch["keypoints"].shape[0] != batch["image"].shape[0]:
        raise ValueError(f"batch size differs: image {tuple(batch['image'].shape)} vs keypoints "
                         f"{tuple(batch['keypoints'].shape)}")


def _one_step(plugin: Plugin, model: nn.Module, batch: dict, cfg: Any) -> str:
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    try:
        out = plugin.training_step(DDPLike(model), batch, cfg)
    except AttributeError as exc:
        raise AttributeError(f"{exc}. Under DDP the model is wrapped: training_step must call "
                             f"model(...), not its submodules (use model.module only for reading)") \
            from exc
    loss, _ = split_step_output(out, plugin.name)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
        raise RuntimeError("the loss has no gradient with respect to any parameter")
    optimizer.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
    return f"loss {loss.item():.4f}, {changed}/{len(after)} parameter tensors updated"
