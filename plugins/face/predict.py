"""``kpt predict face IMG1 IMG2`` and ``kpt eval face --weights W --test a.bin b.bin``.

Both accept any weights ``kpt.load_model`` reads: a run's ``best.pt`` / ``last.pt`` /
``weights.safetensors`` (backbone + head; the backbone is used) or a bare backbone file such as the
output of ``kpt convert cvlface`` (the official ViT-KPRPE). Without ``--weights`` the newest
``runs/face/*/weights.safetensors`` is used.

Predict: RetinaFace finds the highest-scoring face of each image, the image is aligned to the
ArcFace 112×112 template with its five points (the keypoints move with it, as CVLface's
verification app does), embedded with flip fusion, and the cosine similarity is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kpt.errors import DataError

from .align import align_faces
from .evaluation import (
    PairSet,
    alignment_sweep,
    embed,
    evaluate_pairs,
    fraction_found,
    load_bin_set,
    synthetic_pair_set,
    write_sweep,
)

__all__ = ["embed_image", "eval_main", "find_weights", "load_face_backbone", "predict_main"]

logger = logging.getLogger(__name__)


class NoFaceError(RuntimeError):
    """RetinaFace found no face in an image."""


def find_weights(weights: str | None, runs: Path = Path("runs") / "face") -> Path:
    """``--weights`` or the newest ``runs/face/*/weights.safetensors``."""
    if weights:
        from kpt.engine.checkpoint import resolve_run_weights

        path = resolve_run_weights(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights {path}: no such file")
        return path
    found = sorted(runs.glob("*/weights.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no --weights given and no trained run under {runs}/; train one "
                                f"with `kpt train face` or pass --weights FILE")
    return found[-1]


def load_face_backbone(path: str | Path, device: str = "cpu") -> nn.Module:
    """The embedding backbone in ``path`` (plugin run or bare model), in eval mode."""
    import kpt

    model = kpt.load_model(str(path), map_location=device)
    return getattr(model, "backbone", model).eval()


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:  # not an image, or truncated
        raise DataError(f"{path}: not an image file PIL can read ({type(exc).__name__}: {exc}); "
                        f"give a JPEG or PNG photo") from exc


def embed_image(backbone: nn.Module, image: np.ndarray, detector: nn.Module, what: str = "image",
                device: str = "cpu") -> tuple[torch.Tensor, float]:
    """Detect, align and embed one RGB uint8 image (H, W, 3) → (unit embedding (D,), face score).

    Raises:
        NoFaceError: no face scoring at least the detector's ``found_threshold``.
    """
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None]
    keypoints, found, score = detector.best_face(x)
    if not bool(found[0]):
        raise NoFaceError(f"{what}: no face found (best RetinaFace score {float(score[0]):.2f} < "
                          f"{detector.found_threshold}); use a photo with a visible, frontal-ish "
                          f"face")
    aligned, aligned_kp, _ = align_faces(x.float(), keypoints.float(), size=112)
    aligned = aligned.round().clamp(0, 255).to(torch.uint8)
    emb = embed(backbone, aligned, aligned_kp, device=device)
    return emb[0], float(score[0])


