"""Where a run's records go besides ``metrics.jsonl``: the console-log copy ``run.log``, TensorBoard,
or your own sink (W&B, MLflow, ...) named by ``train.logger``.

``train.logger`` is ``none``, ``tensorboard`` (needs the ``tb`` extra: ``pip install "kpt[tb]"``) or
``package.module:factory``. A factory is called once on rank 0 as ``factory(out_dir=Path,
config=dict)`` and returns an object with ``log(record: dict)`` and ``close()``; ``log`` receives every
record that ``metrics.jsonl`` receives (``{"type": "train"|"eval", "step": int, "epoch": int,
name: float, ...}``). A sink must not raise for records it does not want: it may ignore them.
"""

from __future__ import annotations

import importlib
import logging
import numbers
from pathlib import Path
from typing import Any, Protocol

from kpt.engine.progress import CONSOLE_LOGGERS
from kpt.errors import UserError

logger = logging.getLogger("kpt.engine")

RUN_LOG = "run.log"


class MetricsSink(Protocol):
    """What ``train.logger`` builds: receives the records of ``metrics.jsonl``."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars ``train/loss``, ``train/lr``, ``eval/<metric>`` ... by step, in ``OUT/tensorboard``."""

    def __init__(self, out_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch imports tensorboard lazily: the package itself is missing
            raise UserError('train.logger=tensorboard needs the tensorboard package: '
                            'pip install "kpt[tb]" (or pip install tensorboard), or set '
                            'train.logger=none') from exc
        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        kind, step = str(record.get("type", "train")), int(record.get("step", 0))
        for key, value in record.items():
            if key not in ("type", "step", "epoch") and isinstance(value, numbers.Real):
                self.writer.add_scalar(f"{kind}/{key}", float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def build_sink(spec: str, out_dir: Path, config: dict[str, Any]) -> MetricsSink | None:
    """The sink ``train.logger`` names, or None for ``none``/empty.

    Raises:
        UserError: the tensorboard package is missing, or ``module:factory`` cannot be imported or
            does not return an object with ``log`` and ``close``.
    """
    spec = (spec or "none").strip()
    if spec.lower() in ("none", "jsonl"):
        return None
    if spec.lower() == "tensorboard":
        return TensorBoardSink(out_dir)
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise UserError(f"train.logger={spec!r}: expected none, tensorboard or "
                        "package.module:factory (a callable returning an object with log/close)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"train.logger={spec!r}: cannot import {attr!r} from {module_name!r} "
                        f"({exc})") from exc
    sink = factory(out_dir=out_dir, config=config)
    if not (callable(getattr(sink, "log", None)) and callable(getattr(sink, "close", None))):
        raise UserError(f"train.logger={spec!r}: the factory returned {type(sink).__name__}, "
                        "expected an object with log(record) and close()")
    return sink


def attach_run_log(out_dir: Path) -> logging.Handler:
    """Copy what the ``kpt`` loggers print into ``OUT/run.log`` (appended on resume)."""
    handler = logging.FileHandler(out_dir / RUN_LOG, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for name in CONSOLE_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


def detach_run_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        for name in CONSOLE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
