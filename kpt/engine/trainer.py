"""The training loop every plugin shares: ``train(plugin, cfg, out_dir, resume)``.

Order of one step: schedule the learning rate for this step, forward under autocast, backward, clip,
optimizer step; then (maybe) log, evaluate, save. A checkpoint taken after step s holds everything that
decides step s+1 (weights, optimizer, scaler, RNG states of every rank, epoch and batch position), and
the sampler order is a function of (seed, epoch), so ``--resume`` continues exactly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from kpt.config import Config
from kpt.data.samplers import ShardedBatchSampler, SkipBatches
from kpt.engine import checkpoint as ckpt_io
from kpt.engine.curves import CURVES, plot_curves
from kpt.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    assert_in_sync,
    barrier,
    broadcast_object,
    init_distributed,
)
from kpt.engine.inference import autocast_context, move_to_device  # shared with evaluation
from kpt.engine.interrupt import StopRequest, TrainingInterrupted
from kpt.engine.loggers import attach_run_log, build_sink, detach_run_log
from kpt.engine.malloc import keep_freed_memory
from kpt.engine.optim import build_optimizer, build_scheduler, epochs_needed, total_training_steps
from kpt.engine.progress import MetricsLog, Progress, dump_json, header_lines, metric_table
from kpt.engine.rank_local import load_shard, rank_local_names, remove_old_shards, save_shard
from kpt.engine.run_dir import RunDirError, RunLock, claim_run_dir, new_run_dir
from kpt.engine.seeding import get_rng_state, seed_everything, set_rng_state, worker_init
from kpt.errors import UserError
from kpt.plugin import Plugin, TaskData

logger = logging.getLogger("kpt.engine")


#: kpt's one unit, stated in every summary.json: plugins report accuracy-like metrics in percent
METRIC_UNITS = "percent: accuracy, rank-k, mAP, mINP, VAL; raw: loss, lr, threshold, far, time"


def default_run_dir(domain: str, root: str | Path = "runs") -> Path:
    """A new, empty run folder ``runs/DOMAIN/<timestamp>[-NN]``, created here (unique across processes:
    see :func:`kpt.engine.run_dir.new_run_dir`)."""
    return new_run_dir(Path(root) / domain)




def split_step_output(out: Any, plugin: str) -> tuple[Tensor, dict[str, float]]:
    """``loss`` or ``(loss, logs)`` from ``training_step``, checked."""
    loss, logs = (out if isinstance(out, tuple) else (out, {}))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"plugin {plugin!r}: training_step must return a scalar loss tensor (or "
                        f"(loss, logs)), got {type(loss).__name__}")
    return loss, {k: float(v) for k, v in dict(logs).items()}


def evaluate_model(plugin: Plugin, model: nn.Module, data: TaskData, cfg: Config,
                   device: torch.device) -> dict[str, float]:
    """Run the plugin's evaluation in eval mode without gradients; checks the result is flat floats."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics = plugin.evaluate(model, data, cfg, device)
    finally:
        model.train(was_training)
    if not isinstance(metrics, dict):
        raise TypeError(f"plugin {plugin.name!r}: evaluate must return a dict of floats, "
                        f"got {type(metrics).__name__}")
    try:
        return {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as exc:
        raise TypeError(f"plugin {plugin.name!r}: evaluate must return a flat dict of floats "
                        f"({exc})") from exc


class Trainer:
    """One training run. Use :func:`train` unless you need the pieces."""

    def __init__(self, plugin: Plugin, cfg: Config, out_dir: Path, resume: Path | None,
                 info: DistInfo, device: torch.device) -> None:
        self.plugin, self.cfg, self.out_dir, self.info, self.device = plugin, cfg, out_dir, info, device
        t = cfg.train
        autocast_context(t.amp, device)  # refuse fp16 on a CPU before data and model are built
        if device.type == "cpu":
            keep_freed_memory()  # page faults were a quarter of a CPU step (kpt.engine.malloc)
        seed_everything(t.seed, t.deterministic)  # same seed everywhere: identical initial weights
        self.data = plugin.build_data(cfg)
        if not isinstance(self.data, TaskData):
            raise TypeError(f"plugin {plugin.name!r}: build_data must return a kpt.plugin.TaskData, "
                            f"got {type(self.data).__name__}")
        self.model = plugin.build_model(cfg, self.data.info).to(device)
        if t.batch_size % info.world_size:
            raise UserError(f"train.batch_size={t.batch_size} (global) must be divisible by the "
                            f"number of processes {info.world_size}")
        per_rank = t.batch_size // info.world_size
        if self.data.batch_sampler is not None:
            self.sampler = self.data.batch_sampler(self.data.train, per_rank, t.seed, info.rank,
                                                   info.world_size)
        else:
            self.sampler = ShardedBatchSampler(len(self.data.train), per_rank, t.seed, info.rank,
                                               info.world_size)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise UserError(f"plugin {plugin.name!r}: the training set ({len(self.data.train)} "
                            f"items) is smaller than one batch (train.batch_size={t.batch_size}); "
                            f"lower train.batch_size or use more training data")
        self.total_steps = total_training_steps(t.epochs, self.steps_per_epoch, t.max_steps)
        self.warmup_note = _warmup_note(t, self.steps_per_epoch, self.total_steps)
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16")
        # Sharded weights (kpt_rank_local modules) differ per rank: only meaningful with > 1 process.
        self.local_names = rank_local_names(self.model) if info.enabled else []
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best: dict[str, Any] = {}
        self.last_metrics: dict[str, float] = {}
        self.last_eval_step = -1
        self.last_save_step, self.last_save_time = -1, time.monotonic()
        self.sink: Any = None  # train.logger (rank 0), built in run()
        if resume is not None:
            self._load(resume)
        else:
            seed_everything(t.seed + info.rank)  # per-rank streams for augmentation / dropout
        self.ddp_model: nn.Module = self.model
        if info.enabled:
            if self.local_names:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.model, self.local_names)
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.log = MetricsLog(out_dir / "metrics.jsonl" if info.is_main else None)
        if resume is not None:
            self.log.truncate_after(self.step)  # steps after the checkpoint are trained again

    def _record(self, record: dict[str, Any]) -> None:
        """One record to metrics.jsonl and to the ``train.logger`` sink (rank 0 only)."""
        self.log.write(record)
        if self.sink is not None:
            self.sink.log(record)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        rng = get_rng_state()
        if self.info.enabled:
            gathered: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        from kpt._version import __version__

        return {
            "format": ckpt_io.CHECKPOINT_FORMAT, "version": ckpt_io.CHECKPOINT_VERSION,
            "kpt_version": __version__, "plugin": self.plugin.name,
            "model_class": ckpt_io.model_class_name(self.model),
            "config": self.cfg.to_dict(), "info": ckpt_io.to_plain(self.data.info),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": ckpt_io.to_plain(self.scheduler.state_dict()) if self.scheduler else None,
            "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "best": dict(self.best),
            "last_eval_step": self.last_eval_step, "world_size": self.info.world_size, "rng": rng_all,
            "rank_local": ({"world_size": self.info.world_size, "names": self.local_names}
                           if self.local_names else None),
        }

    def save(self, name: str = "last.pt") -> None:
        state = self._state()  # collective (RNG gather): every rank calls it
        main = self.out_dir / name
        if self.local_names:  # shards of this step first: the main file must never lack its shards
            save_shard(self.model, self.optimizer, self.local_names, main, self.step,
                       self.info.rank, self.info.world_size)
            barrier(self.info)
        if self.info.is_main:
            ckpt_io.save_checkpoint(state, main)
        barrier(self.info)
        if self.local_names:
            remove_old_shards(main, self.step, self.info.rank)
        if name == "last.pt":
            self.last_save_step, self.last_save_time = self.step, time.monotonic()

    def _load(self, path: Path) -> None:
        ckpt = ckpt_io.load_checkpoint(path, map_location="cpu")
        ckpt_io.check_compatible(ckpt, path, self.plugin.name, self.model, skip=self.local_names)
        if ckpt.get("rank_local"):
            shard = load_shard(path, ckpt, self.info.rank, self.info.world_size)
            shared = {k: v for k, v in ckpt["model"].items() if k not in shard["model"]}
            self.model.load_state_dict({**shared, **shard["model"]})
            self.optimizer.load_state_dict(shard["optimizer"])
        else:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        self.best = dict(ckpt.get("best") or {})
        self.last_eval_step = int(ckpt.get("last_eval_step", -1))
        rngs = ckpt["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            logger.warning("%s was written by %d processes, this run has %d: random streams restart, "
                           "the run will not match an uninterrupted one exactly", path, len(rngs),
                           self.info.world_size)
            seed_everything(self.cfg.train.seed + self.step + self.info.rank)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                    self.batch_in_epoch)

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, show: bool = True) -> dict[str, float]:
        """Run the plugin's evaluation; ``show=False``: no table (the final summary shows it)."""
        metrics: dict[str, float] = {}
        if self.info.is_main:  # the plugin's protocol runs once; the other ranks wait for the result
            metrics = evaluate_model(self.plugin, self.model, self.data, self.cfg, self.device)
        metrics = broadcast_object(metrics, self.info)
        self.last_metrics, self.last_eval_step = metrics, self.step
        self._record({"type": "eval", "step": self.step, "epoch": self.epoch, **metrics})
        if show:
            logger.info("%s", metric_table(metrics, f"evaluation at step {self.step}"))
        key = self.plugin.primary_metric
        if key and key in metrics and (not self.best or metrics[key] > self.best["value"]):
            self.best = {"metric": key, "value": metrics[key], "step": self.step}
            self.save("best.pt")
        return metrics

    # -- training ---------------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        t = self.cfg.train
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        # A private generator: creating the loader must not consume the global RNG, or a resumed run
        # (which creates one more loader) would draw different dropout masks.
        gen = torch.Generator().manual_seed(t.seed * 100_003 + self.epoch * 101 + self.info.rank)
        return DataLoader(self.data.train, batch_sampler=SkipBatches(self.sampler, self.batch_in_epoch),
                          collate_fn=self.data.collate_fn, num_workers=t.num_workers,
                          pin_memory=self.device.type == "cuda", worker_init_fn=worker_init,
                          generator=gen, persistent_workers=False)

    def _train_step(self, batch: dict) -> tuple[float, dict[str, float], int]:
        t = self.cfg.train
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.step)
        self.ddp_model.train()
        with autocast_context(t.amp, self.device):
            loss, logs = split_step_output(self.plugin.training_step(self.ddp_model, batch, self.cfg),
                                           self.plugin.name)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"plugin {self.plugin.name!r}: loss is {loss.item()} at step "
                                     f"{self.step}; lower train.lr or enable train.clip_grad")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.float()).backward()
        if t.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                     t.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        images = batch.get("image") if isinstance(batch, dict) else None
        n = int(images.shape[0]) if isinstance(images, Tensor) else 0
        return float(loss.detach()), logs, n

    def run(self) -> dict[str, Any]:
        """Train to the end (or until a stop request), with the ``train.logger`` sink."""
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.info.is_main:
                self.sink = build_sink(self.cfg.train.logger, self.out_dir, self.cfg.to_dict())
            with StopRequest() as stop:
                return self._run(stop)
        finally:
            if self.sink is not None:
                self.sink.close()
                self.sink = None

    def _run(self, stop: StopRequest) -> dict[str, Any]:
        t = self.cfg.train
        if self.info.is_main:
            (self.out_dir / "config.yaml").write_text(self.cfg.to_yaml())
            for line in header_lines(self.plugin.name, self.device, self.info.world_size, self.model,
                                     len(self.data.train), self.data.evals, self.out_dir,
                                     self.total_steps, self.steps_per_epoch):
                logger.info("%s", line)
            if self.warmup_note:
                logger.warning("%s", self.warmup_note)
        start = time.perf_counter()
        progress = Progress(self.total_steps, self.step, enabled=self.info.is_main)
        window: dict[str, float] = {}
        window_n, window_images, window_start = 0, 0, time.perf_counter()
        try:
            for _ in range(epochs_needed(self.total_steps, self.steps_per_epoch)):
                if self.step >= self.total_steps:
                    break
                for batch in self._loader():
                    loss, logs, n = self._train_step(move_to_device(batch, self.device))
                    self.step += 1
                    self.batch_in_epoch += 1
                    for k, v in {"loss": loss, **logs}.items():
                        window[k] = window.get(k, 0.0) + v
                    window_n, window_images = window_n + 1, window_images + n
                    log_now = self.step % max(1, t.log_every) == 0 or self.step == self.total_steps
                    if log_now:
                        avg = all_reduce_mean({k: v / window_n for k, v in window.items()}, self.info)
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        record = {**avg, "lr": self.optimizer.param_groups[0]["lr"],
                                  "img_s": window_images * self.info.world_size / elapsed}
                        self._record({"type": "train", "step": self.step, "epoch": self.epoch,
                                      **record})
                        window, window_n, window_images = {}, 0, 0
                        window_start = time.perf_counter()
                        progress.update(self.step, record, log_line=True)
                    else:
                        progress.update(self.step, {"loss": loss}, log_line=False)
                    # the last step's evaluation runs after the loop, shown once in the summary
                    if (t.eval_every > 0 and self.step % t.eval_every == 0
                            and self.step < self.total_steps):
                        self.evaluate()
                    if self.batch_in_epoch == self.steps_per_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                        if self.step < self.total_steps:  # the end of the run saves below
                            if t.eval_every == 0:
                                self.evaluate()
                            self.save()
                    elif t.save_every > 0 and self.step % t.save_every == 0:
                        self.save()
                    if self.step >= self.total_steps:
                        break
                    self._save_if_due_or_stop(stop)
        finally:
            progress.close()
        assert_in_sync(self.model, self.info, skip=self.local_names)
        if self.last_eval_step != self.step:
            self.evaluate(show=False)
        self.save()
        return self._finish(time.perf_counter() - start)

    def _save_if_due_or_stop(self, stop: StopRequest) -> None:
        """After a step: save when ``train.save_every_minutes`` passed; on a stop request save and
        raise :class:`TrainingInterrupted`. Every rank takes the same decision (saving is collective)."""
        minutes = self.cfg.train.save_every_minutes
        due = minutes > 0 and time.monotonic() - self.last_save_time >= 60 * minutes
        flags = all_reduce_mean({"stop": float(stop.requested), "due": float(due)}, self.info)
        stopping = flags["stop"] > 0  # any rank was signalled: all stop
        if (stopping or flags["due"] > 0) and self.last_save_step != self.step:
            self.save()
        if not stopping:
            return
        path = self.out_dir / "last.pt"
        message = (f"interrupted ({stop.signal_name or 'another process'}) at step {self.step}/"
                   f"{self.total_steps}, epoch {self.epoch}: saved {path} (weights, optimizer, "
                   f"schedule and RNG states: `--resume {path}` continues exactly); not saved: "
                   f"summary.json, weights.safetensors and curves.png (written at the end of the "
                   f"run); no evaluation at this step"
                   + (f"; best.pt is from step {self.best['step']}" if self.best else ""))
        if self.info.is_main:
            logger.warning("%s", message)
        raise TrainingInterrupted(message, path, self.step)

    def _finish(self, seconds: float) -> dict[str, Any]:
        summary: dict[str, Any] = dict(self.last_metrics)
        summary.update({"step": self.step, "epoch": self.epoch, "train_time_s": round(seconds, 3)})
        summary["units"] = METRIC_UNITS
        if self.best:
            summary[f"best_{self.best['metric']}"] = self.best["value"]
            summary["best_step"] = self.best["step"]
        if self.info.is_main:
            ckpt_io.save_weights(self.model, self.out_dir / "weights.safetensors", self.plugin.name,
                                 self.cfg.to_dict(), self.data.info, exclude=self.local_names)
            (self.out_dir / "summary.json").write_text(dump_json(summary, indent=2) + "\n")
            logger.info("%s", metric_table(summary, f"summary ({self.out_dir})"))
            try:
                plot_curves([self.out_dir], self.out_dir / CURVES)
            except Exception as exc:  # noqa: BLE001 - a drawing problem must not fail a finished run
                logger.warning("could not draw %s: %s", self.out_dir / CURVES, exc)
        barrier(self.info)
        return summary


