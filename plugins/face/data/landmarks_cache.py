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

from kpt.errors import DataError

__all__ = ["CACHE_NAME", "cache_path", "compute_landmarks", "read_landmarks", "write_landmarks"]

log = logging.getLogger(__name__)

CACHE_NAME = "ldmk_5points.csv"
#: Landmarks further out than this (normalised units) are refused. RetinaFace can put a point of a
#: face cut by the border slightly outside the frame, so half an image either side is allowed;
#: anything further (7.5, -3, 1e30) is not a point of this image, and KP-RPE's clipped distance
#: buckets would hide it.
LANDMARK_RANGE = (-0.5, 1.5)
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
    path: str | Path, expected: int | None = None, problems: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a cache (also CVLface's ``ldmk_5points.csv`` without a score column).

    Every row is checked: its number of fields, numbers, ``idx`` in order, and coordinates that are
    finite and within ``LANDMARK_RANGE`` (normalised units) of the image.

    Args:
        path: the CSV.
        expected: number of items the data set has; a different row count is an error.
        problems: when given, every problem is appended here (one line naming the file and row)
            and the readable rows are returned; otherwise the first problems raise.

    Returns:
        keypoints (N, 5, 2) float32 and scores (N,) float32 (``None`` for CVLface files).

    Raises:
        DataError: (without ``problems``) a bad header or row, naming the file and the row.
    """
    path = Path(path)
    found: list[str] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or header[:11] != _COLUMNS[:11]:
            raise DataError(f"{path}: expected the header {','.join(_COLUMNS)}, got {header}")
        has_score = len(header) > 11 and header[11] == "score"
        width = 12 if has_score else 11
        rows = []
        for n, row in enumerate(reader):
            where = f"{path}: row {n} (line {n + 2})"
            if len(row) != len(header):
                found.append(f"{where}: {len(row)} fields, expected {len(header)} ({header})")
                rows.append([float(n)] + [np.nan] * (width - 1))
                continue
            try:
                values = [float(v) for v in row[:width]]
            except ValueError as exc:
                found.append(f"{where}: non-numeric value ({exc})")
                rows.append([float(n)] + [np.nan] * (width - 1))
                continue
            xy = np.asarray(values[1:11])
            if values[0] != n:
                found.append(f"{where}: idx {row[0]}, expected {n} (idx must run 0..N-1 in order)")
            elif not np.isfinite(values).all():
                found.append(f"{where}: NaN or infinite value {row[: width]}")
            elif xy.min() < LANDMARK_RANGE[0] or xy.max() > LANDMARK_RANGE[1]:
                found.append(f"{where}: coordinate {xy[np.argmax(np.abs(xy - 0.5))]:g} outside "
                             f"{list(LANDMARK_RANGE)} (normalised: 0..1 is the image)")
            rows.append(values)
    table = np.asarray(rows, np.float64).reshape(len(rows), width)
    if expected is not None and len(table) != expected:
        found.append(
            f"{path}: {len(table)} rows but the data set has {expected} items; "
            f"re-run `kpt data prepare face --data ...`"
        )
    if found and problems is None:
        more = f" (and {len(found) - 3} more problems)" if len(found) > 3 else ""
        raise DataError("; ".join(found[:3]) + more + "; re-run `kpt data prepare face --force`")
    if problems is not None:
        problems.extend(found)
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
