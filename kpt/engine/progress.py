"""What a run shows and records: header, progress (tqdm on a terminal, plain lines otherwise),
metric tables, ``metrics.jsonl`` and the final summary. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("kpt.engine")


class TqdmLoggingHandler(logging.Handler):
    """Logging handler that writes through ``tqdm.write`` so log lines do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


#: loggers the console shows: the core and the built-in plugins (``kpt_plugins.face`` says where
#: its keypoints come from); a third-party plugin that logs under ``kpt.<name>`` is shown too
CONSOLE_LOGGERS = ("kpt", "kpt_plugins")


def configure_logging(verbose: bool = False, rank: int = 0) -> None:
    """Console logging for the CLI: ``kpt`` INFO messages on rank 0, warnings on the others."""
    for name in CONSOLE_LOGGERS:
        root = logging.getLogger(name)
        for handler in list(root.handlers):
            if isinstance(handler, TqdmLoggingHandler):
                root.removeHandler(handler)
        handler = TqdmLoggingHandler()
        handler.setFormatter(logging.Formatter("%(message)s" if rank == 0
                                               else f"[rank {rank}] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)
        root.propagate = False


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _size(obj: Any) -> str:
    try:
        return str(len(obj))
    except TypeError:
        return "?"


def header_lines(plugin_name: str, device: torch.device, world_size: int, model: torch.nn.Module,
                 train_size: int, evals: dict[str, Any], out_dir: Path, total_steps: int,
                 steps_per_epoch: int) -> list[str]:
    """The lines printed before training (versions, device, model size, data sizes)."""
    import timm

    from kpt._version import __version__

    trainable, total = count_parameters(model)
    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    eval_sizes = ", ".join(f"{k}={_size(v)}" for k, v in evals.items()) or "none"
    versions = (f"kpt {__version__} | torch {torch.__version__} | timm {timm.__version__} | "
                f"python {platform.python_version()}")
    return [
        versions,
        f"plugin {plugin_name} | device {dev} | processes {world_size}",
        f"model {type(model).__name__}: {trainable / 1e6:.3f}M trainable / {total / 1e6:.3f}M parameters",
        f"data: train={train_size} | eval: {eval_sizes}",
        f"steps: {total_steps} ({steps_per_epoch} per epoch) | run folder: {out_dir}",
    ]


def metric_table(metrics: dict[str, float], title: str) -> str:
    """A two-column text table of ``metrics``."""
    if not metrics:
        return f"{title}: no metrics"
    width = max(len(k) for k in metrics)
    rows = [f"  {k:<{width}}  {_fmt(v)}" for k, v in metrics.items()]
    rule = "  " + "-" * (width + 14)
    return "\n".join([title, rule, *rows, rule])


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # a metric that could not be computed (e.g. VAL@FAR with too few pairs)
    if isinstance(value, float) and abs(value) >= 100 and math.isfinite(value):
        return f"{value:.1f}"  # throughput, large losses: decimals are noise
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) and math.isfinite(value):
            return f"{value:.4e}"
        return f"{value:.4f}"
    return str(value)


def json_ready(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, so that
    ``json.dumps(..., allow_nan=False)`` writes valid JSON (``null`` = could not be computed)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):
        value = float(obj)  # numpy scalars too
        return value if math.isfinite(value) else None
    return obj


def dump_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as ``null``, see :func:`json_ready`)."""
    return json.dumps(json_ready(obj), indent=indent, allow_nan=False, default=float)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (no-op when ``path`` is None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run logs them again).

        A line that is not a complete JSON record (the end of a run killed while appending it) is
        dropped too and reported once, so that new records never follow a torn line.
        """
        if self.path is None or not self.path.exists():
            return
        keep, torn = [], []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                torn.append(number)
            elif record.get("step", 0) <= step:
                keep.append(line)
        if torn:
            logger.warning("%s: ignored line %s, not a complete JSON record (a run killed while "
                           "writing it); the file is rewritten without it", self.path,
                           ", ".join(map(str, torn)))
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(dump_json(record) + "\n")


class Progress:
    """Training progress: a tqdm bar on a terminal, a plain log line every ``log_every`` steps otherwise.

    Args:
        total: total optimizer steps.
        initial: steps already done (resume).
        enabled: False on ranks other than 0.
        use_tqdm: default: stderr is a terminal.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True,
                 use_tqdm: bool | None = None) -> None:
        self.total, self.enabled = total, enabled
        self.use_tqdm = enabled and (sys.stderr.isatty() if use_tqdm is None else use_tqdm)
        self.bar = None
        self.shown: dict[str, float] = {}
        self.start_time, self.start_step = time.perf_counter(), initial
        if self.use_tqdm:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr,
                            desc="train", unit="step")

    def update(self, step: int, logs: dict[str, float], log_line: bool) -> None:
        """Advance to ``step`` showing ``logs`` (loss, lr, img/s); ``log_line``: print a plain line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.shown.update(logs)  # keep lr, img/s between log steps: a steady bar width
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: _fmt(v) for k, v in self.shown.items()}, refresh=False)
        elif log_line:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(1, done) * (self.total - step)
            parts = " ".join(f"{k} {_fmt(v)}" for k, v in logs.items())
            logger.info("step %d/%d %s eta %s", step, self.total, parts, _duration(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
