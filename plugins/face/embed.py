"""``kpt embed face IMAGE_OR_FOLDER... --weights W --out emb.npz [--gallery DIR]``.

Every image goes through the same path as ``kpt predict face`` (RetinaFace's best face, alignment to
the ArcFace template, flip-fused embedding). The embeddings are written with their file names:

* ``.npz``: ``embeddings`` (N, D) float32, unit length; ``names`` (N,) str; ``scores`` (N,) float32
  (RetinaFace's face score);
* ``.npy``: the (N, D) embeddings, and the names one per line in ``<out>.names.txt``.

Images without a face are skipped and listed on stderr (exit status 1 when none is left).
``--gallery DIR`` ranks the faces of DIR by cosine similarity to each input (1:N search) and prints
the best ``--top`` matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kpt.errors import DataError

from .predict import NoFaceError, _read_image, embed_image, find_weights, load_face_backbone

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_paths(items: list[str]) -> list[tuple[Path, str]]:
    """``(path, name)`` of every image: files as given, folders searched recursively (sorted),
    named relative to the folder.

    Raises:
        DataError: an argument does not exist, or a folder holds no image.
    """
    out: list[tuple[Path, str]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) inside")
            out += [(p, p.relative_to(path).as_posix()) for p in files]
        elif path.is_file():
            out.append((path, str(path)))
        else:
            raise DataError(f"{path}: no such image file or folder")
    return out


def embed_images(backbone: nn.Module, detector: nn.Module, items: list[tuple[Path, str]],
                 device: str = "cpu") -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Embed every image: ``(embeddings (N, D), names, scores (N,), names without a face)``."""
    embs, names, scores, missed = [], [], [], []
    for path, name in items:
        try:
            emb, score = embed_image(backbone, _read_image(path), detector, name, device)
        except NoFaceError:
            missed.append(name)
            continue
        embs.append(emb.numpy().astype(np.float32))
        names.append(name)
        scores.append(score)
    dim = embs[0].shape[0] if embs else 0
    return (np.stack(embs) if embs else np.zeros((0, dim), np.float32), names,
            np.asarray(scores, np.float32), missed)


def write_embeddings(out: Path, embeddings: np.ndarray, names: list[str],
                     scores: np.ndarray) -> list[Path]:
    """Write ``.npz`` (embeddings, names, scores) or ``.npy`` + ``.names.txt``; returns the files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, embeddings)
        listing = out.with_suffix(".names.txt")
        listing.write_text("".join(f"{n}\n" for n in names))
        return [out, listing]
    if out.suffix != ".npz":
        raise DataError(f"--out {out}: expected a .npz or .npy file name")
    np.savez(out, embeddings=embeddings, names=np.asarray(names, dtype=str), scores=scores)
    return [out]


def rank_gallery(backbone: nn.Module, detector: nn.Module, embeddings: np.ndarray,
                 names: list[str], gallery: Path, top: int, device: str = "cpu",
                 prog: str = "kpt") -> dict[str, list[tuple[str, float]]]:
    """1:N search: embed the images of ``gallery`` and rank them for every query.

    Args:
        embeddings: (N, D) unit query embeddings (from :func:`embed_images`).
        names: the N query names.
        gallery: folder of images (searched recursively); images without a face are skipped
            and listed on stderr after ``prog``.
        top: matches kept per query.

    Returns:
        ``{query name: [(gallery name, cosine similarity), ...]}``, best first.
    """
    g_embs, g_names, _, g_missed = embed_images(backbone, detector, image_paths([str(gallery)]),
                                                device)
    for name in g_missed:
        print(f"{prog}: gallery {name}: no face found, skipped", file=sys.stderr)
    if not g_names:
        raise DataError(f"--gallery {gallery}: no face found in any of its images")
    similarity = torch.from_numpy(embeddings) @ torch.from_numpy(g_embs).T  # (N, G) cosine
    ranking = {}
    for i, query in enumerate(names):
        best = torch.argsort(similarity[i], descending=True)[:top].tolist()
        ranking[query] = [(g_names[j], float(similarity[i, j])) for j in best]
    return ranking


def print_ranking(ranking: dict[str, list[tuple[str, float]]], as_json: bool = False) -> None:
    """One line per query (``name: match score, ...``), or the whole ranking as one JSON line."""
    if as_json:
        print(json.dumps(ranking))
        return
    for query, matches in ranking.items():
        print(f"{query}: " + ", ".join(f"{n} {s:.3f}" for n, s in matches))


def embed_main(argv: list[str]) -> int:
    """The ``kpt embed face`` command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="kpt embed face",
        description="Face embeddings of images (detect, align, embed) with their file names; "
                    "optionally rank a gallery folder against them (1:N).")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--weights", help="run folder or model file (default: newest "
                                          "runs/face/*/weights.safetensors)")
    parser.add_argument("--out", type=Path, help="embeddings file: .npz or .npy")
    parser.add_argument("--gallery", type=Path, help="folder of images to rank against each input")
    parser.add_argument("--top", type=int, default=5, help="matches printed per input (--gallery)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the ranking as JSON")
    parser.add_argument("--input-mean", type=float, default=127.5,
                        help="ONNX recognisers: fed (pixels - mean) / std, RGB 0-255 "
                             "(insightface 127.5 / 127.5; raw pixels 0 / 1)")
    parser.add_argument("--input-std", type=float, default=127.5, help="see --input-mean")
    args = parser.parse_args(argv)
    if args.out is None and args.gallery is None:
        parser.error("give --out FILE (embeddings) and/or --gallery DIR (1:N ranking)")
    from .evaluation.verification import get_detector

    weights = find_weights(args.weights)
    backbone = load_face_backbone(weights, args.device, args.input_mean, args.input_std)
    detector = get_detector().to(args.device)
    embs, names, scores, missed = embed_images(backbone, detector, image_paths(args.images),
                                               args.device)
    for name in missed:
        print(f"kpt embed face: {name}: no face found, skipped", file=sys.stderr)
    if not names:
        print("kpt embed face: no face in any input", file=sys.stderr)
        return 1
    if args.out is not None:
        files = write_embeddings(args.out, embs, names, scores)
        print(f"wrote {len(names)} embeddings ({embs.shape[1]}-d, weights {weights}) to "
              f"{' and '.join(map(str, files))}")
    if args.gallery is not None:
        ranking = rank_gallery(backbone, detector, embs, names, args.gallery, args.top,
                               args.device, "kpt embed face")
        print_ranking(ranking, args.json)
    return 0
