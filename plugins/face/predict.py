"""``kpt predict face IMG1 IMG2 [--weights W]`` and ``kpt predict face QUERY --gallery DIR``.

``--weights`` takes any file ``kpt.load_model`` reads: a run folder, its ``best.pt`` / ``last.pt`` /
``weights.safetensors`` (backbone + head; the backbone is used) or a bare backbone file such as the
output of ``kpt convert cvlface`` (the official ViT-KPRPE), and weights of other frameworks: any ONNX
recogniser (``--input-mean`` / ``--input-std`` give its normalisation) and insightface / AdaFace
IResNet files. Without ``--weights`` the newest
``runs/face/*/weights.safetensors`` is used. (``kpt eval face CHECKPOINT`` takes the same files.)

Predict: RetinaFace finds the highest-scoring face of each image, the image is aligned to the
ArcFace 112×112 template with its five points (the keypoints move with it, as CVLface's
verification app does), embedded with flip fusion, and the cosine similarity is printed.
With ``--gallery DIR`` the query image(s) are searched in a folder instead (1:N): the faces of DIR
are ranked by cosine similarity and the best ``--top`` printed, by the same code as
``kpt embed face --gallery`` (:func:`~.embed.rank_gallery`).
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
from .evaluation.verification import embed

__all__ = ["embed_image", "find_weights", "load_face_backbone", "predict_main"]

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


def load_face_backbone(path: str | Path, device: str = "cpu", input_mean: float = 127.5,
                       input_std: float = 127.5) -> nn.Module:
    """The embedding backbone in ``path``, in eval mode: a plugin run or bare kpt model, or
    weights of another framework (``.onnx`` recogniser fed ``(pixels − input_mean) /
    input_std``, insightface / AdaFace IResNet; see :func:`~.plugin.load_foreign`)."""
    import kpt
    from kpt.engine.weights import CheckpointError, is_model_file

    try:
        model = kpt.load_model(str(path), map_location=device)
    except CheckpointError:
        if is_model_file(path):
            raise
        from .plugin import load_foreign

        model = load_foreign(Path(path), input_mean, input_std).to(device)
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
    """``kpt predict face IMG1 IMG2 [--weights W] [--threshold T]``: print the cosine similarity;
    ``kpt predict face QUERY... --gallery DIR [--top K]``: rank the faces of a folder (1:N)."""
    parser = argparse.ArgumentParser(
        prog="kpt predict face",
        description="Cosine similarity of the faces in two images (detect, align, embed), or, "
                    "with --gallery DIR, the faces of a folder ranked for a query image (1:N).")
    parser.add_argument("images", nargs="+", metavar="IMG",
                        help="two images to compare, or the query image(s) with --gallery")
    parser.add_argument("--gallery", type=Path,
                        help="folder of images (searched recursively) to rank for each query")
    parser.add_argument("--top", type=int, default=5, help="matches printed per query (--gallery)")
    parser.add_argument("--weights", help="model file (default: newest runs/face/*/weights)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="print 'same'/'different' for similarity ≥/< this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--input-mean", type=float, default=127.5,
                        help="ONNX weights: the model is fed (pixels - mean) / std (insightface "
                             "127.5 / 127.5; raw pixels 0 / 1)")
    parser.add_argument("--input-std", type=float, default=127.5, help="see --input-mean")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    if args.gallery is None and len(args.images) != 2:
        parser.error(f"give two images to compare (got {len(args.images)}), or query image(s) "
                     f"and --gallery DIR")
    from .evaluation.verification import get_detector

    weights = find_weights(args.weights)
    backbone = load_face_backbone(weights, args.device, args.input_mean, args.input_std)
    detector = get_detector().to(args.device)
    if args.gallery is not None:
        return _search(args, backbone, detector)
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


def _search(args: argparse.Namespace, backbone: nn.Module, detector: nn.Module) -> int:
    """``--gallery``: rank the gallery for every query (exit status 1 when no query has a face)."""
    from .embed import embed_images, image_paths, print_ranking, rank_gallery

    embs, names, _, missed = embed_images(backbone, detector, image_paths(args.images),
                                          args.device)
    for name in missed:
        print(f"kpt predict face: {name}: no face found", file=sys.stderr)
    if not names:
        return 1
    ranking = rank_gallery(backbone, detector, embs, names, args.gallery, args.top, args.device,
                           "kpt predict face")
    print_ranking(ranking, args.json)
    return 0
