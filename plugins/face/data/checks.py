"""Checks of face training labels that cannot be right, shared by training and ``validate``.

The classifier head has one row per class, and the class count comes from the data (RecordIO
``property``, the identity records, else the largest label + 1). A label set that uses only a
small part of ``0..num_classes-1`` is nearly always a mistake (one stray label 1,000,000 gives a
1,000,001-class head; a ``property`` file from another data set), so training refuses it:

* a label that is NaN, infinite, negative or not a whole number: an error naming the record;
* a label at or above the class count: an error (cross-entropy would index past the head);
* one identity only: an error (a margin softmax over one class has loss 0: nothing is learned);
* **sparse labels**: fewer distinct labels than ``SPARSE_FRACTION`` × the class count is an error
  unless ``data.allow_sparse_labels=true``. Real sets are dense (insightface packs identities
  0..K-1); a few identities dropped by cleaning leave far more than half of them.

``kpt data validate face`` reports the same problems plus the gaps and outliers of the label set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kpt.errors import DataError

from .recordio import MAGIC, InsightFaceRec, unpack_record

__all__ = [
    "SPARSE_FRACTION",
    "LabelSet",
    "MissingDataError",
    "check_training_labels",
    "label_problems",
    "source_labels",
]

log = logging.getLogger(__name__)

#: Training refuses labels whose distinct count is below this fraction of the class count.
SPARSE_FRACTION = 0.5
_CHUNK = 1 << 20  # records per vectorised header read (bounds the index arrays to ~32 MB)


class MissingDataError(DataError, FileNotFoundError):
    """A face data path that does not exist (also a FileNotFoundError, as it used to be)."""


@dataclass
class LabelSet:
    """Per-item labels of a source and how to name an item in a message.

    Attributes:
        labels: (N,) float64 labels as stored (NaN where a record holds NaN).
        record: item index -> "file, record" text.
    """

    labels: np.ndarray
    record: Callable[[int], str]


def _gather(data: np.memmap, pos: np.ndarray, dtype: str) -> np.ndarray:
    """The 4-byte values of ``dtype`` at byte positions ``pos`` (N,) of ``data``."""
    raw = np.ascontiguousarray(data[pos[:, None] + np.arange(4)])
    return raw.view(dtype).ravel()


def rec_labels(rec: InsightFaceRec) -> np.ndarray:
    """Image labels of a RecordIO set from the record headers only (no image is decoded).

    Unsplit records (nearly all) are read vectorised from a memory map; any other record takes the
    chunk-by-chunk reader, whose errors name the file and key.

    Returns:
        (N,) float64 labels in image order (the first element of a label array).
    """
    keys = rec.image_keys
    n = len(keys)
    labels = np.full(n, np.nan)
    if n == 0:
        return labels
    reader = rec.reader
    size = reader.file_size
    data = np.memmap(reader.rec_path, np.uint8, mode="r") if size else None
    for lo in range(0, n, _CHUNK):
        off = np.asarray([reader.offsets[k] for k in keys[lo : lo + _CHUNK]], np.int64)
        fast = np.zeros(len(off), bool)
        if data is not None:
            fits = off + 36 <= size  # chunk head (8) + IRHeader (24) + one float label (4)
            pos = np.where(fits, off, 0)
            magic, lrec = _gather(data, pos, "<u4"), _gather(data, pos + 4, "<u4")
            flag = _gather(data, pos + 8, "<u4")
            length = lrec & ((1 << 29) - 1)
            fast = fits & (magic == MAGIC) & (lrec >> 29 == 0) & (length >= 28) & (flag < 2**20)
            label_pos = np.where(flag == 0, pos + 12, pos + 32)  # header label, or label array[0]
            fast &= label_pos + 4 <= off + 8 + length
            labels[lo : lo + len(off)][fast] = _gather(data, label_pos[fast], "<f4")
        for j in np.flatnonzero(~fast):
            key = keys[lo + j]
            header, _ = unpack_record(reader.read(key), f"{reader.rec_path} key {key}")
            value = header.label if header.flag == 0 else np.asarray(header.label)[0]
            labels[lo + j] = float(value)
    return labels


def source_labels(source: object) -> LabelSet | None:
    """The labels of a face source (RecordIO, image folders, TinyFace); None when it has none."""
    if isinstance(source, InsightFaceRec):
        path, keys = source.reader.rec_path, source.image_keys
        return LabelSet(rec_labels(source), lambda i: f"{path} record key {keys[i]}")
    labels = getattr(source, "labels", None)
    if labels is None:
        return None
    paths = getattr(source, "paths", None)

    def record(i: int) -> str:
        return str(paths[i]) if paths is not None else f"item {i}"

    return LabelSet(np.asarray(labels, np.float64), record)


def _value_problems(ls: LabelSet, num_classes: int | None, limit: int) -> list[str]:
    """Labels that cannot be class indices (NaN, negative, fractional, >= num_classes)."""
    lab = ls.labels
    bad = ~np.isfinite(lab) | (lab < 0) | (lab != np.floor(lab))
    if num_classes is not None:
        bad |= lab >= num_classes
    out = []
    for i in np.flatnonzero(bad)[:limit]:
        value = lab[i]
        if not np.isfinite(value) or value < 0 or value != np.floor(value):
            why = "a label must be a whole number >= 0"
        else:
            why = f"at or above the class count {num_classes}"
        out.append(f"{ls.record(int(i))}: label {value:g} ({why})")
    if bad.sum() > limit:
        out.append(f"... {int(bad.sum()) - limit} more bad labels")
    return out


def label_problems(ls: LabelSet, num_classes: int | None = None, count_from: str = "",
                   allow_sparse: bool = False, limit: int = 20) -> list[str]:
    """Every problem of a label set, one line each (empty when the labels can be trained on).

    Args:
        ls: the labels and their record names.
        num_classes: the head size the data declares (``property``, identity records), or None
            to use the largest label + 1.
        count_from: where ``num_classes`` comes from, for the message (e.g. the property file).
        allow_sparse: do not report a sparse label set (``data.allow_sparse_labels``).
        limit: at most this many bad labels are listed one by one.
    """
    if len(ls.labels) == 0:
        return ["no images (no labels)"]
    problems = _value_problems(ls, num_classes, limit)
    # the rest is judged on the usable labels, so one run of validate shows every kind of problem
    raw = ls.labels
    usable = np.flatnonzero(np.isfinite(raw) & (raw >= 0) & (raw == np.floor(raw)))
    if len(usable) == 0:
        return problems
    lab = raw[usable].astype(np.int64)
    uniq = np.unique(lab)
    if len(uniq) == 1:
        return [*problems, (
            f"{ls.record(int(usable[0]))}: every one of the {len(lab)} usable images has label "
            f"{uniq[0]}: one identity only, so the margin loss is 0 and nothing is learned; "
            f"training needs at least 2 identities")]
    if num_classes is None:
        num_classes, count_from = int(uniq[-1]) + 1, "the largest label + 1"
    if allow_sparse or len(uniq) >= SPARSE_FRACTION * num_classes:
        return problems
    beyond = uniq[uniq >= len(uniq)]  # a dense set 0..n-1 has none: these sit past a gap
    examples = []
    for value in beyond[::-1][:3]:
        examples.append(f"{value} ({ls.record(int(usable[np.flatnonzero(lab == value)[0]]))})")
    return [*problems, (
        f"{len(uniq)} distinct labels but {num_classes} classes (from {count_from}): "
        f"{num_classes - len(uniq)} class rows would never see an image; labels past "
        f"0..{len(uniq) - 1}: {', '.join(examples)}. Remap the labels to 0..{len(uniq) - 1}, "
        f"fix the class count, or set data.allow_sparse_labels=true to train as they are")]


def gap_summary(labels: np.ndarray) -> dict[str, object]:
    """Counts for ``validate``: distinct labels, unused label values below the largest one, and
    the labels past ``0..distinct-1`` (outliers of a set that should be dense)."""
    lab = labels[np.isfinite(labels) & (labels >= 0)].astype(np.int64)
    if not len(lab):
        return {}
    uniq = np.unique(lab)
    beyond = uniq[uniq >= len(uniq)]
    out: dict[str, object] = {"distinct labels": len(uniq), "largest label": int(uniq[-1]),
                              "unused label values": int(uniq[-1]) + 1 - len(uniq)}
    if len(beyond):
        out["labels past 0..distinct-1"] = (
            f"{len(beyond)} (largest: {', '.join(str(v) for v in beyond[::-1][:5])})")
    return out


def check_training_labels(ls: LabelSet, num_classes: int | None, count_from: str, where: str,
                          allow_sparse: bool = False) -> int:
    """Raises :class:`DataError` for labels training must not use; returns the class count.

    Args:
        ls: labels of the training source.
        num_classes: declared class count (None: the largest label + 1).
        count_from: where ``num_classes`` comes from (named in the message).
        where: the data path (named in the message).
        allow_sparse: ``data.allow_sparse_labels``.
    """
    problems = label_problems(ls, num_classes, count_from, allow_sparse, limit=5)
    if problems:
        raise DataError(f"{where}: training labels refused: " + "; ".join(problems))
    return int(num_classes if num_classes is not None else ls.labels.max() + 1)
