"""Does a face model use its keypoints? Accuracy when only the keypoints change.

Every synthetic verification set is evaluated several times with the same images and different
keypoints given to the backbone:

* ``true``: the ground-truth landmarks of each image;
* ``template``: the ArcFace template for every image (a keypoint-blind control);
* ``shuffled``: the landmarks of another image of the same set (a derangement: no image keeps
  its own), plausible face keypoints that do not belong to the face shown;
* ``shift<d>``: the true landmarks moved by ``d`` pixels, all five the same way, in a random
  direction per image;
* ``rotate<a>``: the true landmarks rotated by ±``a`` degrees (random sign per image) about their
  centroid, the face centre;
* ``scale<s>``: the true landmarks scaled by ``s`` or ``1/s`` (random per image) about their
  centroid.

The image never moves. A model that ignores its keypoints scores the same in every column; one that
follows them loses accuracy as they move away from the face, and should beat ``template`` where
the faces are misaligned. The sets are those of ``bench/face_robustness.py`` (``unaligned`` and
its one-factor splits) plus the keypoint-only splits where the face stays centred
(``unaligned_centred_rotate`` / ``_scale`` / ``_interp``, see ``plugins/face/synthetic/params.py``),
which a translation-invariant model cannot undo.

Run (any run folder or weights file; writes ``keypoint_dependence.json`` / ``.md`` under --out)::

    python bench/keypoint_dependence.py RUN [RUN ...] --out bench_out/kpdep --pairs 400

Seed means of several ``bench/face_robustness.py --probe`` outputs, with margins paired by seed::

    python bench/keypoint_dependence.py --combine OUT_S0 OUT_S1 ... --out bench_out/kpdep_seeds \
        --versus kprpe-wide:rpe-wide

Everything is synthetic: the numbers compare models, they are not face-benchmark results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SETS = ("aligned", "unaligned", "unaligned_shift", "unaligned_rotate", "unaligned_scale",
        "unaligned_centred_rotate", "unaligned_centred_scale", "unaligned_centred_interp")


def derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A random permutation of ``range(n)`` without fixed points.

    A random cycle through all n items: ``sigma[order[i]] = order[i + 1]``, so every item is
    sent to the next one of a shuffled order and none to itself.

    Returns:
        (n,) int64, ``sigma[i] != i`` for every i.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = torch.randperm(n, generator=generator)
    sigma = torch.empty(n, dtype=torch.int64)
    sigma[order] = order.roll(-1)
    return sigma


def displace_keypoints(keypoints: Tensor, image_hw: tuple[int, int], shift_px: float = 0.0,
                       angle_deg: float = 0.0, scale: float = 1.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """Keypoints moved by known amounts, the image untouched.

    In pixels: a rotation by ±``angle_deg`` and a scaling by ``scale`` or ``1/scale`` (sign and
    direction random per image) about each image's keypoint centroid, then a shift of exactly
    ``shift_px`` pixels in a random direction per image.

    Args:
        keypoints: (N, K, 2) normalised (x, y).
        image_hw: (H, W) of the images the keypoints belong to.

    Returns:
        (N, K, 2) float32 normalised keypoints.
    """
    h, w = image_hw
    size = torch.tensor([w, h], dtype=torch.float64)
    px = keypoints.double() * size
    n = len(px)
    centre = px.mean(1, keepdim=True)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    theta = sign * math.radians(angle_deg)
    inv = torch.rand(n, generator=generator) < 0.5
    factor = torch.where(inv, 1.0 / scale, scale).double()
    c, s = torch.cos(theta), torch.sin(theta)
    lin = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2) * factor[:, None, None]
    moved = (px - centre) @ lin.transpose(1, 2) + centre
    direction = 2 * math.pi * torch.rand(n, generator=generator).double()
    moved = moved + shift_px * torch.stack([direction.cos(), direction.sin()], -1)[:, None, :]
    return (moved / size).float()


def perturbations(shifts: Sequence[float] = (2, 4, 8), angle_deg: float = 15.0,
                  scale: float = 1.25) -> dict[str, dict]:
    """The perturbation names and their :func:`displace_keypoints` arguments (plus the fixed
    ``true`` / ``template`` / ``shuffled`` conditions, which take no arguments)."""
    table: dict[str, dict] = {"true": {}, "template": {}, "shuffled": {}}
    table.update({f"shift{d:g}": {"shift_px": float(d)} for d in shifts})
    if angle_deg:
        table[f"rotate{angle_deg:g}"] = {"angle_deg": float(angle_deg)}
    if scale != 1.0:
        table[f"scale{scale:g}"] = {"scale": float(scale)}
    return table


def perturbed_keypoints(pairs, name: str, args: dict, seed: int = 0) -> Tensor:
    """The keypoints the backbone gets for ``pairs`` (a face ``PairSet``) under one perturbation.

    Deterministic per (seed, perturbation): every model of a comparison sees the same keypoints.

    Returns:
        (2P, 5, 2) normalised keypoints.
    """
    from kpt_plugins.face.evaluation.verification import template_keypoints

    gen = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    if name == "true":
        return pairs.keypoints
    if name == "template":
        return template_keypoints(len(pairs.keypoints))
    if name == "shuffled":
        return pairs.keypoints[derangement(len(pairs.keypoints), gen)]
    return displace_keypoints(pairs.keypoints, tuple(pairs.images.shape[-2:]), generator=gen,
                              **args)


def probe_model(model: nn.Module, sets: dict, table: dict[str, dict] | None = None,
                batch_size: int = 100, device: str = "cpu", seed: int = 0) -> dict[str, dict]:
    """Verification accuracy of ``model`` on every set under every keypoint perturbation.

    Accuracy moves in steps of one pair and a threshold refit per fold absorbs small changes, so
    the probe also reports the embedding drift, a continuous measure of how much the keypoints
    steer the model: the mean over images of ``1 − cos(f(x, k_true), f(x, k_perturbed))``.

    Args:
        model: a face backbone ``(images, keypoints) -> (B, D)`` or a plugin model.
        sets: name → ``PairSet`` with the true keypoints.
        table: perturbation name → :func:`displace_keypoints` arguments (default
            :func:`perturbations`).

    Returns:
        ``{"accuracy": {set: {perturbation: accuracy in [0, 1]}}, "drift": {set: {perturbation:
        mean 1 − cosine}}}`` (flip-fused embeddings, 10-fold insightface accuracy).
    """
    from kpt_plugins.face.evaluation.verification import embed

    from kpt.metrics import verification

    table = perturbations() if table is None else table
    accuracy: dict[str, dict] = {}
    drift: dict[str, dict] = {}
    for set_name, pairs in sets.items():
        acc: dict[str, float] = accuracy.setdefault(set_name, {})
        moved: dict[str, float] = drift.setdefault(set_name, {})
        folds = min(10, len(pairs))
        reference = embed(model, pairs.images, pairs.keypoints, batch_size, device)
        for name, args in table.items():
            kp = perturbed_keypoints(pairs, name, args, seed)
            emb = reference if name == "true" else embed(model, pairs.images, kp, batch_size, device)
            acc[name] = float(verification(emb[0::2].numpy(), emb[1::2].numpy(),
                                           pairs.issame.numpy(), folds=folds)["accuracy"])
            # 1 − cos of unit vectors as half the squared distance: exact for tiny drifts too
            moved[name] = float(((emb.double() - reference.double()) ** 2).sum(1).mean() / 2)
        logger.info("%s: accuracy %s drift %s", set_name, acc, moved)
    return {"accuracy": accuracy, "drift": drift}


def synthetic_sets(names: Sequence[str], num_pairs: int, seed: int = 0) -> dict:
    """Synthetic pair sets with ground-truth keypoints (cached by the face plugin)."""
    from kpt_plugins.face.evaluation.verification import synthetic_pair_set

    return {name: synthetic_pair_set(name, num_pairs, seed, "ground_truth") for name in names}


def markdown(results: dict[str, dict]) -> str:
    """Per model: accuracy (percent; sets as rows, perturbations as columns, plus the keypoint gains
    ``true − template`` and ``true − shuffled`` in points), then the embedding drift."""
    lines: list[str] = []
    for label, probe in results.items():
        by_set = probe["accuracy"]
        cols = list(next(iter(by_set.values())))
        lines += [f"**{label}**: accuracy (%)", "", "| set | " + " | ".join(cols)
                  + " | true − template | true − shuffled |", "|---" * (len(cols) + 3) + "|"]
        for set_name, row in by_set.items():
            cells = [f"{100 * row[c]:.1f}" for c in cols]
            gains = [f"{100 * (row['true'] - row[c]):+.1f}" if c in row else "" for c in
                     ("template", "shuffled")]
            lines.append(f"| {set_name} | " + " | ".join(cells + gains) + " |")
        lines += ["", (f"**{label}**: embedding drift, mean 1 − cos to the true-keypoint embedding "
                  "(0 = the keypoints are ignored)"), "",
                  "| set | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for set_name, row in probe["drift"].items():
            lines.append(f"| {set_name} | " + " | ".join(f"{row[c]:.1e}" for c in cols)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(results: dict, out: Path, config: dict) -> str:
    """``keypoint_dependence.json`` and ``.md`` under ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "keypoint_dependence.json").write_text(json.dumps(
        {"config": config, "results": results}, indent=2) + "\n")
    text = markdown(results)
    (out / "keypoint_dependence.md").write_text(text + "\n")
    return text