def predict_main(argv: list[str]) -> int:
    """``kpt predict face IMG1 IMG2 [--weights W] [--threshold T]``: print the cosine similarity."""
    parser = argparse.ArgumentParser(
        prog="kpt predict face",
        description="Cosine similarity of the faces in two images (detect, align, embed).")
    parser.add_argument("images", nargs=2, metavar="IMG")
    parser.add_argument("--weights", help="model file (default: newest runs/face/*/weights)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="print 'same'/'different' for similarity ≥/< this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    from .evaluation import get_detector

    weights = find_weights(args.weights)
    backbone = load_face_backbone(weights, args.device)
    detector = get_detector().to(args.device)
    try:
        embs, scores = [], []
        for name in args.images:
            emb, score = embed_image(backbone, _read_image(Path(name)), detector, name,
                                     args.device)
            embs.append(emb)
            scores.append(score)
    except NoFaceError as exc:
        print(f"kpt predict face: {exc}", file=sys.stderr)
        return 1
    similarity = float(torch.dot(embs[0], embs[1]))
    result = {"similarity": similarity, "face_scores": scores, "weights": str(weights)}
    if args.threshold is not None:
        result["same"] = similarity >= args.threshold
    if args.json:
        print(json.dumps(result))
    else:
        print(f"cosine similarity: {similarity:.4f}  (face scores {scores[0]:.2f}, "
              f"{scores[1]:.2f}; weights {weights})")
        if args.threshold is not None:
            print("same person" if result["same"] else "different people")
    return 0


def eval_main(argv: list[str]) -> int:
    """``kpt eval face --weights W [--test a.bin ...] [--sweep N --out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="kpt eval face",
        description="1:1 verification (10-fold accuracy, flip fusion, VAL@FAR) of face weights on "
                    ".bin pair files and/or the synthetic aligned / unaligned sets.")
    parser.add_argument("weights_pos", nargs="?", metavar="WEIGHTS",
                        help="model file (same as --weights)")
    parser.add_argument("--weights", help="run checkpoint, weights.safetensors or converted model")
    parser.add_argument("--test", nargs="+", default=[], metavar="BIN",
                        help=".bin files, or 'synthetic' (default when no .bin is given)")
    parser.add_argument("--keypoints", default="retinaface", choices=["retinaface", "template"],
                        help="keypoints for .bin crops")
    parser.add_argument("--unaligned-keypoints", default="retinaface",
                        choices=["retinaface", "ground_truth"])
    parser.add_argument("--pairs", type=int, default=400, help="synthetic pairs per protocol")
    parser.add_argument("--limit", type=int, default=0, help="first N pairs of every .bin")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-flip", action="store_true", help="disable flip fusion")
    parser.add_argument("--sweep", type=int, default=0, metavar="N",
                        help="Fig. 5: accuracy at N steps from the detection crop to the aligned crop")
    parser.add_argument("--out", default="", help="folder for metrics.json and the sweep CSV/PNG")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    weights = find_weights(args.weights or args.weights_pos)
    backbone = load_face_backbone(weights, args.device)
    tests = args.test or ["synthetic"]
    sets: dict[str, PairSet] = {}
    for name in tests:
        if name == "synthetic":
            sets["synthetic-aligned"] = synthetic_pair_set("aligned", args.pairs, 0,
                                                           "ground_truth")
            sets["synthetic-unaligned"] = synthetic_pair_set("unaligned", args.pairs, 0,
                                                             args.unaligned_keypoints)
            sets["synthetic-unaligned-crop"] = synthetic_pair_set(
                "unaligned_crop", args.pairs, 0, args.unaligned_keypoints)
        else:
            pairs = load_bin_set(name, args.keypoints, args.limit or None)
            sets[pairs.name] = pairs
    metrics: dict[str, float] = {}
    print(f"weights: {weights}")
    print(f"{'set':<22} {'pairs':>6} {'accuracy':>9} {'± std':>7} {'thresh':>7} "
          f"{'VAL@1e-3':>9} {'faces':>6}")
    for key, pairs in sets.items():
        res = evaluate_pairs(backbone, pairs, args.batch_size, args.device, not args.no_flip)
        for field, value in res.items():
            metrics[f"{key}/{field}"] = value
        print(f"{key:<22} {len(pairs):>6} {100 * res['accuracy']:>8.2f}% "
              f"{100 * res['accuracy_std']:>6.2f} {res['threshold']:>7.2f} "
              f"{100 * res['val']:>8.2f}% {100 * fraction_found(pairs):>5.0f}%")
    if args.sweep:
        # Fig. 5 starts at the detection crop and ends at the aligned crop
        start = sets.get("synthetic-unaligned-crop") or synthetic_pair_set(
            "unaligned_crop", args.pairs, 0, args.unaligned_keypoints)
        rows = alignment_sweep(backbone, start, args.sweep, args.batch_size, args.device,
                               not args.no_flip)
        out = Path(args.out or ".") / "alignment_sweep"
        csv_path, png_path = write_sweep({Path(weights).parent.name or "model": rows}, out)
        for r in rows:
            metrics[f"sweep/t={r['t']:.2f}"] = r["accuracy"]
            print(f"sweep t={r['t']:.2f}: accuracy {100 * r['accuracy']:.2f}%")
        print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0
