"""CFP-FP (frontal-profile) verification on the raw CFP images: the board's unaligned column.

Layout (the CFP release, ``cfp-dataset/``; ``Protocol/`` paths are relative to ``Protocol/``)::

    cfp-dataset/Data/Images/<id>/frontal/<nn>.jpg     10 frontal images per identity (500 ids)
    cfp-dataset/Data/Images/<id>/profile/<nn>.jpg     4 profile images per identity
    cfp-dataset/Protocol/Pair_list_F.txt              "<index> <path>": frontal 1..5000
    cfp-dataset/Protocol/Pair_list_P.txt              "<index> <path>": profile 1..2000
    cfp-dataset/Protocol/Split/FP/01..10/same.txt     "<frontal index>,<profile index>" (350 lines)
    cfp-dataset/Protocol/Split/FP/01..10/diff.txt     the same, 350 impostor pairs

Pairs: per fold (folder name order), the ``same.txt`` lines then the ``diff.txt`` lines; each line
is one frontal image against one profile image. The folds are the official ten splits (the
release's ``Readme.txt``: identity-disjoint, 10-fold cross-validation). insightface's
``cfp_fp.bin`` lists the pairs in this order with 700 pairs per split, so its contiguous 10-fold
blocks are the same folds; here the fold of each pair is passed explicitly
(``kpt.metrics.verification(..., fold_ids=...)``), which stays right when splits differ in size.

Protocols:

* **unaligned** (KP-RPE paper, Table 1, "CFP-FP unaligned"): the whole raw image is resized to the
  recogniser's input (``resize="stretch"``: both sides to ``size``, as kpt's unaligned IJB-C;
  ``"pad"``: centred on a black square first, as CVLface's detector squares its input), and
  RetinaFace runs on that resized image for the keypoints. Images where no face is found keep the
  detector's fallback (the template) and are counted (``faces_not_found``), never dropped;
* **aligned**: RetinaFace on the raw image (squared by padding, at ``detect_size`` px), the
  five points warped onto the ArcFace template (similarity, black border), the template as the
  keypoints.

Embedding as insightface's 1:1 sets: ``l2n(f(x, k) + f(flip x, k_flip))`` (``k_flip``: the
detector rerun on the mirrored image in the unaligned protocol, as CVLface reruns its aligner;
``flip_keypoints="mirror"`` mirrors the points instead), accuracy over the ten folds (:func:`kpt.metrics.verification`) in percent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kpt.errors import DataError
from kpt.metrics import verification

from ..align import ARCFACE_TEMPLATE_112, arcface_template, umeyama_similarity
from .features import extract_features, flip_detector

__all__ = ["CFPImages", "CFPProtocol", "cfp_layout_problems", "evaluate_cfp", "find_cfp_root"]

logger = logging.getLogger(__name__)

_LISTS = {"F": "Pair_list_F.txt", "P": "Pair_list_P.txt"}
RESIZE_RULES = ("stretch", "pad")


def _missing(path: Path, what: str) -> Exception:
    from ..data.checks import MissingDataError

    return MissingDataError(f"{path}: {what} not found")


def _read_list(path: Path) -> dict[int, str]:
    """``Pair_list_[FP].txt``: index → image path (as written, relative to ``Protocol/``)."""
    if not path.is_file():
        raise _missing(path, "CFP image list")
    out: dict[int, str] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[0].isdigit():
                raise DataError(f"{path}, line {number}: expected '<index> <image path>', got "
                                f"{line.strip()[:80]!r}")
            out[int(fields[0])] = fields[1]
    if not out:
        raise DataError(f"{path}: empty CFP image list")
    return out


def _read_split(path: Path) -> list[tuple[int, int]]:
    """``same.txt`` / ``diff.txt``: (frontal index, profile index) per line ``i,j``."""
    if not path.is_file():
        raise _missing(path, "CFP split file")
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                continue
            parts = [p.strip() for p in text.split(",")]
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise DataError(f"{path}, line {number}: expected '<frontal index>,<profile "
                                f"index>', got {text[:80]!r}")
            pairs.append((int(parts[0]), int(parts[1])))
    return pairs


@dataclass
class CFPProtocol:
    """The frontal-profile pairs of a CFP tree.

    Attributes:
        root: the ``cfp-dataset`` folder (holding ``Protocol/`` and ``Data/``).
        paths: (N,) unique image files used by the pairs, in first-use order.
        first, second: (P,) int64 indices into ``paths`` (frontal, profile).
        issame: (P,) bool.
        fold: (P,) int64 official split (1..10: the folder names).
    """

    root: Path
    paths: list[Path]
    first: np.ndarray
    second: np.ndarray
    issame: np.ndarray
    fold: np.ndarray

    @classmethod
    def from_folder(cls, root: str | Path, protocol: str = "FP") -> CFPProtocol:
        """Read ``Protocol/Pair_list_{F,P}.txt`` and ``Protocol/Split/<protocol>/*/{same,diff}.txt``.

        Args:
            protocol: ``FP`` (frontal-profile, the board's) or ``FF`` (frontal-frontal).
        """
        root = Path(root)
        proto = root / "Protocol"
        frontal = _read_list(proto / _LISTS["F"])
        second_list = frontal if protocol == "FF" else _read_list(proto / _LISTS["P"])
        split_dir = proto / "Split" / protocol
        if not split_dir.is_dir():
            raise _missing(split_dir, f"CFP split folder ({protocol})")
        fold_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
        if len(fold_dirs) < 2:
            raise DataError(f"{split_dir}: expected the split folders 01 .. 10, found "
                            f"{[d.name for d in fold_dirs]}")
        index: dict[str, int] = {}
        paths: list[Path] = []
        first, second, issame, fold = [], [], [], []

        def slot(rel: str) -> int:
            if rel not in index:
                index[rel] = len(paths)
                paths.append(Path(_resolve(proto, rel)))
            return index[rel]

        for number, d in enumerate(fold_dirs, 1):
            fold_id = int(d.name) if d.name.isdigit() else number
            for name, same in (("same.txt", True), ("diff.txt", False)):
                for line, (i, j) in enumerate(_read_split(d / name), 1):
                    if i not in frontal:
                        raise DataError(f"{d / name}, line {line}: frontal index {i} is not in "
                                        f"{proto / _LISTS['F']}")
                    if j not in second_list:
                        lst = _LISTS["F" if protocol == "FF" else "P"]
                        raise DataError(f"{d / name}, line {line}: index {j} is not in "
                                        f"{proto / lst}")
                    first.append(slot(frontal[i]))
                    second.append(slot(second_list[j]))
                    issame.append(same)
                    fold.append(fold_id)
        if not first:
            raise DataError(f"{split_dir}: no pairs in the split files")
        return cls(root, paths, np.array(first, np.int64), np.array(second, np.int64),
                   np.array(issame, bool), np.array(fold, np.int64))

    def __len__(self) -> int:
        return int(self.issame.size)


def _resolve(proto: Path, rel: str) -> str:
    """An image path of a pair list: relative to ``Protocol/`` (``../Data/Images/...``)."""
    return os.path.normpath(proto / rel)


def find_cfp_root(roots: list[str | Path]) -> Path | None:
    """The CFP tree under one of ``roots`` (the root itself, ``cfp-dataset/``, ``cfp/``, ``CFP/``):
    the folder holding ``Protocol/Pair_list_F.txt``."""
    for root in roots:
        if not root:
            continue
        root = Path(root)
        for cand in (root, root / "cfp-dataset", root / "cfp", root / "CFP", root / "cfp_raw"):
            if (cand / "Protocol" / _LISTS["F"]).is_file():
                return cand
    return None


def cfp_layout_problems(root: str | Path, check_images: bool = True) -> list[str]:
    """What is missing or inconsistent in a CFP tree (empty list: usable for CFP-FP; a split
    count other than the release's 10 is usable and not listed here)."""
    try:
        protocol = CFPProtocol.from_folder(root, "FP")
    except DataError as exc:
        return [str(exc)]
    problems = []
    if check_images:
        missing = [str(p) for p in protocol.paths if not p.is_file()]
        if missing:
            problems.append(f"{Path(root) / 'Data/Images'}: {len(missing)} of "
                            f"{len(protocol.paths)} images named by the pair lists are missing "
                            f"(first: {missing[:3]})")
    return problems


class CFPImages(Dataset):
    """The CFP images as the recogniser sees them.

    Args:
        protocol: the pairs (their ``paths`` are the items).
        size: recogniser input side in pixels.
        resize: ``stretch`` or ``pad`` (unaligned); ignored when ``landmarks`` is given.
        landmarks: (N, 5, 2) float points in raw-image pixels: align onto the ArcFace template.

    Items: ``image`` (3, size, size) uint8 RGB, ``keypoints`` (5, 2) float32 normalised: the
    ArcFace template (aligned), else a placeholder that the detector replaces.
    """

    def __init__(self, protocol: CFPProtocol, size: int = 112, resize: str = "stretch",
                 landmarks: np.ndarray | None = None) -> None:
        if resize not in RESIZE_RULES:
            raise ValueError(f"CFP resize must be one of {RESIZE_RULES}, got {resize!r}")
        self.paths, self.size, self.resize = protocol.paths, int(size), resize
        # the keypoints of an aligned crop; unaligned, a placeholder the detector replaces
        self.template = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112.0, dtype=torch.float32)
        self.matrices = None
        if landmarks is not None:  # (the template needs a side that is a multiple of 112 / 128)
            template = torch.as_tensor(arcface_template(self.size), dtype=torch.float64)
            self.template = (template / self.size).float()
            src = torch.as_tensor(np.asarray(landmarks), dtype=torch.float64)
            self.matrices = umeyama_similarity(src, template)  # raw pixels → aligned pixels

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        """The raw image ``index`` as (H, W, 3) uint8 BGR."""
        path = self.paths[index]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError(f"{path}: CFP image missing or not decodable")
        return bgr

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        bgr, s = self.read(index), self.size
        if self.matrices is not None:
            out = cv2.warpAffine(bgr, self.matrices[index].numpy(), (s, s), borderValue=0.0)
        else:
            if self.resize == "pad":
                bgr = square_pad(bgr)
            out = cv2.resize(bgr, (s, s), interpolation=cv2.INTER_LINEAR)
        rgb = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
        return {"image": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
                "keypoints": self.template}


def square_pad(img: np.ndarray) -> np.ndarray:
    """``img`` (H, W, C) centred on a black square of side max(H, W) (the shorter side split
    floor / ceil, as CVLface's detector preprocessor)."""
    h, w = img.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros((side, side, *img.shape[2:]), img.dtype)
    out[top:top + h, left:left + w] = img
    return out


#: ``(B, 3, H, W) uint8 -> ((B, 5, 2) normalised keypoints, (B,) bool found)``
Detector = Callable[[Tensor], tuple[Tensor, Tensor]]


def _default_detector(batch_size: int) -> Detector:
    from .verification import detect_keypoints

    def detect(images: Tensor) -> tuple[Tensor, Tensor]:
        return detect_keypoints(images, batch_size)

    return detect


def detect_landmarks(dataset: CFPImages, detector: Detector, detect_size: int = 320,
                     batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """RetinaFace on every raw image squared by padding and resized to ``detect_size``.

    Returns:
        (N, 5, 2) float64 points in raw-image pixels, (N,) bool found.
    """
    points, found = [], []
    for lo in range(0, len(dataset), batch_size):
        imgs, sides, offsets = [], [], []
        for i in range(lo, min(len(dataset), lo + batch_size)):
            bgr = dataset.read(i)
            h, w = bgr.shape[:2]
            side = max(h, w)
            sides.append(side)
            offsets.append(((side - w) // 2, (side - h) // 2))
            small = cv2.resize(square_pad(bgr), (detect_size, detect_size),
                               interpolation=cv2.INTER_LINEAR)
            imgs.append(torch.from_numpy(cv2.cvtColor(small, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
                                         .copy()))
        kp, ok = detector(torch.stack(imgs))
        kp = kp.double().cpu().numpy() * np.array(sides, np.float64)[:, None, None]
        points.append(kp - np.array(offsets, np.float64)[:, None, :])
        found.append(ok.cpu().numpy().astype(bool))
    return np.concatenate(points), np.concatenate(found)


def evaluate_cfp(embedder: Any, root: str | Path, *, size: int = 112, aligned: bool = False,
                 resize: str = "stretch", flip: bool = True, detector: Detector | None = None,
                 batch_size: int = 64, workers: int = 0, detect_size: int = 320,
                 flip_keypoints: str = "detect") -> dict[str, float]:
    """CFP-FP accuracy on the raw CFP images over the ten official splits.

    Args:
        embedder: see :mod:`.features` (raw features of uint8 images and keypoints).
        root: the CFP tree (see :func:`find_cfp_root`).
        size: recogniser input side.
        aligned: False: the unaligned protocol (resize, keypoints from ``detector`` on the
            resized image); True: detect on the raw image, align onto the ArcFace template.
        resize: ``stretch`` or ``pad`` (unaligned protocol).
        detector: keypoint source (default RetinaFace MobileNet-0.25,
            :func:`.verification.detect_keypoints`).
        flip_keypoints: unaligned protocol: ``detect`` (the detector also runs on the mirrored
            image, as CVLface reruns its aligner on the flip) or ``mirror`` (mirror the points).

    Returns:
        ``accuracy``, ``accuracy_std`` (percent), ``threshold``, ``pairs``, ``images`` and
        ``faces_not_found`` (images where the detector fell back to the template).
    """
    protocol = CFPProtocol.from_folder(root, "FP")
    detector = detector or _default_detector(batch_size)
    missing = [p for p in protocol.paths if not p.is_file()]
    if missing:
        raise _missing(missing[0], f"CFP image (one of {len(missing)} missing images named by "
                                   f"{Path(root) / 'Protocol'})")
    not_found = 0
    if aligned:
        plain = CFPImages(protocol, size)
        landmarks, found = detect_landmarks(plain, detector, detect_size, batch_size)
        not_found = int((~found).sum())
        dataset = CFPImages(protocol, size, landmarks=landmarks)
        keypoint_fn = flip_fn = None
    else:
        dataset = CFPImages(protocol, size, resize)

        def keypoint_fn(images: Tensor) -> Tensor:
            nonlocal not_found
            kp, ok = detector(images)
            not_found += int((~ok.bool()).sum())
            return kp

        def flip_keypoint_fn(images: Tensor) -> Tensor:
            return detector(images)[0]  # misses are counted once, on the original images

        flip_fn = flip_detector(flip_keypoint_fn, flip_keypoints, {})

    logger.info("cfp_fp (%s): %d images, %d pairs, %d splits", "aligned" if aligned
                else f"unaligned, {resize}", len(dataset), len(protocol),
                np.unique(protocol.fold).size)
    # no feature cache: 7000 images take minutes, and the detector's misses are counted here
    raw = extract_features(embedder, dataset, None, flip=flip, batch_size=batch_size,
                           workers=workers, keypoint_fn=keypoint_fn, flip_keypoint_fn=flip_fn)
    feats = torch.from_numpy(raw.sum(axis=1))  # f(x) + f(flip x) (one view without flip)
    emb = torch.nn.functional.normalize(feats.double(), dim=1).numpy()
    res = verification(emb[protocol.first], emb[protocol.second], protocol.issame,
                       fold_ids=protocol.fold)
    if not_found:
        logger.warning("cfp_fp: RetinaFace found no face in %d of %d images (template keypoints "
                       "used; the images stay in the protocol)", not_found, len(dataset))
    return {"accuracy": 100.0 * res["accuracy"], "accuracy_std": 100.0 * res["accuracy_std"],
            "threshold": res["threshold"], "pairs": float(len(protocol)),
            "images": float(len(dataset)), "faces_not_found": float(not_found)}
