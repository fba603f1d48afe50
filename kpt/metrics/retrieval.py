"""Rank-k, mAP and mINP retrieval metrics, exactly as OpenGait's Gait3D evaluator computes them.

Protocol (OpenGait ``opengait/evaluation/evaluator.py::evaluate_Gait3D`` / ``evaluate_rank``, copied there
from Gait3D-Benchmark, and ``metric.py::cuda_dist``):

* distance: with part features ``(n, P, D)`` the distance is the **mean over parts of the per-part
  distance** (not a distance of the concatenated vectors). ``"euclidean"``: per part
  ``sqrt(relu(|q|² + |g|² - 2 q·g))``; ``"cosine"``: ``1 - mean_p cos(q_p, g_p)`` with each part
  normalised over its channels. ``(n, D)`` features are one part;
* each probe's gallery is sorted by ascending distance; no same-camera or junk filtering, no re-ranking;
* probes whose label has no match in the gallery are skipped (left out of every average);
* CMC: ``cumsum(matches)`` clipped at 1, averaged over the valid probes; ``rank{k} = 100 · CMC[k-1]``;
* AP = ``(1/R) Σ_{k: match at k} (#matches in the top k) / k`` with R the number of matches;
* INP = ``R / (1-based position of the last match)``;
* ``mAP`` and ``mINP`` are 100 × the means over the valid probes.

Ties: OpenGait sorts with ``np.argsort`` (quicksort, not stable for long rows), so its order among equal
distances is not defined. kpt sorts with a **stable** argsort (ties keep gallery order), which equals
OpenGait's order whenever numpy's sort preserves it (always for rows of 16 or fewer items) and makes the
result reproducible. Distances are computed in float64 (OpenGait: the embeddings' dtype on the GPU, often
fp16 under autocast); the CMC is averaged in float32 as OpenGait does, so Rank-k carries the same rounding.
"""

from __future__ import annotations

import numpy as np

from kpt.metrics.common import ArrayLike, as_features, as_labels, l2_normalize

METRICS = ("euclidean", "cosine")
_ALIASES = {"euc": "euclidean", "cos": "cosine"}  # OpenGait's config names


def _as_parts(x: np.ndarray) -> np.ndarray:
    """``(n, D)`` -> ``(n, 1, D)``; ``(n, P, D)`` unchanged."""
    return x[:, None, :] if x.ndim == 2 else x


def pairwise_distance(query: ArrayLike, gallery: ArrayLike, metric: str = "euclidean") -> np.ndarray:
    """Mean-over-parts distance matrix, OpenGait's ``cuda_dist`` in float64.

    Args:
        query: ``(q, D)`` or ``(q, P, D)`` features.
        gallery: ``(g, D)`` or ``(g, P, D)`` features, same P and D as ``query``.
        metric: ``"euclidean"`` or ``"cosine"`` (``1 - cosine similarity``); OpenGait's ``"euc"`` and
            ``"cos"`` are accepted too.

    Returns:
        ``(q, g)`` float64 distances.
    """
    metric = _ALIASES.get(metric, metric)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    q = _as_parts(as_features(query, "query", parts=True))
    g = _as_parts(as_features(gallery, "gallery", parts=True))
    if q.shape[1:] != g.shape[1:]:
        raise ValueError(f"query and gallery: part/feature shapes differ, {q.shape[1:]} vs {g.shape[1:]}")
    num_parts = q.shape[1]
    distance = np.zeros((q.shape[0], g.shape[0]))
    # One (q, g) product per part, accumulated, as cuda_dist loops over bins: a (P, q, g) stack would need
    # P times the memory (Gait3D: 15 × 1000 × 5000 float64 = 600 MB).
    for part in range(num_parts):
        qp, gp = q[:, part], g[:, part]
        if metric == "cosine":
            distance += l2_normalize(qp) @ l2_normalize(gp).T
        else:
            squared = np.sum(qp**2, axis=1)[:, None] + np.sum(gp**2, axis=1)[None, :] - 2.0 * (qp @ gp.T)
            distance += np.sqrt(np.maximum(squared, 0.0))
    return 1.0 - distance / num_parts if metric == "cosine" else distance / num_parts


def rank_metrics(distance: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                 max_rank: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CMC curve and per-probe AP / INP from a distance matrix (Gait3D-Benchmark ``evaluate_rank``).

    Args:
        distance: ``(q, g)`` distances (smaller = more similar).
        query_labels: ``(q,)`` labels; gallery_labels: ``(g,)`` labels.
        max_rank: length of the returned CMC (clipped to the gallery size).

    Returns:
        ``(cmc (min(max_rank, g),) float32, ap (v,), inp (v,))`` over the v probes that have a match.

    Raises:
        ValueError: when no probe has a match in the gallery.
    """
    num_g = distance.shape[1]
    max_rank = min(max_rank, num_g)
    order = np.argsort(distance, axis=1, kind="stable")
    matches = (gallery_labels[order] == query_labels[:, None]).astype(np.int64)
    valid = matches.any(axis=1)
    if not valid.any():
        raise ValueError("query_labels: no query has a match in gallery_labels; nothing to evaluate")
    matches = matches[valid]

    hits = np.cumsum(matches, axis=1)  # number of matches within the top k
    positions = np.arange(1, num_g + 1, dtype=np.float64)
    num_relevant = hits[:, -1].astype(np.float64)
    ap = np.sum(hits / positions * matches, axis=1) / num_relevant
    last = num_g - 1 - np.argmax(matches[:, ::-1], axis=1)  # 0-based position of the last match
    inp = num_relevant / (last + 1.0)
    cmc = np.minimum(hits[:, :max_rank], 1).astype(np.float32)
    cmc = cmc.sum(axis=0) / np.float32(matches.shape[0])
    return cmc, ap, inp


def retrieval(query: ArrayLike, query_labels: ArrayLike, gallery: ArrayLike, gallery_labels: ArrayLike,
              ranks: tuple[int, ...] = (1, 5, 10), metric: str = "euclidean") -> dict[str, float]:
    """OpenGait/Gait3D retrieval metrics in percent.

    Args:
        query: ``(q, D)`` or ``(q, P, D)`` probe features.
        query_labels: ``(q,)`` identity labels of the probes.
        gallery: ``(g, D)`` or ``(g, P, D)`` gallery features.
        gallery_labels: ``(g,)`` identity labels of the gallery.
        ranks: the k of the ``rank{k}`` figures.
        metric: ``"euclidean"`` (OpenGait's ``euc``, the Gait3D default) or ``"cosine"``.

    Returns:
        ``rank1``, ``rank5``, ``rank10`` (for the default ranks), ``mAP``, ``mINP`` in percent over the
        probes that have at least one gallery match, plus ``num_queries`` (how many were counted). A rank
        beyond the gallery size reports the CMC at the last gallery position.
    """
    for k in ranks:
        if int(k) < 1:
            raise ValueError(f"ranks: every rank must be >= 1, got {k}")
    distance = pairwise_distance(query, gallery, metric)
    q_labels = as_labels(query_labels, "query_labels", distance.shape[0])
    g_labels = as_labels(gallery_labels, "gallery_labels", distance.shape[1])
    cmc, ap, inp = rank_metrics(distance, q_labels, g_labels, max_rank=max(50, *map(int, ranks)))
    result = {f"rank{int(k)}": float(cmc[min(int(k), cmc.size) - 1] * 100) for k in ranks}
    result["mAP"] = float(np.mean(ap) * 100)
    result["mINP"] = float(np.mean(inp) * 100)
    result["num_queries"] = float(ap.size)
    return result