def run_label(path: str) -> str:
    """A short name for a run folder or weights file (the folder name for ``…/weights.safetensors``)."""
    p = Path(path)
    return p.parent.name if p.is_file() and p.stem in ("weights", "last", "best") else p.name


KEYPOINT_ONLY = ("unaligned_centred_rotate", "unaligned_centred_scale", "unaligned_centred_interp")


def run_name(config: dict, pos: str) -> str:
    """Row name of a bench result: ``pos`` + ``--label``, without repeating an encoding the label
    already names (``--label=-kprpe-wide`` on ``kprpe`` is ``kprpe-wide``)."""
    label = str(config.get("label", ""))
    base = pos[: len(pos) - len(label)] if label and pos.endswith(label) else pos
    return label[1:] if label.startswith(f"-{base}") else base + label


def collect(dirs: Sequence[Path]) -> dict[str, dict[int, dict]]:
    """name → seed → result, from the ``face_robustness.json`` of bench runs made with ``--probe``."""
    groups: dict[str, dict[int, dict]] = {}
    for folder in dirs:
        path = Path(folder) / "face_robustness.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no bench output here (bench/face_robustness.py "
                                    f"--probe --out {folder})")
        data = json.loads(path.read_text())
        seed = int(data["config"]["seed"])
        for result in data["results"]:
            if "probe" not in result:
                raise ValueError(f"{path}: {result['pos']!r} has no probe (run the bench with --probe)")
            name = run_name(data["config"], result["pos"])
            if seed in groups.setdefault(name, {}):
                raise ValueError(f"{path}: {name!r} seed {seed} is already in another folder")
            groups[name][seed] = result
    return groups


