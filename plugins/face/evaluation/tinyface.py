"""TinyFace rank-k identification (AdaFace ``validation_lq``, CVLface ``evaluations/tinyface``).

Layout (the TinyFace release, with AdaFace's aligned copy when present)::

    tinyface/Testing_Set/Probe/<id>_<n>.jpg
    tinyface/Testing_Set/Gallery_Match/<id>_<n>.jpg
    tinyface/Testing_Set/Gallery_Distractor/<n>.jpg
    tinyface/Testing_Set/probe_img_ID_pairs.mat           key probe_set   (optional)
    tinyface/Testing_Set/gallery_match_img_ID_pairs.mat   key gallery_set (optional)
    aligned_pad_0.1_pad_high/{Probe,Gallery_Match,Gallery_Distractor}/   (preferred when present)

Protocol (reference face.md §2.3): the identity is the number before the first ``_`` of the file
name; distractors get −100; the gallery is the match images followed by the distractors; features
are flip-fused before normalisation (``l2n(f(x) + f(flip(x)))``, AdaFace's default
``pre_norm_vector_add``); scores are inner products; rank-k is the closed-set CMC over the probes
that have a mate (:func:`kpt.metrics.identification`), in percent.

When the official ``.mat`` lists are present they name the probes and gallery matches (the files
must exist in the image folder); otherwise every image of ``Probe/`` and ``Gallery_Match/`` is used
(the two agree on the official release).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from kpt.errors import DataError
from kpt.metrics import identification

from ..data.folders import DISTRACTOR_LABEL, TinyFaceProtocol, _tinyface_label
from ..data.recordio import decode_image
from .features import extract_features, flip_detector

__all__ = ["TinyFaceImages", "evaluate_tinyface", "find_tinyface_root", "mat_names",
           "tinyface_layout_problems", "tinyface_protocol"]

logger = logging.getLogger(__name__)

_MAT = {"Probe": ("probe_img_ID_pairs.mat", "probe_set"),
        "Gallery_Match": ("gallery_match_img_ID_pairs.mat", "gallery_set")}


def mat_names(path: str | Path, key: str) -> list[str]:
    """Image names of an official TinyFace ``.mat`` list (first column of ``key``)."""
    import scipy.io

    path = Path(path)
    try:
        table = scipy.io.loadmat(str(path))
    except (ValueError, OSError, NotImplementedError) as exc:
        raise DataError(f"{path}: not a readable MATLAB file ({exc})") from None
    if key not in table:
        raise DataError(f"{path}: no {key!r} entry (has {sorted(k for k in table if k[0] != '_')})")
    cells = np.asarray(table[key], dtype=object)
    cells = cells.reshape(cells.shape[0], -1)
    try:
        return [str(np.asarray(row[0]).reshape(-1)[0]) for row in cells]
    except IndexError:
        raise DataError(f"{path}: {key!r} rows must start with the image name") from None


def _mat_dirs(base: Path) -> list[Path]:
    return [base, base / "Testing_Set", base / "tinyface" / "Testing_Set", base.parent,
            base.parent / "tinyface" / "Testing_Set"]


def tinyface_protocol(root: str | Path) -> tuple[TinyFaceProtocol, list[str]]:
    """The TinyFace sets under ``root``, restricted to the official ``.mat`` lists when present.

    Returns:
        (protocol, the ``.mat`` files used).
    """
    protocol = TinyFaceProtocol.from_folder(root)
    used = []
    for sub, (file, key) in _MAT.items():
        mat = next((d / file for d in _mat_dirs(Path(root)) if (d / file).is_file()), None)
        if mat is None:
            continue
        names = mat_names(mat, key)
        folder = protocol.root / sub
        paths = [folder / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{mat}: {len(missing)} of {len(paths)} listed images are not in "
                            f"{folder} (first: {missing[:3]})")
        labels = np.array([_tinyface_label(p) for p in paths], dtype=np.int64)
        if sub == "Probe":
            protocol.probe_paths, protocol.probe_labels = paths, labels
        else:
            n_dis = int((protocol.gallery_labels == DISTRACTOR_LABEL).sum())
            distractors = protocol.gallery_paths[len(protocol.gallery_paths) - n_dis:]
            protocol.gallery_paths = paths + distractors
            protocol.gallery_labels = np.concatenate(
                [labels, np.full(n_dis, DISTRACTOR_LABEL, np.int64)])
        used.append(str(mat))
    return protocol, used


def find_tinyface_root(roots: list[str | Path]) -> Path | None:
    """The TinyFace folder under one of ``roots`` (the root, ``tinyface/`` or ``TinyFace/``),
    preferring one whose images are AdaFace's aligned copy (``aligned_pad_0.1_pad_high``)."""
    first = None
    for root in roots:
        if not root:
            continue
        for cand in (Path(root), Path(root) / "tinyface", Path(root) / "TinyFace"):
            try:
                protocol = TinyFaceProtocol.from_folder(cand)
            except (FileNotFoundError, ValueError):
                continue
            if protocol.root.name == "aligned_pad_0.1_pad_high":
                return cand
            first = first or cand
    return first


