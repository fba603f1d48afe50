"""MNIST → affNIST: every position encoding, same seed and budget, two training protocols.

For each training protocol (``centre``: digits centred as in MNIST; ``random``: each digit placed at
a random position inside the 40×40 frame, the CapsNet protocol) and each ``model.pos`` variant, this
trains the mnist plugin's default model with the default recipe (or a reduced budget given on the
command line) and evaluates on the MNIST test set, affnist-synth and its translation-only and
rotation-only subsets. Results go to ``OUT/results.jsonl`` (one line per run; finished runs are
skipped when the bench is started again), ``OUT/results.md`` (a table) and ``OUT/mnist_affnist.png``.

Examples::

    python bench/mnist_affnist.py --out runs/bench_mnist                    # the full default budget
    python bench/mnist_affnist.py --out runs/bench_small --epochs 1 \\
        --train-limit 20000 --eval-limit 2000 --protocols centre            # a reduced budget
    python bench/mnist_affnist.py --out runs/bench_small --plot-only        # redraw from results

Times are wall-clock seconds of training (``train_time_s``) and the process CPU seconds of the whole
run; on a shared machine compare CPU seconds, and always compare variants of the same bench run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("abs", "abs_drawn", "drawn", "none", "rpe", "irpe", "kprpe", "abs+kprpe")
LABELS = {"abs": "Abs-PE", "abs_drawn": "Abs-PE*", "drawn": "drawn (no PE)", "none": "no PE",
          "rpe": "RPE", "irpe": "iRPE", "kprpe": "KP-RPE", "abs+kprpe": "Abs-PE + KP-RPE"}
PROTOCOLS = {"centre": "centred digits", "random": "random placement"}
METRICS = (("mnist_acc", "MNIST"), ("affnist_synth_acc", "affnist-synth"),
           ("affnist_synth_translation_acc", "translation"),
           ("affnist_synth_rotation_acc", "rotation"))


def run_one(pos: str, protocol: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Train and evaluate one variant; returns its result row."""
    from kpt_plugins.mnist.plugin import PLUGIN

    from kpt.config import build_config
    from kpt.engine.trainer import train

    overrides = [f"model.pos={pos}", f"data.placement={protocol}", f"train.seed={args.seed}",
                 "train.log_every=100"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.train_limit:
        overrides.append(f"data.train_limit={args.train_limit}")
    if args.eval_limit:
        overrides.append(f"data.eval_limit={args.eval_limit}")
    overrides += args.set
    cfg = build_config(PLUGIN, test=["affnist-synth"], overrides=overrides)
    cpu0 = time.process_time()
    summary = train(PLUGIN, cfg, out_dir / f"{protocol}_{pos.replace('+', '_')}")
    row = {"pos": pos, "protocol": protocol, "seed": args.seed, "overrides": overrides,
           "train_time_s": summary["train_time_s"], "cpu_s": round(time.process_time() - cpu0, 1),
           "steps": summary["step"], "threads": torch.get_num_threads()}
    row.update({key: round(summary[key], 2) for key, _ in METRICS if key in summary})
    return row


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict]) -> str:
    """Markdown table of the results, protocols in order, variants in :data:`VARIANTS` order."""
    head = ("| training | position encoding | " + " | ".join(f"{name} %" for _, name in METRICS)
            + " | train s | CPU s |")
    lines = [head, "|" + "---|" * (len(METRICS) + 4)]
    order = {p: i for i, p in enumerate(VARIANTS)}
    for row in sorted(rows, key=lambda r: (list(PROTOCOLS).index(r["protocol"]),
                                           order.get(r["pos"], 99))):
        vals = " | ".join(f"{row[k]:.2f}" if k in row else "–" for k, _ in METRICS)
        lines.append(f"| {PROTOCOLS[row['protocol']]} | {LABELS.get(row['pos'], row['pos'])} "
                     f"(`{row['pos']}`) | {vals} | {row['train_time_s']:.0f} | {row['cpu_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: affnist-synth accuracy per variant and protocol, MNIST accuracy as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if any(r["pos"] == v for r in rows)]
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=80)
    width = 0.8 / max(1, len(protocols))
    for j, protocol in enumerate(protocols):
        xs, aff, mnist = [], [], []
        for i, v in enumerate(variants):
            row = next((r for r in rows if r["pos"] == v and r["protocol"] == protocol), None)
            if row is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            aff.append(row.get("affnist_synth_acc", 0.0))
            mnist.append(row.get("mnist_acc", 0.0))
        bars = ax.bar(xs, aff, width * 0.95, label=f"affnist-synth, {PROTOCOLS[protocol]}")
        ax.scatter(xs, mnist, marker="_", s=160, color="black", zorder=3,
                   label="MNIST test" if j == 0 else None)
        for x, a in zip(xs, aff):
            ax.text(x, a + 1, f"{a:.0f}", ha="center", fontsize=7)
        del bars
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels([LABELS[v] for v in variants], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 122)  # headroom for the legend above the bars
    ax.legend(fontsize=7, loc="upper right", ncol=3)
    ax.set_title("MNIST → affnist-synth by position encoding", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_mnist_affnist"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: the plugin's")
    parser.add_argument("--train-limit", type=int, default=0, help="first N training digits")
    parser.add_argument("--eval-limit", type=int, default=0, help="first N test digits")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    if not args.plot_only:
        for protocol in args.protocols:
            for pos in args.variants:
                done = read_results(results)
                if any(r["pos"] == pos and r["protocol"] == protocol for r in done):
                    continue
                row = run_one(pos, protocol, args, args.out)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    rows = read_results(results)
    if not rows:
        print(f"no results in {results}", file=sys.stderr)
        return 1
    (args.out / "results.md").write_text(table(rows) + "\n")
    plot(rows, args.out / "mnist_affnist.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
