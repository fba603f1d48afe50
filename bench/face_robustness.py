"""Robustness of position encodings to unaligned faces (the pattern of the KP-RPE paper's Table 1).

Every variant is trained with ``kpt train face``'s pipeline on the same synthetic aligned faces,
with the official geometric augmentation (kprpe.md §6.4), the same seed, model size and step budget;
only ``model.pos`` differs:

* ``abs``: learned absolute position embedding (plain ViT);
* ``abs+irpe``: + contextual iRPE (the paper's ViT+iRPE);
* ``abs+kprpe``: + KP-RPE (the paper's face model);
* ``kprpe``: KP-RPE without the absolute embedding.

Each is evaluated on synthetic verification pairs (identities disjoint from training): aligned
crops, unaligned images with keypoints from RetinaFace (the paper's protocol) and with the
ground-truth landmarks (the same protocol without detector noise), and the unaligned images cropped
square around RetinaFace's box (the detection crop, where Fig. 5 starts). Writes a JSON, a markdown table
and a PNG bar chart; ``--sweep N`` adds the Fig. 5 alignment sweep (CSV + PNG); ``--factors`` adds
one-factor unaligned sets (shift only, rotation only, scale only, GT keypoints) to see which
misalignment costs accuracy; every model also gets the keypoint-dependence probe
(``bench/keypoint_dependence.py``: true vs template, shuffled and displaced keypoints; ``--no-probe``
skips it). Extra ``key=value`` overrides reach the config of every variant
(e.g. ``model.args.head=avg``, ``model.args.kprpe_hidden=256``); ``--label`` names such runs.

Run (the current table of docs/face.md; about 30 min of CPU for ``abs``, 40 for ``kprpe``, per seed)::

    python bench/face_robustness.py --out OUT --variants abs kprpe --steps 4000 --batch-size 64 \
        --identities 1000 --images-per-identity 8 --pairs 1000 --gt --factors --threads 1 \
        --seed 0 --label=-avg-p8-4k model.embed_dim=64 model.depth=3 model.patch_size=8 \
        model.args.head=avg eval.batch_size=100 train.eval_every=100000

Everything is synthetic: the numbers compare encodings, they are not face-benchmark results.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("abs", "abs+irpe", "abs+kprpe", "kprpe")
FACTORS = ("shift", "rotate", "scale")


def run_variant(pos: str, args: argparse.Namespace, out: Path) -> dict:
    """Train one variant (unless ``--eval-only``) and evaluate it; returns its metrics."""
    import kpt

    run = out / (pos.replace("+", "_") + args.label)
    result: dict = {"pos": pos + args.label}
    if args.eval_only:
        model = kpt.load_model(str(run / "weights.safetensors"))
        result.update(evaluate_protocols(model, args))
    else:
        from kpt.config import build_config
        from kpt.engine.trainer import train
        from kpt.plugin import load_plugin

        plugin = load_plugin("face")
        overrides = [f"model.pos={pos}", f"train.max_steps={args.steps}", "train.epochs=0",
                     f"train.batch_size={args.batch_size}", f"train.seed={args.seed}",
                     f"data.num_identities={args.identities}",
                     f"data.images_per_identity={args.images_per_identity}",
                     f"eval.synthetic_pairs={args.pairs}", "train.log_every=25",
                     f"train.warmup_epochs={args.warmup_epochs}", *args.overrides]
        cfg = build_config(plugin, overrides=overrides)
        start = time.process_time()
        wall = time.perf_counter()
        summary = train(plugin, cfg, run)
        # the run reports percent (summary.json "units"); this bench keeps fractions throughout
        result.update({"aligned": summary["aligned_accuracy"] / 100,
                       "unaligned_retinaface": summary["unaligned_accuracy"] / 100,
                       "unaligned_crop": summary.get("unaligned_crop_accuracy", float("nan")) / 100,
                       "cpu_s": round(time.process_time() - start, 1),
                       "wall_s": round(time.perf_counter() - wall, 1), "steps": summary["step"]})
        model = kpt.load_model(str(run / "weights.safetensors"))
    from kpt_plugins.face.evaluation.sweep import alignment_sweep
    from kpt_plugins.face.evaluation.verification import evaluate_pairs, synthetic_pair_set

    if args.gt:
        gt = synthetic_pair_set("unaligned", args.pairs, 0, "ground_truth")
        result["unaligned_gt"] = evaluate_pairs(model, gt)["accuracy"]
    if args.template:
        # keypoint-blind control: the same unaligned images with the template's points; a model
        # that uses its keypoints loses accuracy here, one that ignores them does not
        blind = synthetic_pair_set("unaligned", args.pairs, 0, "template")
        result["unaligned_template"] = evaluate_pairs(model, blind)["accuracy"]
    for factor in FACTORS if args.factors else ():
        # one misalignment at a time (GT keypoints): which of shift / rotation / scale is handled
        split = f"unaligned_{factor}"
        result[f"{factor}_gt"] = evaluate_pairs(
            model, synthetic_pair_set(split, args.pairs, 0, "ground_truth"))["accuracy"]
        if args.template:
            result[f"{factor}_template"] = evaluate_pairs(
                model, synthetic_pair_set(split, args.pairs, 0, "template"))["accuracy"]
    if args.probe:
        # does the model follow its keypoints? the same images with true / template / shuffled /
        # displaced keypoints (bench/keypoint_dependence.py), on the sets where only they help
        probe = _keypoint_probe()
        names = args.probe_sets.split(",") if args.probe_sets else probe.SETS
        sets = probe.synthetic_sets(names, args.pairs)
        result["probe"] = probe.probe_model(model, sets, batch_size=args.batch_size)
    if args.sweep:
        # Fig. 5: from the detection crop to the aligned crop, the path set by the GT keypoints
        start = synthetic_pair_set("unaligned_crop", args.pairs, 0, "ground_truth")
        result["sweep"] = alignment_sweep(model, start, args.sweep)
    return result


def _keypoint_probe():
    """bench/keypoint_dependence.py as a module (bench/ is not a package)."""
    import importlib.util

    path = Path(__file__).with_name("keypoint_dependence.py")
    spec = importlib.util.spec_from_file_location("keypoint_dependence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_protocols(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """Aligned, unaligned (RetinaFace kp) and detection-crop accuracy of a trained model."""
    from kpt_plugins.face.evaluation.verification import evaluate_pairs, synthetic_pair_set

    sets = {"aligned": ("aligned", "ground_truth"), "unaligned_retinaface": ("unaligned", "retinaface"),
            "unaligned_crop": ("unaligned_crop", "retinaface")}
    return {key: evaluate_pairs(model, synthetic_pair_set(split, args.pairs, 0, kp))["accuracy"]
            for key, (split, kp) in sets.items()}


COLUMNS = (("aligned", "aligned"), ("unaligned_retinaface", "unaligned (RetinaFace kp)"),
           ("unaligned_crop", "detection crop (RetinaFace)"), ("unaligned_gt", "unaligned (GT kp)"),
           ("unaligned_template", "unaligned (template kp)"),
           *((f"{f}_{kp}", f"{f} only ({kp} kp)") for f in FACTORS for kp in ("gt", "template")))


def markdown_table(results: list[dict]) -> str:
    """Accuracy table (percent) in markdown; optional columns only when every row has them."""
    cols = [(k, label) for k, label in COLUMNS if all(k in r for r in results)]
    lines = ["| pos | " + " | ".join(label for _, label in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for r in results:
        lines.append(f"| `{r['pos']}` | " + " | ".join(f"{100 * r[k]:.1f}" for k, _ in cols) + " |")
    return "\n".join(lines)


def _save_accuracy_chart(fig, ax, title: str, path: Path) -> None:
    """The common frame of the bench's bar charts (accuracy axis, chance line, legend), then save."""
    import matplotlib.pyplot as plt

    ax.set_ylabel("verification accuracy (%)")
    ax.set_ylim(45, 100)
    ax.axhline(50, color="grey", lw=0.5)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot(results: list[dict], path: Path) -> None:
    """Grouped bars: aligned / unaligned accuracy per encoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, label) for k, label in COLUMNS if all(k in r for r in results)]
    fig, ax = plt.subplots(figsize=(5.0, 3.0), dpi=100)
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(results))]
        ax.bar(xs, [100 * r[key] for r in results], width, label=label)
    ax.set_xticks(range(len(results)), [r["pos"] for r in results])
    _save_accuracy_chart(fig, ax, "synthetic faces: same budget, only the position encoding differs", path)


def combine(dirs: list[Path], out: Path, baseline: str = "") -> str:
    """Seed means of several bench outputs (one ``face_robustness.json`` per seed or run).

    Rows with the same ``pos`` label are pooled; each cell is the mean with the range over seeds.
    Below it, every other encoding's unaligned lead over ``baseline`` (default: the first label),
    paired by seed. Writes ``face_robustness_seeds.md`` and ``.png`` under ``out``; returns the table.
    """
    import numpy as np

    groups: dict[str, dict[int, dict]] = {}
    for folder in dirs:
        path = folder / "face_robustness.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no bench output here (run the bench with --out {folder})")
        data = json.loads(path.read_text())
        seed = int(data["config"]["seed"])
        for result in data["results"]:
            if seed in groups.setdefault(result["pos"], {}):
                raise ValueError(f"{path}: {result['pos']!r} seed {seed} is already in another folder")
            groups[result["pos"]][seed] = result
    baseline = baseline or next(iter(groups))
    if baseline not in groups:
        raise ValueError(f"--baseline {baseline!r} is not among the rows {list(groups)}")
    rows = list(groups.values())
    cols = [(k, label) for k, label in COLUMNS if all(k in r for g in rows for r in g.values())]
    lines = ["| pos | seeds | " + " | ".join(label for _, label in cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for pos, by_seed in groups.items():
        cells = []
        for key, _ in cols:
            vals = 100 * np.array([r[key] for r in by_seed.values()])
            cells.append(f"{vals.mean():.1f} ({vals.min():.1f}-{vals.max():.1f})" if len(vals) > 1
                         else f"{vals[0]:.1f}")
        lines.append(f"| `{pos}` | {', '.join(map(str, sorted(by_seed)))} | " + " | ".join(cells) + " |")
    lines += ["", f"Lead over `{baseline}` (points, paired by seed):", "",
              "| pos | aligned | unaligned (RetinaFace kp), per seed | mean |", "|---|---|---|---|"]
    for pos, by_seed in groups.items():
        seeds = sorted(set(by_seed) & set(groups[baseline]))
        if pos == baseline or not seeds:
            continue
        lead = [100 * (by_seed[s]["unaligned_retinaface"] - groups[baseline][s]["unaligned_retinaface"])
                for s in seeds]
        aligned = np.mean([100 * (by_seed[s]["aligned"] - groups[baseline][s]["aligned"]) for s in seeds])
        per_seed = ", ".join(f"s{s} {v:+.1f}" for s, v in zip(seeds, lead))
        lines.append(f"| `{pos}` | {aligned:+.1f} | {per_seed} | **{np.mean(lead):+.1f}** |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "face_robustness_seeds.md").write_text(table + "\n")
    plot_seeds(groups, cols, out / "face_robustness_seeds.png")
    return table


def plot_seeds(groups: dict[str, dict[int, dict]], cols: list[tuple[str, str]], path: Path) -> None:
    """Bars: seed mean per protocol and encoding; dots: the single seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.2), dpi=100)
    width = 0.8 / len(groups)
    for i, (pos, by_seed) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(cols))]
        vals = [[100 * r[key] for r in by_seed.values()] for key, _ in cols]
        ax.bar(xs, [sum(v) / len(v) for v in vals], width, label=f"{pos} ({len(by_seed)} seeds)")
        for x, v in zip(xs, vals):
            ax.plot([x] * len(v), v, "k.", ms=3)
    ax.set_xticks(range(len(cols)), [label.replace(" (", "\n(") for _, label in cols], fontsize=6)
    _save_accuracy_chart(fig, ax, "synthetic faces: seed means (bars) and single seeds (dots)", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--identities", type=int, default=300)
    parser.add_argument("--images-per-identity", type=int, default=12)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--pairs", type=int, default=400, help="pairs per evaluation protocol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gt", action="store_true", help="also evaluate with ground-truth keypoints")
    parser.add_argument("--template", action="store_true",
                        help="also evaluate the unaligned images with the template's keypoints")
    parser.add_argument("--factors", action="store_true",
                        help="also evaluate one misalignment factor at a time (shift, rotation, "
                             "scale; GT keypoints, and template ones with --template)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the models already trained under --runs (no training)")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                        help="run the keypoint-dependence probe (bench/keypoint_dependence.py) on "
                             "every model and write keypoint_dependence.md / .json under --out "
                             "(default: on; --no-probe skips it)")
    parser.add_argument("--probe-sets", default="", metavar="SPLIT,SPLIT",
                        help="with --probe: comma-separated synthetic splits to probe (default: "
                             "the probe's SETS)")
    parser.add_argument("--sweep", type=int, default=0, help="Fig. 5 sweep steps (0: off)")
    parser.add_argument("--out", default="bench_out/face_robustness")
    parser.add_argument("--label", default="",
                        help="suffix of run folders and table rows (e.g. '-h256' for a run with "
                             "model.args.kprpe_hidden=256)")
    parser.add_argument("--runs", default="", help="run folders (default: <out>/runs)")
    parser.add_argument("--combine", nargs="+", default=[], metavar="DIR",
                        help="no training: pool the face_robustness.json of earlier --out folders "
                             "(one per seed) into seed means under --out")
    parser.add_argument("--baseline", default="", help="with --combine: the row leads are measured "
                                                       "against (default: the first)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args(argv)
    if args.combine:
        print(combine([Path(d) for d in args.combine], Path(args.out), args.baseline))
        return 0
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs) if args.runs else out / "runs"
    results = []
    for pos in args.variants:
        print(f"== {pos}", flush=True)
        result = run_variant(pos, args, runs)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("sweep", "probe")}),
              flush=True)
        (out / "face_robustness.json").write_text(json.dumps(
            {"config": vars(args), "results": results}, indent=2) + "\n")
    table = markdown_table(results)
    (out / "face_robustness.md").write_text(table + "\n")
    plot(results, out / "face_robustness.png")
    if args.sweep:
        from kpt_plugins.face.evaluation.sweep import write_sweep

        write_sweep({r["pos"]: r["sweep"] for r in results}, out / "face_alignment_sweep")
    print(table)
    if args.probe:
        print(_keypoint_probe().write_outputs({r["pos"]: r["probe"] for r in results}, out,
                                              vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
