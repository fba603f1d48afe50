"""TAR@FAR from pair scores, as insightface's IJB-B/IJB-C evaluation (``eval_ijbc.py``) reads the ROC.

insightface computes ``fpr, tpr, _ = sklearn.metrics.roc_curve(label, score)``, flips the three arrays and,
for each target FAR, takes the ROC point whose FPR is closest to the target (``min(zip(|fpr - target|,
range(len(fpr))))``: on equal distance the smallest index of the flipped arrays, i.e. the largest TPR at that
FPR). No interpolation between ROC points happens. The ROC here is a line-by-line restatement of sklearn's
``roc_curve`` with its default ``drop_intermediate=True`` (which removes collinear points and so decides which
FPR values exist to be picked); sklearn itself is not a kpt dependency and is not needed for thirty lines.

Template building for IJB (media averaging, summing, normalising) belongs to the face plugin; this module
only reads scores.
"""

from __future__ import annotations

import numpy as np

from kpt.metrics.common import ArrayLike, as_bool, to_numpy

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc_curve(labels: ArrayLike, scores: ArrayLike, drop_intermediate: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of binary ``labels`` against ``scores`` (higher score = more likely positive).

    Same output as ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=...)``: one point per
    distinct score (descending), the first point at ``(0, 0)`` with threshold ``+inf``; with
    ``drop_intermediate`` the points where neither the FP nor the TP count changes slope are removed.

    Args:
        labels: ``(n,)`` bool / 0-1, True for genuine (same-identity) pairs.
        scores: ``(n,)`` similarity scores.

    Returns:
        ``(fpr (m,), tpr (m,), thresholds (m,))`` with fpr, tpr non-decreasing.
    """
    y_score = to_numpy(scores, "scores").reshape(-1)
    y_true = as_bool(labels, "labels", y_score.size)
    if not np.all(np.isfinite(y_score)):
        raise ValueError("scores: contains NaN or inf")
    n_pos = int(y_true.sum())
    if n_pos == 0 or n_pos == y_true.size:
        raise ValueError(f"labels: need both genuine and impostor pairs, got {n_pos} genuine of "
                         f"{y_true.size}")

    order = np.argsort(y_score, kind="mergesort")[::-1]  # descending; sklearn's order on ties
    y_score = y_score[order]
    y_true = y_true[order]
    distinct = np.where(np.diff(y_score))[0]  # last index of each run of equal scores
    ends = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[ends]
    fps = 1 + ends - tps
    thresholds = y_score[ends]

    if drop_intermediate and fps.size > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]

    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def far_key(far: float) -> str:
    """Metric name of one FAR target: ``1e-4 -> "tar@far=1e-4"``, ``5e-4 -> "tar@far=5e-4"``."""
    return "tar@far=" + np.format_float_scientific(far, trim="-", exp_digits=1)


def tar_at_far(scores: ArrayLike, labels: ArrayLike, fars: tuple[float, ...] = DEFAULT_FARS
               ) -> dict[str, float]:
    """True accept rate at each target false accept rate, in percent, the IJB-B/C way.

    Args:
        scores: ``(n,)`` pair similarities (e.g. cosine of template features).
        labels: ``(n,)`` bool / 0-1, True for genuine pairs.
        fars: target FARs (fractions).

    Returns:
        ``{"tar@far=1e-6": ..., ..., "tar@far=1e-1": ...}``: TPR ×100 at the ROC point nearest to each
        target (no interpolation; insightface's table).
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]  # insightface flips before searching
    result = {}
    for target in fars:
        if not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"fars: each target must lie in [0, 1], got {target}")
        # np.argmin returns the first minimum: the smallest index on ties, like min(zip(|d|, range)).
        index = int(np.argmin(np.abs(fpr - float(target))))
        result[far_key(float(target))] = float(tpr[index] * 100.0)
    return result
