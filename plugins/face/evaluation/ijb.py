"""IJB-B / IJB-C 1:1 template verification as insightface's ``eval_ijbc.py`` runs it.

Layout (insightface's IJB release, one folder per set, e.g. ``IJB_release/IJBC``)::

    IJBC/loose_crop/<name>.jpg                 the loosely cropped images
    IJBC/meta/ijbc_name_5pts_score.txt         name x1 y1 ... x5 y5 faceness   (one line per image)
    IJBC/meta/ijbc_face_tid_mid.txt            name template_id media_id       (same line order)
    IJBC/meta/ijbc_template_pair_label.txt     template_1 template_2 label     (one line per pair)

Protocol (reference face.md §2.2):

1. every image is aligned onto the ArcFace template with its provided five points (a similarity,
   ``cv2.warpAffine``, black border); the recogniser sees the aligned crop and, for KP-RPE, the
   provided points mapped into that crop. The **unaligned** protocol (KP-RPE paper, Table 1)
   resizes the whole loose crop to the input size instead, with the provided points carried
   along (or RetinaFace's on the resized image);
2. image feature = ``f(x) + f(flip(x))`` (``flip``; else ``f(x)``), kept at its norm
   (``keep_norm``; else L2-normalised), times the faceness score (``faceness``): the defaults are
   the official N1 D1 F2;
3. template feature = the sum over the template's medias of the mean feature of the media's
   images, L2-normalised; pair score = dot product of the two template features;
4. TAR at FAR 1e-6 … 1e-1 read from the ROC as insightface does (:func:`kpt.metrics.tar_at_far`);
   the board reports TAR@FAR = 1e-4 (0.01 %).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from kpt.errors import DataError
from kpt.metrics import tar_at_far

from ..align import arcface_template, transform_points, umeyama_similarity
from .features import extract_features, flip_detector

__all__ = [
    "IJB_TARGETS",
    "IJBImages",
    "IJBProtocol",
    "evaluate_ijb",
    "find_ijb_root",
    "ijb_layout_problems",
    "image_features",
    "pair_scores",
    "template_features",
]

logger = logging.getLogger(__name__)

IJB_TARGETS = ("ijbb", "ijbc")
_META = {"landmarks": "{t}_name_5pts_score.txt", "templates": "{t}_face_tid_mid.txt",
         "pairs": "{t}_template_pair_label.txt"}


def _rows(path: Path, columns: int) -> list[list[str]]:
    """Whitespace-separated rows of ``path``; every row must have ``columns`` fields."""
    if not path.is_file():
        from ..data.checks import MissingDataError

        raise MissingDataError(f"{path}: IJB meta file not found")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise DataError(f"{path}, line {number}: expected {columns} fields, got "
                                f"{len(fields)}: {line.strip()[:80]!r}")
            rows.append(fields)
    if not rows:
        raise DataError(f"{path}: empty IJB meta file")
    return rows


def _numbers(rows: list[list[str]], cols: slice, dtype: type, path: Path) -> np.ndarray:
    try:
        return np.array([r[cols] for r in rows], dtype=dtype)
    except ValueError as exc:
        raise DataError(f"{path}: a field is not a number ({exc})") from None


@dataclass
class IJBProtocol:
    """The meta data of one IJB set.

    Attributes:
        root: the set folder (holding ``loose_crop/`` and ``meta/``).
        target: ``ijbb`` or ``ijbc``.
        names: (N,) image file names under ``loose_crop/``.
        landmarks: (N, 5, 2) float32 provided points in pixels of the loose crop.
        faceness: (N,) float32 detector scores.
        templates, medias: (N,) int64 template and media id of each image.
        pair_t1, pair_t2: (P,) int64 template ids; pair_labels: (P,) int64 1 = same identity.
    """

    root: Path
    target: str
    names: list[str]
    landmarks: np.ndarray
    faceness: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    pair_labels: np.ndarray

    @classmethod
    def from_folder(cls, root: str | Path, target: str) -> IJBProtocol:
        """Read ``<root>/meta/<target>_*.txt`` and check that the files agree line by line."""
        root, target = Path(root), target.lower()
        meta = {k: root / "meta" / v.format(t=target) for k, v in _META.items()}
        lm_rows = _rows(meta["landmarks"], 12)
        tm_rows = _rows(meta["templates"], 3)
        pair_rows = _rows(meta["pairs"], 3)
        if len(lm_rows) != len(tm_rows):
            raise DataError(f"{meta['templates']}: {len(tm_rows)} lines, but "
                            f"{meta['landmarks'].name} has {len(lm_rows)}; the two list the same "
                            f"images in the same order")
        for i, (a, b) in enumerate(zip(lm_rows, tm_rows)):
            if a[0] != b[0]:
                raise DataError(f"{meta['templates']}, line {i + 1}: image {b[0]!r}, but line "
                                f"{i + 1} of {meta['landmarks'].name} is {a[0]!r}")
        names = [r[0] for r in lm_rows]
        landmarks = _numbers(lm_rows, slice(1, 11), np.float32, meta["landmarks"]).reshape(-1, 5, 2)
        faceness = _numbers(lm_rows, slice(11, 12), np.float32, meta["landmarks"]).reshape(-1)
        tm = _numbers(tm_rows, slice(1, 3), np.int64, meta["templates"])
        pairs = _numbers(pair_rows, slice(0, 3), np.int64, meta["pairs"])
        known = np.unique(tm[:, 0])
        unknown = np.setdiff1d(np.unique(pairs[:, :2]), known)
        if unknown.size:
            raise DataError(f"{meta['pairs']}: {unknown.size} template id(s) have no image in "
                            f"{meta['templates'].name} (first: {unknown[:5].tolist()})")
        return cls(root, target, names, landmarks, faceness, tm[:, 0], tm[:, 1],
                   pairs[:, 0], pairs[:, 1], pairs[:, 2])

    def __len__(self) -> int:
        return len(self.names)


def find_ijb_root(roots: list[str | Path], target: str) -> Path | None:
    """The set folder of ``target`` under one of ``roots`` (``IJBC``, ``IJB_release/IJBC``,
    ``ijbc``, or the root itself when it holds ``meta/<target>_face_tid_mid.txt``)."""
    target = target.lower()
    for root in roots:
        if not root:
            continue
        root = Path(root)
        for cand in (root, root / target.upper(), root / "IJB_release" / target.upper(),
                     root / target, root / "IJB" / target.upper()):
            if (cand / "meta" / _META["templates"].format(t=target)).is_file():
                return cand
    return None


def ijb_layout_problems(root: str | Path, target: str, check_images: bool = True) -> list[str]:
    """What is missing or inconsistent in one IJB set folder (empty list: usable)."""
    root = Path(root)
    problems = []
    if not (root / "loose_crop").is_dir():
        problems.append(f"{root}: missing the loose_crop/ image folder")
    for v in _META.values():
        if not (root / "meta" / v.format(t=target)).is_file():
            problems.append(f"{root / 'meta' / v.format(t=target)}: missing")
    if problems:
        return problems
    try:
        protocol = IJBProtocol.from_folder(root, target)
    except DataError as exc:
        return [str(exc)]
    if check_images and (root / "loose_crop").is_dir():
        missing = [n for n in protocol.names if not (root / "loose_crop" / n).is_file()]
        if missing:
            problems.append(f"{root / 'loose_crop'}: {len(missing)} of {len(protocol)} images "
                            f"listed in the meta files are missing (first: {missing[:3]})")
    return problems


class IJBImages(Dataset):
    """The images of an IJB set as the recogniser sees them.

    Args:
        protocol: the set.
        size: recogniser input side in pixels (multiple of 112 or 128 when aligned).
        aligned: warp onto the ArcFace template (official); False: resize the loose crop.

    Items: ``image`` (3, size, size) uint8 RGB, ``keypoints`` (5, 2) float32 normalised: the
    provided points in the frame of ``image``.
    """

    def __init__(self, protocol: IJBProtocol, size: int = 112, aligned: bool = True) -> None:
        self.protocol, self.size, self.aligned = protocol, int(size), aligned
        if aligned:
            src = torch.from_numpy(protocol.landmarks).double()
            dst = torch.as_tensor(arcface_template(self.size), dtype=torch.float64)
            self.matrices = umeyama_similarity(src, dst)  # (N, 2, 3) loose crop → aligned pixels
            self.keypoints = (transform_points(src, self.matrices) / self.size).float()

    def __len__(self) -> int:
        return len(self.protocol)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.protocol.root / "loose_crop" / self.protocol.names[index]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError(f"{path}: image missing or not decodable (IJB loose_crop)")
        s = self.size
        if self.aligned:
            m = self.matrices[index].numpy()
            out = cv2.warpAffine(bgr, m, (s, s), borderValue=0.0)
            keypoints = self.keypoints[index]
        else:
            h, w = bgr.shape[:2]
            out = cv2.resize(bgr, (s, s), interpolation=cv2.INTER_LINEAR)
            scale = torch.tensor([w, h], dtype=torch.float32)
            keypoints = torch.from_numpy(self.protocol.landmarks[index]) / scale
        rgb = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
        return {"image": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
                "keypoints": keypoints}


def image_features(raw: np.ndarray, faceness: np.ndarray, flip: bool = True,
                   keep_norm: bool = True, faceness_weight: bool = True) -> np.ndarray:
    """Per-image features for template pooling (official F2 / N1 / D1 switches).

    Args:
        raw: (N, V, D) cached raw features (V = 2: original, mirrored; V = 1 without flip).
        faceness: (N,) detector scores.

    Returns:
        (N, D) float64.
    """
    feats = raw[:, 0].astype(np.float64)
    if flip:
        if raw.shape[1] < 2:
            raise ValueError("image_features: flip needs the mirrored features (V = 2)")
        feats = feats + raw[:, 1]
    if not keep_norm:
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    if faceness_weight:
        feats = feats * np.asarray(faceness, np.float64)[:, None]
    return feats


def _group_sums(values: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """(G, D) float64 sums of the rows of ``values`` (N, D) per group id ``group`` (N,) in 0..G-1
    (torch's ``index_add_``: ``np.add.at`` and sort + ``reduceat`` are many times slower on
    IJB-C's 469k × 512 features)."""
    out = torch.zeros(num_groups, values.shape[1], dtype=torch.float64)
    out.index_add_(0, torch.from_numpy(np.asarray(group, np.int64)),
                   torch.from_numpy(np.asarray(values, np.float64)))
    return out.numpy()


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Template pooling: per template, the sum over its medias of the media's mean image feature,
    then L2-normalised.

    Args:
        feats: (N, D) image features; templates, medias: (N,) ids.

    Returns:
        (unique template ids (T,) ascending, (T, D) unit template features).
    """
    unique_t, t_index = np.unique(templates, return_inverse=True)
    # one group per (template, media): a media shared by two templates is pooled in each
    _, m_index = np.unique(medias, return_inverse=True)
    m_index = m_index.reshape(-1)
    keys, g_index = np.unique(t_index.reshape(-1) * (m_index.max() + 1) + m_index,
                              return_inverse=True)
    g_index = g_index.reshape(-1)
    media_means = _group_sums(feats, g_index, len(keys)) / np.bincount(g_index)[:, None]
    pooled = _group_sums(media_means, keys // (m_index.max() + 1), len(unique_t))
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return unique_t, pooled / np.maximum(norms, 1e-12)  # sklearn's normalize leaves 0 rows at 0


def pair_scores(template_feats: np.ndarray, unique_templates: np.ndarray, t1: np.ndarray,
                t2: np.ndarray) -> np.ndarray:
    """(P,) dot products of the template features of each pair (ids must be in ``unique_templates``)."""
    i1 = np.searchsorted(unique_templates, t1)
    i2 = np.searchsorted(unique_templates, t2)
    out = np.empty(len(t1))
    for lo in range(0, len(t1), 100_000):  # IJB-C has 15.7M pairs: bounded memory
        hi = lo + 100_000
        out[lo:hi] = np.einsum("nd,nd->n", template_feats[i1[lo:hi]], template_feats[i2[lo:hi]])
    return out


def evaluate_ijb(embedder: Any, root: str | Path, target: str, *, size: int = 112,
                 aligned: bool = True, flip: bool = True, keep_norm: bool = True,
                 faceness: bool = True, cache_dir: str | Path | None = None,
                 chunk_size: int = 8192, batch_size: int = 64, workers: int = 0,
                 keypoints: str = "provided", detector: Any = None,
                 flip_keypoints: str = "detect") -> dict[str, float]:
    """TAR@FAR of one IJB set.

    Args:
        embedder: see :mod:`.features`.
        root: the set folder; target: ``ijbb`` or ``ijbc``.
        size: recogniser input side.
        aligned: official alignment (True) or resized loose crops (the unaligned protocol).
        flip, keep_norm, faceness: the official switches (defaults F2, N1, D1).
        cache_dir: feature cache folder (None: no cache).
        keypoints: ``provided`` (the meta file's points) or ``retinaface`` (``detector`` on the
            images the recogniser sees; unaligned protocol).
        detector: ``(B, 3, H, W) uint8 -> (B, 5, 2)`` normalised keypoints for ``retinaface``.
        flip_keypoints: with ``retinaface``: ``detect`` (the detector also runs on the mirrored
            image, as CVLface's IJB evaluator reruns its aligner) or ``mirror``.

    Returns:
        ``{"tar@far=1e-6": ..., ..., "tar@far=1e-1": ...}`` in percent, plus ``templates`` and
        ``pairs`` counts.
    """
    protocol = IJBProtocol.from_folder(root, target)
    dataset = IJBImages(protocol, size, aligned)
    if keypoints not in ("provided", "retinaface"):
        raise ValueError(f"IJB keypoints must be provided or retinaface, got {keypoints!r}")
    keypoint_fn = detector if keypoints == "retinaface" else None
    if keypoint_fn is None and keypoints == "retinaface":
        raise ValueError("IJB keypoints=retinaface needs a detector")
    describe = {"set": target, "images": protocol.names[0] + ".." + protocol.names[-1],
                "aligned": aligned, "size": int(size), "keypoints": keypoints}
    flip_fn = flip_detector(keypoint_fn, flip_keypoints, describe)
    logger.info("%s (%s): %d images, %d templates, %d pairs", target,
                "aligned" if aligned else "unaligned", len(protocol),
                len(np.unique(protocol.templates)), len(protocol.pair_labels))
    raw = extract_features(embedder, dataset, cache_dir, flip=flip, chunk_size=chunk_size,
                           batch_size=batch_size, workers=workers, describe=describe,
                           keypoint_fn=keypoint_fn, flip_keypoint_fn=flip_fn)
    feats = image_features(raw, protocol.faceness, flip, keep_norm, faceness)
    unique_t, tfeats = template_features(feats, protocol.templates, protocol.medias)
    scores = pair_scores(tfeats, unique_t, protocol.pair_t1, protocol.pair_t2)
    result = tar_at_far(scores, protocol.pair_labels > 0)
    result.update(templates=float(len(unique_t)), pairs=float(len(scores)))
    return result