def tinyface_layout_problems(root: str | Path) -> list[str]:
    """What is missing or inconsistent in a TinyFace folder (empty list: usable)."""
    try:
        protocol, _ = tinyface_protocol(root)
    except (FileNotFoundError, ValueError) as exc:  # DataError is a ValueError
        return [str(exc)]
    problems = []
    if not protocol.probe_paths:
        problems.append(f"{protocol.root / 'Probe'}: no images")
    if not (protocol.gallery_labels != DISTRACTOR_LABEL).any():
        problems.append(f"{protocol.root / 'Gallery_Match'}: no images")
    elif not np.isin(protocol.probe_labels, protocol.gallery_labels).any():
        problems.append(f"{protocol.root}: no probe identity has a gallery match")
    return problems


class TinyFaceImages(Dataset):
    """Images (resized to ``size`` when they differ) with fixed keypoints.

    Items: ``image`` (3, size, size) uint8 RGB, ``keypoints`` (5, 2): ``keypoints`` for every
    image (the ArcFace template for aligned copies).
    """

    def __init__(self, paths: list[Path], keypoints: torch.Tensor, size: int = 112) -> None:
        self.paths, self.kp, self.size = paths, keypoints.float(), int(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.paths[index]
        try:
            rgb = decode_image(Path(path).read_bytes(), str(path))
        except OSError as exc:
            raise DataError(f"{path}: cannot read the TinyFace image ({exc})") from None
        if rgb.shape[:2] != (self.size, self.size):
            rgb = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return {"image": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
                "keypoints": self.kp}


def evaluate_tinyface(embedder: Any, root: str | Path, *, size: int = 112, flip: bool = True,
                      keypoints: torch.Tensor | None = None, keypoint_fn: Any = None,
                      cache_dir: str | Path | None = None, chunk_size: int = 8192,
                      batch_size: int = 64, workers: int = 0,
                      ranks: tuple[int, ...] = (1, 5, 20), flip_keypoints: str = "detect"
                      ) -> dict[str, float]:
    """Rank-k identification on TinyFace.

    Args:
        embedder: see :mod:`.features`.
        root: the TinyFace folder.
        keypoints: (5, 2) keypoints given for every image (default: the ArcFace template / 112).
        keypoint_fn: a detector ``(B, 3, H, W) uint8 -> (B, 5, 2)`` replacing ``keypoints``.
        flip: flip fusion (sum of raw features before normalising).
        flip_keypoints: with ``keypoint_fn``: ``detect`` (run it on the mirrored image too, as
            CVLface's TinyFace evaluator) or ``mirror`` (mirror the detection, half the cost).

    Returns:
        ``{"rank1", "rank5", "rank20", "num_probes"}`` (ranks in percent).
    """
    from .verification import template_keypoints

    protocol, mats = tinyface_protocol(root)
    kp = template_keypoints(1)[0] if keypoints is None else torch.as_tensor(keypoints)
    paths = protocol.all_paths
    dataset = TinyFaceImages(paths, kp, size)
    describe = {"set": "tinyface", "root": str(protocol.root), "size": int(size),
                "keypoints": "detector" if keypoint_fn is not None else "fixed",
                "lists": sorted(Path(m).name for m in mats)}
    flip_fn = flip_detector(keypoint_fn, flip_keypoints, describe)
    raw = extract_features(embedder, dataset, cache_dir, flip=flip, chunk_size=chunk_size,
                           batch_size=batch_size, workers=workers, describe=describe,
                           keypoint_fn=keypoint_fn, flip_keypoint_fn=flip_fn)
    feats = raw.sum(axis=1) if flip else raw[:, 0]
    n_probe = len(protocol.probe_paths)
    return identification(feats[:n_probe], protocol.probe_labels, feats[n_probe:],
                          protocol.gallery_labels, ranks)
