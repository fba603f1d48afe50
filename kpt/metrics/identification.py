"""Closed-set rank-k identification (CMC) as TinyFace is evaluated.

Protocol (AdaFace ``validation_lq/tinyface_helper.py::DIR_FAR`` with ``FARs=[1.0]``, CVLface
``evaluations/tinyface``):

* ``score = probe @ gallery.T`` on L2-normalised features (cosine similarity);
* a gallery item is a *mate* of a probe when the labels are equal; gallery items whose label belongs to no
  probe are distractors (TinyFace labels its distractor set -100) and simply compete in the ranking;
* probes without any mate in the gallery are left out;
* each probe's gallery is ordered by ``argsort(score)[::-1]``; rank-k success means a mate among the first
  k; ``rank{k}`` is the mean success in percent (CVLface multiplies by 100).

Tie order: ``argsort(score)[::-1]`` reverses an ascending sort, so among equal scores the item with the
larger gallery index comes first. numpy's default sort is not stable for long rows, so the official order
of ties is not fully defined; kpt uses the order of a stable ascending sort, reversed (computed in closed
form, without sorting), which is the official behaviour whenever numpy's sort happens to keep the input
order (always for rows of 16 or fewer items).
"""

from __future__ import annotations

import numpy as np

from kpt.metrics.common import ArrayLike, as_features, as_labels, l2_normalize

# Rows of the score matrix handled at once: TinyFace is 3,728 probes × ~157k gallery items, too large for
# one float64 matrix.
_CHUNK = 128


def _first_mate_rank(scores: np.ndarray, mates: np.ndarray) -> np.ndarray:
    """0-based position of the first mate of each probe in the order ``argsort(score)[::-1]``.

    The order is never materialised (sorting 157k gallery items per probe is the slow part): in the
    reversed stable ascending order, item j comes before item i when ``s_j > s_i``, or when
    ``s_j == s_i`` and ``j > i``. The first mate is the highest-scoring mate (the largest index among
    equal-scoring mates), and its position is the number of items that come before it.

    Args:
        scores: ``(p, g)`` similarities.
        mates: ``(p, g)`` bool, True where the gallery item has the probe's label; each row has one.

    Returns:
        ``(p,)`` int64 positions.
    """
    num_g = scores.shape[1]
    mate_scores = np.where(mates, scores, -np.inf)
    best_score = mate_scores.max(axis=1, keepdims=True)
    # largest index among the mates that reach the best score
    best_index = num_g - 1 - np.argmax((mate_scores == best_score)[:, ::-1], axis=1)
    higher = np.sum(scores > best_score, axis=1)
    tied_after = np.sum((scores == best_score) & (np.arange(num_g)[None, :] > best_index[:, None]), axis=1)
    return higher + tied_after


def identification(probe: ArrayLike, probe_labels: ArrayLike, gallery: ArrayLike,
                   gallery_labels: ArrayLike, ranks: tuple[int, ...] = (1, 5, 20)) -> dict[str, float]:
    """TinyFace-style closed-set identification accuracy at each rank, in percent.

    Args:
        probe: ``(p, D)`` probe features (flip-fused by the caller; normalised here).
        probe_labels: ``(p,)`` identity labels of the probes.
        gallery: ``(g, D)`` gallery features: mates followed by distractors, in any order.
        gallery_labels: ``(g,)`` labels; use a label no probe carries (TinyFace: -100) for distractors.
        ranks: the ranks k to report.

    Returns:
        ``{"rank1": ..., "rank5": ..., "rank20": ...}`` in percent over the probes that have a mate, plus
        ``num_probes`` (how many probes were counted).

    Raises:
        ValueError: on mismatched shapes, a rank < 1, or when no probe has a mate in the gallery.
    """
    p = l2_normalize(as_features(probe, "probe"))
    g = l2_normalize(as_features(gallery, "gallery"))
    if p.shape[1] != g.shape[1]:
        raise ValueError(f"probe and gallery: feature sizes differ, {p.shape[1]} vs {g.shape[1]}")
    p_labels = as_labels(probe_labels, "probe_labels", p.shape[0])
    g_labels = as_labels(gallery_labels, "gallery_labels", g.shape[0])
    for k in ranks:
        if int(k) < 1:
            raise ValueError(f"ranks: every rank must be >= 1, got {k}")

    first_ranks = []
    for start in range(0, p.shape[0], _CHUNK):
        stop = min(start + _CHUNK, p.shape[0])
        mates = p_labels[start:stop, None] == g_labels[None, :]
        has_mate = mates.any(axis=1)
        if not has_mate.any():
            continue
        scores = p[start:stop][has_mate] @ g.T
        first_ranks.append(_first_mate_rank(scores, mates[has_mate]))
    if not first_ranks:
        raise ValueError("probe_labels: no probe has a mate in gallery_labels; nothing to evaluate")
    first = np.concatenate(first_ranks)

    result = {f"rank{int(k)}": float(np.mean(first < int(k)) * 100.0) for k in ranks}
    result["num_probes"] = float(first.size)
    return result
