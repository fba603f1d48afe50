"""Training curves from ``metrics.jsonl``: loss, learning rate and evaluation metrics against steps.

Every run draws ``curves.png`` into its folder at the end; ``kpt plot RUN... --out FILE`` draws
several runs on the same axes to compare them. matplotlib runs with the Agg backend (no display).
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kpt.errors import DataError, UserError

logger = logging.getLogger("kpt.engine")

CURVES = "curves.png"
_SKIP = {"type", "step", "epoch", "img_s", "grad_norm"}  # not curves a reader compares


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or of the one in a run folder); torn lines are skipped.

    Raises:
        DataError: the file does not exist.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected a run folder with metrics.jsonl or a "
                        "metrics.jsonl file")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the end of a killed run; truncate_after cleans it on resume
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _series(records: list[dict[str, Any]], kind: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("type") != kind:
            continue
        for key, value in r.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(r["step"])
            values.append(float(value))
    return out


def plot_curves(runs: Sequence[str | Path], out: str | Path,
                labels: Sequence[str] | None = None) -> Path:
    """Draw loss, lr and evaluation curves of one or more runs into one PNG.

    Args:
        runs: run folders or ``metrics.jsonl`` files.
        out: the PNG to write.
        labels: legend names (default: the run folders' names).

    Returns:
        ``out`` as a Path.

    Raises:
        DataError: a run has no ``metrics.jsonl``.
        UserError: the runs hold no record at all.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; also safe when pyplot was imported already
    import matplotlib.pyplot as plt

    paths = [Path(r) for r in runs]
    names = list(labels) if labels else [(p if p.is_dir() else p.parent).name or str(p)
                                         for p in paths]
    data = [(name, read_records(p)) for name, p in zip(names, paths)]
    if not any(records for _, records in data):
        raise UserError(f"no metrics to plot in {', '.join(map(str, paths))} (empty metrics.jsonl)")
    train_keys: list[str] = []
    eval_keys: list[str] = []
    for _, records in data:
        train_keys += [k for k in _series(records, "train") if k not in train_keys and k != "lr"]
        eval_keys += [k for k in _series(records, "eval") if k not in eval_keys]
    panels = [(f"train {k}", "train", k) for k in train_keys] + [("learning rate", "train", "lr")]
    panels += [(f"eval {k}", "eval", k) for k in eval_keys]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, kind, key) in zip(axes.flat, panels):
        for name, records in data:
            steps, values = _series(records, kind).get(key, ([], []))
            if steps:
                ax.plot(steps, values, marker="o" if kind == "eval" else None, markersize=3,
                        label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
