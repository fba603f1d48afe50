"""Validation pair files ``*.bin`` (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) read safely.

Format (insightface ``build_eval_pack.py``): ``pickle.dump((bins, issame_list))`` where ``bins``
holds 2·P encoded 112×112 aligned faces (``bytes`` in the public Python-2 files, ``np.ndarray``
uint8 in files written under Python 3) and ``issame_list`` P booleans; pair i is
(bins[2i], bins[2i+1]).

Unlike insightface's ``load_bin`` (plain ``pickle.load``, which executes whatever the file names),
the file is read with :func:`kpt.data.safe_pickle.restricted_load`, allowing only the numpy globals
an array needs. Like it, the read is retried with ``encoding="bytes"`` on a Python-2 string error.
Images are decoded to RGB (``mx.image.imdecode``) and resized to 112 on the short side if needed.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kpt.data.safe_pickle import NUMPY_ARRAY_GLOBALS, restricted_load
from kpt.errors import DataError

from .recordio import decode_image, encode_image

__all__ = ["VerificationPairs", "load_bin", "write_bin"]

log = logging.getLogger(__name__)

# numpy arrays pickled with protocol 5 (HIGHEST_PROTOCOL since Python 3.8) are rebuilt through
# ``numeric._frombuffer`` (a frombuffer + reshape, no code execution).
BIN_GLOBALS = NUMPY_ARRAY_GLOBALS | {
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


@dataclass
class VerificationPairs:
    """A verification set.

    Attributes:
        name: the file stem (``lfw``, ``cfp_fp``, …).
        images: (2P, 3, 112, 112) uint8 RGB; pair i is rows 2i and 2i+1.
        issame: (P,) bool.
    """

    name: str
    images: torch.Tensor
    issame: torch.Tensor

    def __len__(self) -> int:
        return int(self.issame.numel())


def _unpickle(path: Path) -> object:
    data = path.read_bytes()
    try:
        return restricted_load(data, BIN_GLOBALS, what=str(path))
    except pickle.UnpicklingError as exc:
        if not isinstance(exc.__cause__, UnicodeDecodeError):
            raise
    # Python 2 pickles of byte strings (the public files): keep them as bytes
    return restricted_load(data, BIN_GLOBALS, what=str(path), encoding="bytes")


def _resize_short(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    scale = size / min(h, w)
    return cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)


def load_bin(
    path: str | Path, image_size: int = 112, limit: int | None = None
) -> VerificationPairs:
    """Read a ``.bin`` pair file.

    Args:
        path: the ``.bin`` file.
        image_size: output side; images of another width are resized on the short side and
            centre-cropped (insightface only resizes).
        limit: read only the first ``limit`` pairs (for quick checks).

    Returns:
        :class:`VerificationPairs`.

    Raises:
        kpt.data.safe_pickle.UnsafePickleError: the file names a global outside numpy arrays
            (it may try to run code); nothing from it is executed.
        DataError: (a ValueError) the content is not ``(list of 2·P images, list of P bools)``.
    """
    path = Path(path)
    if not path.is_file():
        from .checks import MissingDataError

        raise MissingDataError(f"verification pair file not found: {path}")
    obj = _unpickle(path)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj)}")
    bins, issame = obj
    try:
        issame = np.asarray(list(issame), dtype=bool)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: issame_list must be a list of booleans ({exc})") from exc
    if not hasattr(bins, "__len__") or len(bins) != 2 * len(issame):
        n = len(bins) if hasattr(bins, "__len__") else "?"
        raise DataError(
            f"{path}: bins holds {n} images but issame_list has {len(issame)} pairs "
            f"(expected exactly 2 images per pair)"
        )
    if limit is not None:
        issame = issame[:limit]
    out = np.empty((2 * len(issame), 3, image_size, image_size), np.uint8)
    for i in range(2 * len(issame)):
        raw = bins[i]
        if isinstance(raw, np.ndarray):
            raw = raw.tobytes()
        if not isinstance(raw, (bytes, bytearray)):
            raise DataError(f"{path}: image {i} is a {type(raw).__name__}, expected JPEG bytes")
        img = decode_image(bytes(raw), f"{path} image {i}")
        if img.shape[0] != image_size or img.shape[1] != image_size:
            img = _resize_short(img, image_size)
            top, left = (img.shape[0] - image_size) // 2, (img.shape[1] - image_size) // 2
            img = img[top : top + image_size, left : left + image_size]
        out[i] = img.transpose(2, 0, 1)
    log.info("%s: %d pairs (%d same)", path, len(issame), int(issame.sum()))
    return VerificationPairs(path.stem, torch.from_numpy(out), torch.from_numpy(issame))


def write_bin(path: str | Path, images: np.ndarray, issame: np.ndarray, as_bytes: bool = True):
    """Write a ``.bin`` in insightface's format (for tests and the synthetic set).

    Args:
        images: (2P, H, W, 3) uint8 RGB.
        issame: (P,) bool.
        as_bytes: store JPEGs as ``bytes`` (like the public files) or as uint8 arrays (like
            ``build_eval_pack.py`` under Python 3).
    """
    if len(images) != 2 * len(issame):
        raise ValueError(f"write_bin: {len(images)} images for {len(issame)} pairs")
    bins = []
    for img in images:
        jpeg = encode_image(np.ascontiguousarray(img))
        bins.append(jpeg if as_bytes else np.frombuffer(jpeg, np.uint8).copy())
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(s) for s in issame]), f, protocol=pickle.HIGHEST_PROTOCOL)
