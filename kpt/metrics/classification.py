"""Top-k classification accuracy (MNIST / affNIST, sanity checks of the face and gait classifiers).

The definition is timm's ``timm.utils.accuracy``: a sample counts as correct at k when its label is among
the k largest logits. Ties among logits are broken by ``torch.topk`` / a stable descending sort (lower class
index first), so a constant logit row predicts class 0. Results are percentages, as timm reports them.
"""

from __future__ import annotations

import numpy as np

from kpt.metrics.common import ArrayLike, as_labels, to_numpy


def topk_correct(logits: ArrayLike, labels: ArrayLike, k: int) -> np.ndarray:
    """Per-sample bool: is the label among the ``k`` highest logits?

    Args:
        logits: ``(n, C)`` scores (any monotone transform of them, e.g. probabilities, works too).
        labels: ``(n,)`` integer class indices in ``[0, C)``.
        k: 1 <= k.

    Returns:
        ``(n,)`` bool array.
    """
    scores = to_numpy(logits, "logits")
    if scores.ndim != 2:
        raise ValueError(f"logits: expected shape (n, num_classes), got {tuple(scores.shape)}")
    target = as_labels(labels, "labels", scores.shape[0])
    if not np.issubdtype(target.dtype, np.integer):
        if not np.all(np.mod(target.astype(np.float64), 1) == 0):
            raise ValueError("labels: expected integer class indices")
        target = target.astype(np.int64)
    num_classes = scores.shape[1]
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"labels: class indices must lie in [0, {num_classes}), got "
                         f"[{target.min()}, {target.max()}]")
    if int(k) < 1:
        raise ValueError(f"topk: k must be >= 1, got {k}")
    k = min(int(k), num_classes)
    # Stable sort of the negated scores = descending with the lower index first on ties.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.any(top == target[:, None], axis=1)


def accuracy(logits: ArrayLike, labels: ArrayLike, topk: tuple[int, ...] = (1,)) -> dict[str, float]:
    """Top-k accuracy in percent.

    Args:
        logits: ``(n, C)`` class scores.
        labels: ``(n,)`` integer labels.
        topk: the k values to report.

    Returns:
        ``{"top1": ..., "top5": ...}`` (one key per k), percentages in [0, 100].
    """
    result = {}
    for k in topk:
        correct = topk_correct(logits, labels, k)
        result[f"top{int(k)}"] = float(np.mean(correct) * 100.0) if correct.size else float("nan")
    return result
