"""Per-dataset five-point landmark cache, computed once with RetinaFace.

Like CVLface's ``predict_landmark.py``, which stores ``ldmk_5points.csv`` beside a training set
(columns ``idx, ldmk_0 … ldmk_9`` = x0, y0, …, x4, y4, normalised to [0, 1], five decimals), the
cache here is a CSV with the same columns plus ``score`` (the detector's face probability; 0 where
no face was found and the ArcFace template was written instead). Rows follow the item order of
:func:`~kpt_plugins.face.data.datasets.open_face_source`.

Where: ``<folder>/ldmk_5points.csv`` for folder data sets (RecordIO, image folders, TinyFace) and
``<file>.ldmk_5points.csv`` beside a single file (``lfw.bin.ldmk_5points.csv``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["CACHE_NAME", "cache_path", "compute_landmarks", "read_landmarks", "write_landmarks"]

log = logging.getLogger(__name__)

CACHE_NAME = "ldmk_5points.csv"
_COLUMNS = ["idx"] + [f"ldmk_{i}" for i in range(10)] + ["score"]


def cache_path(data_path: str | Path) -> Path:
    """Where the landmark cache of ``data_path`` lives."""
    data_path = Path(data_path)
    if data_path.is_file():
        return data_path.with_name(data_path.name + "." + CACHE_NAME)
    return data_path / CACHE_NAME


def write_landmarks(path: str | Path, keypoints: np.ndarray, scores: np.ndarray) -> None:
    """Write (N, 5, 2) normalised keypoints and (N,) scores (atomically: temp file + rename)."""
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(len(keypoints), 10)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_COLUMNS)
        for i, (row, s) in enumerate(zip(keypoints, np.asarray(scores, dtype=np.float64))):
            w.writerow([i, *(f"{v:.5f}" for v in row), f"{s:.4f}"])
    tmp.replace(path)


def read_landmarks(
    path: str | Path, expected: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a cache (also CVLface's ``ldmk_5points.csv`` without a score column).

    Args:
        path: the CSV.
        expected: number of items the data set has; a different row count is an error.

    Returns:
        keypoints (N, 5, 2) float32 and scores (N,) float32 (``None`` for CVLface files).
    """
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or header[:11] != _COLUMNS[:11]:
            raise ValueError(f"{path}: expected the header {','.join(_COLUMNS)}, got {header}")
        has_score = len(header) > 11 and header[11] == "score"
        rows = list(reader)
    try:
        table = np.array([[float(v) for v in r[: 12 if has_score else 11]] for r in rows])
    except ValueError as exc:
        raise ValueError(f"{path}: non-numeric landmark value ({exc})") from exc
    if table.size == 0:
        table = np.zeros((0, 12 if has_score else 11))
    if not np.array_equal(table[:, 0], np.arange(len(table))):
        raise ValueError(f"{path}: column idx must run 0..N-1 in order")
    if not np.isfinite(table).all():
        raise ValueError(f"{path}: contains NaN or infinite landmarks")
    if expected is not None and len(table) != expected:
        raise ValueError(
            f"{path}: {len(table)} rows but the data set has {expected} items; "
            f"re-run `kpt data prepare face --data ...`"
        )
    keypoints = table[:, 1:11].reshape(-1, 5, 2).astype(np.float32)
    scores = table[:, 11].astype(np.float32) if has_score else None
    return keypoints, scores


class _Images(torch.utils.data.Dataset):
    """The images of a source (labels dropped), for DataLoader workers."""

    def __init__(self, source: Sequence) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.source[index][0]


def _iter_images(source: Sequence, workers: int):
    """(index, (H, W, 3) uint8 image) in order; decoded in ``workers`` processes when > 0."""
    if workers <= 0:
        for i in range(len(source)):
            yield i, source[i][0]
        return
    loader = torch.utils.data.DataLoader(_Images(source), batch_size=None, num_workers=workers)
    for i, image in enumerate(loader):  # order is preserved
        yield i, image.numpy()


def compute_landmarks(
    source: Sequence, detector, batch_size: int = 64, progress=None, workers: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the detector over every image of a source.

    Consecutive images of the same size are batched together (RecordIO sets are all 112×112).

    Args:
        source: items ``(H, W, 3) uint8 RGB, label``.
        detector: a :class:`~kpt_plugins.face.retinaface.detector.RetinaFaceKeypoints`.
        batch_size: images per forward pass.
        progress: optional callable(done, total).
        workers: DataLoader worker processes decoding the images (0 = in this process).

    Returns:
        keypoints (N, 5, 2) float32 normalised, found (N,) bool, scores (N,) float32.
    """
    n = len(source)
    keypoints = np.zeros((n, 5, 2), np.float32)
    found = np.zeros(n, bool)
    scores = np.zeros(n, np.float32)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        idx = [i for i, _ in pending]
        batch = torch.from_numpy(np.stack([img for _, img in pending])).permute(0, 3, 1, 2)
        with torch.no_grad():
            kp, ok, sc = detector.best_face(batch)
        keypoints[idx], found[idx], scores[idx] = (
            kp.cpu().numpy(),
            ok.cpu().numpy(),
            sc.cpu().numpy(),
        )
        pending.clear()
        if progress is not None:
            progress(idx[-1] + 1, n)

    for i, image in _iter_images(source, workers):
        if pending and (image.shape != pending[0][1].shape or len(pending) >= batch_size):
            flush()
        pending.append((i, image))
    flush()
    scores = np.where(found, scores, 0.0).astype(np.float32)
    log.info("landmarks: %d / %d images with a face", int(found.sum()), n)
    return keypoints, found, scores
