"""Evaluation metrics (DESIGN §4). Every function takes tensors or arrays and returns a flat dict of floats.

* :func:`verification` -- insightface 10-fold 1:1 pair verification (accuracy, threshold, VAL@FAR);
* :func:`tar_at_far` -- IJB-B/C style TAR at target FARs from pair scores;
* :func:`identification` -- TinyFace-style closed-set rank-k identification;
* :func:`retrieval` -- OpenGait/Gait3D rank-k, mAP, mINP (part features, mean of per-part distances);
* :func:`accuracy` -- top-k classification accuracy.

The five are also in the ``metric`` registry under their names: ``kpt.create("metric", "retrieval",
query=..., ...)`` calls the function with those keywords, and ``kpt.registry.METRICS.get(name)`` returns it.
Units: ``verification`` reports fractions (as insightface prints them); the others report percent.
"""

from __future__ import annotations

from kpt.metrics.classification import accuracy, topk_correct
from kpt.metrics.identification import identification
from kpt.metrics.retrieval import pairwise_distance, rank_metrics, retrieval
from kpt.metrics.tar_at_far import roc_curve, tar_at_far
from kpt.metrics.verification import kfold_splits, verification

__all__ = [
    "accuracy", "identification", "kfold_splits", "pairwise_distance", "rank_metrics", "retrieval",
    "roc_curve", "tar_at_far", "topk_correct", "verification",
]


def _register() -> None:
    """Put the five metrics in the ``metric`` registry (kpt.registry imports this package lazily)."""
    from kpt.registry import METRICS

    for function in (verification, tar_at_far, identification, retrieval, accuracy):
        METRICS.register(function.__name__)(function)


_register()