def _warmup_note(t: Any, steps_per_epoch: int, total_steps: int) -> str:
    """What the log says when ``train.max_steps`` cuts a run whose warm-up is given in epochs: the
    warm-up keeps its length in steps (epochs × steps per epoch), so it takes a larger share."""
    planned = t.epochs * steps_per_epoch
    warmup = round(t.warmup_epochs * steps_per_epoch)
    if not warmup or not t.max_steps or total_steps >= planned:
        return ""
    share = 100.0 * min(warmup, total_steps) / max(1, total_steps)
    return (f"train.max_steps={t.max_steps} cuts the run to {total_steps} of {planned} steps; the "
            f"warm-up (train.warmup_epochs={t.warmup_epochs:g} = {warmup} steps) is not scaled and "
            f"takes {share:.0f}% of the run; lower train.warmup_epochs to shorten it")


def train(plugin: Plugin, cfg: Config, out_dir: str | Path | None = None,
          resume: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train ``plugin`` with ``cfg``; returns the summary (final metrics, steps, time).

    Args:
        plugin: the domain plugin.
        cfg: full config (see :func:`kpt.config.build_config`).
        out_dir: run folder (default a new ``runs/DOMAIN/<timestamp>``; the resumed run's folder on
            resume). A folder that already holds a run is refused unless ``resume`` or ``overwrite``.
        resume: a checkpoint to continue from (resolve ``auto`` with
            :func:`kpt.engine.checkpoint.find_resume_checkpoint`).
        overwrite: replace the run that ``out_dir`` holds (its run files are deleted first).

    Raises:
        kpt.engine.run_dir.RunDirError: ``out_dir`` holds a run (and neither ``resume`` nor
            ``overwrite``), or another process is writing to it.
    """
    started_group = not (dist.is_available() and dist.is_initialized())
    info, device = init_distributed(cfg.train.device)
    lock: RunLock | None = None
    handler = None
    try:
        claimed: tuple[str | None, str | None] = (None, None)  # (run folder, refusal message)
        if info.is_main:  # only rank 0 writes to the run folder, so only it names, checks and locks it
            try:
                if out_dir is None:
                    out_dir = Path(resume).parent if resume is not None else default_run_dir(
                        plugin.name)
                lock = claim_run_dir(out_dir, resume=resume is not None, overwrite=overwrite)
                claimed = (str(out_dir), None)
            except RunDirError as exc:
                claimed = (None, str(exc))
                if not info.enabled:
                    raise
        folder, refused = broadcast_object(claimed, info)  # every rank stops, or none
        if refused is not None:
            raise RunDirError(refused)
        if info.is_main:  # from here on, what the console shows is also kept in OUT/run.log
            Path(folder).mkdir(parents=True, exist_ok=True)
            handler = attach_run_log(Path(folder))
        trainer = Trainer(plugin, cfg, Path(folder), Path(resume) if resume else None, info, device)
        return trainer.run()
    finally:
        detach_run_log(handler)
        if lock is not None:
            lock.release()
        if started_group and info.enabled and dist.is_initialized():
            dist.destroy_process_group()
