"""kpt.metrics.accuracy: top-k on hand-computed logits, input checks, registry entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kpt
from kpt.metrics import accuracy


def test_accuracy_topk_hand_computed():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [1.0, 1.0, 1.0]])
    labels = torch.tensor([1, 1, 0, 1])
    out = accuracy(logits, labels, topk=(1, 2, 3))
    # top1 hits: row 0 only (row 3 ties: lower class index wins -> predicts 0).
    # top2: rows 0, 1, 2 (row 2: 0.4 then class 0 at 0.3 before class 1), row 3 -> classes 0, 1: hit.
    assert out == {"top1": 25.0, "top2": 100.0, "top3": 100.0}
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, torch.tensor([0, 1, 2, 3]))


def test_accuracy_accepts_numpy_and_is_registered():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    assert accuracy(logits, np.array([0, 1, 1])) == {"top1": pytest.approx(200 / 3)}
    assert accuracy(logits, [0, 1, 1], topk=(5,)) == {"top5": 100.0}  # k beyond C: every label counts
    assert set(kpt.list("metric")["metric"]) >= {"verification", "tar_at_far", "identification",
                                                 "retrieval", "accuracy"}
    assert kpt.create("metric", "accuracy", logits=logits, labels=[1, 1, 0]) == {
        "top1": pytest.approx(200 / 3)}
