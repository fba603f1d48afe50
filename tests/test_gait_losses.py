"""Gait losses against brute-force re-statements of OpenGait's formulas (reference gait.md 3)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from kpt_plugins.gait.losses import GaitLoss, PartCrossEntropy, TripletLoss


def _triplet_loops(emb: np.ndarray, labels: np.ndarray, margin: float) -> float:
    """Batch-all triplet per part with loops; emb (n, C, P)."""
    n, _, parts = emb.shape
    part_losses = []
    for p in range(parts):
        x = emb[:, :, p]
        values = []
        for a, pos, neg in itertools.product(range(n), repeat=3):
            if labels[a] == labels[pos] and labels[a] != labels[neg]:
                d_ap = np.linalg.norm(x[a] - x[pos])
                d_an = np.linalg.norm(x[a] - x[neg])
                values.append(max(d_ap - d_an + margin, 0.0))
        values = np.asarray(values)
        nonzero = (values > 0).sum()
        part_losses.append(values.sum() / nonzero if nonzero else 0.0)
    return float(np.mean(part_losses))


def test_triplet_matches_brute_force():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 5, 3)).astype(np.float32) * 0.3
    labels = np.array([0, 0, 1, 1, 2, 2])
    loss, logs = TripletLoss(0.2)(torch.from_numpy(emb), torch.from_numpy(labels))
    assert abs(float(loss) - _triplet_loops(emb, labels, 0.2)) < 1e-5
    assert 0 < logs["triplet_nonzero"] <= 1


def test_triplet_zero_when_separated_and_gradient_finite():
    emb = torch.zeros(4, 2, 2)
    emb[2:, 0] = 10.0  # two ids far apart, identical within an id
    emb.requires_grad_(True)
    loss, logs = TripletLoss(0.2)(emb, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == 0.0 and logs["triplet_nonzero"] == 0.0
    emb2 = torch.zeros(4, 2, 2, requires_grad=True)  # all equal: every triplet active
    loss2, _ = TripletLoss(0.2)(emb2, torch.tensor([0, 0, 1, 1]))
    loss2.backward()
    assert abs(float(loss2.detach()) - 0.2) < 1e-5 and torch.isfinite(emb2.grad).all()


def test_part_cross_entropy_formula():
    torch.manual_seed(0)
    logits = torch.rand(4, 7, 3) * 2 - 1
    labels = torch.tensor([1, 2, 6, 0])
    loss, logs = PartCrossEntropy(16.0, 0.1)(logits, labels)
    expected = np.mean([
        F.cross_entropy(16 * logits[:, :, p], labels, label_smoothing=0.1).item()
        for p in range(3)])
    assert abs(float(loss) - expected) < 1e-5
    assert logs["accuracy"] == float((logits.argmax(1) == labels[:, None]).float().mean())


def test_gait_loss_is_weighted_sum():
    torch.manual_seed(1)
    emb, logits = torch.randn(4, 8, 3), torch.rand(4, 5, 3)
    labels = torch.tensor([0, 0, 3, 3])
    total, logs = GaitLoss(triplet_weight=1.0, ce_weight=0.5)(emb, logits, labels)
    assert abs(float(total) - (logs["triplet"] + 0.5 * logs["ce"])) < 1e-5