def _cell(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """Mean, with the range over seeds when there are several."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ({fmt.format(v.min())} to {fmt.format(v.max())})"


def seed_summary(groups: dict[str, dict[int, dict]], versus: Sequence[tuple[str, str]] = (),
                 sets: Sequence[str] = KEYPOINT_ONLY) -> str:
    """Markdown: per model, seed means (range) of accuracy with its true keypoints, the keypoint
    gain ``true − template`` (points) and the template drift on the keypoint-only sets; then, for
    every ``(model, baseline)`` in ``versus``, the margin paired by seed and the seed spread of
    both, so a margin can be read against the noise. ``NAME@COLUMN`` in ``versus`` reads another
    probe column than ``true`` (e.g. ``blind-model@template`` for a model trained without keypoints)."""
    import numpy as np

    head = ["model", "seeds", "aligned", "unaligned (RetinaFace kp)"]
    for name in sets:
        short = name.removeprefix("unaligned_")
        head += [f"{short}: true kp", f"{short}: true − template", f"{short}: drift (template)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for model, by_seed in groups.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        cells = [f"`{model}`", ", ".join(map(str, sorted(by_seed))),
                 _cell([100 * r["aligned"] for r in runs]),
                 _cell([100 * r["unaligned_retinaface"] for r in runs])]
        for name in sets:
            acc = [r["probe"]["accuracy"][name] for r in runs]
            cells += [_cell([100 * a["true"] for a in acc]),
                      _cell([100 * (a["true"] - a["template"]) for a in acc], "{:+.1f}"),
                      _cell([r["probe"]["drift"][name]["template"] for r in runs], "{:.1e}")]
        lines.append("| " + " | ".join(cells) + " |")
    if versus:
        lines += ["", ("Margin on the keypoint-only sets (true keypoints, points, paired by seed; "
                  "spread = the larger max − min over seeds of the two models):"), "",
                  "| model | baseline | " + " | ".join(f"{n.removeprefix('unaligned_')}: margin "
                                                       "per seed / mean / spread" for n in sets)
                  + " |", "|---" * (len(sets) + 2) + "|"]
        for model_spec, base_spec in versus:
            # NAME@COLUMN reads another probe column, e.g. a keypoint-blind model @template
            model, _, model_col = model_spec.partition("@")
            base, _, base_col = base_spec.partition("@")
            model_col, base_col = model_col or "true", base_col or "true"
            missing = [m for m in (model, base) if m not in groups]
            if missing:
                raise ValueError(f"--versus {model}:{base}: no results for {missing}; "
                                 f"have {list(groups)}")
            seeds = sorted(set(groups[model]) & set(groups[base]))
            cells = []
            for name in sets:
                a = np.array([100 * groups[model][s]["probe"]["accuracy"][name][model_col]
                              for s in seeds])
                b = np.array([100 * groups[base][s]["probe"]["accuracy"][name][base_col]
                              for s in seeds])
                spread = max(np.ptp(a), np.ptp(b)) if len(seeds) > 1 else float("nan")
                per_seed = ", ".join(f"{d:+.1f}" for d in a - b)
                cells.append(f"{per_seed} / **{(a - b).mean():+.1f}** / {spread:.1f}")
            lines.append(f"| `{model_spec}` | `{base_spec}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run folders or weights files")
    parser.add_argument("--combine", nargs="+", default=[], metavar="DIR",
                        help="no evaluation: pool the probes of bench/face_robustness.py --probe "
                             "outputs (one per seed) into seed means, written to "
                             "<out>/keypoint_dependence_seeds.md")
    parser.add_argument("--versus", nargs="+", default=[], metavar="MODEL:BASELINE",
                        help="with --combine: margins of MODEL over BASELINE, paired by seed "
                             "(NAME@COLUMN: another probe column than true, e.g. @template)")
    parser.add_argument("--out", default="bench_out/keypoint_dependence")
    parser.add_argument("--pairs", type=int, default=400, help="pairs per set")
    parser.add_argument("--sets", nargs="+", default=list(SETS), help="synthetic splits to probe")
    parser.add_argument("--shifts", nargs="+", type=float, default=[2, 4, 8],
                        help="keypoint shifts in pixels")
    parser.add_argument("--rotate", type=float, default=15.0,
                        help="keypoint rotation in degrees (0: off)")
    parser.add_argument("--scale", type=float, default=1.25, help="keypoint scale factor (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation pairs and perturbations")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.combine:
        pairs = [tuple(v.split(":", 1)) for v in args.versus]
        if any(len(p) != 2 for p in pairs):
            parser.error(f"--versus takes MODEL:BASELINE, got {args.versus}")
        text = seed_summary(collect([Path(d) for d in args.combine]), pairs)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "keypoint_dependence_seeds.md").write_text(text + "\n")
        print(text)
        return 0
    if not args.runs:
        parser.error("give RUN folders / weights files to probe, or --combine DIR ...")
    import kpt

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sets = synthetic_sets(args.sets, args.pairs, args.seed)
    table = perturbations(args.shifts, args.rotate, args.scale)
    results = {}
    for run in args.runs:
        model = kpt.load_model(run, map_location=args.device)
        label = run_label(run)
        if label in results:  # e.g. one folder name in several seeds' outputs: keep both
            label = run
        results[label] = probe_model(model, sets, table, args.batch_size, args.device, args.seed)
        write_outputs(results, Path(args.out), vars(args))  # after every run: partial results
        print(markdown({label: results[label]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
