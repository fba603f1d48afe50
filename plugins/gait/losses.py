"""OpenGait's gait losses: part-wise batch-all triplet and part-wise cross-entropy.

Total = 1.0 * triplet(embed_1) + 1.0 * CE(logits) (OpenGait ``loss_aggregator``: each loss is
averaged, weighted and summed). Formulas from reference gait.md 3:

* triplet, margin 0.2, per part p: d = sqrt(relu(|x|^2 + |y|^2 - 2 x.y)); for every anchor a,
  every positive (same label, *a itself included*) and every negative n:
  l = relu(d(a, pos) - d(a, n) + margin); part loss = sum(l) / #(l != 0) (0 when none);
  loss = mean over parts.
* CE: cross-entropy of ``scale * logits`` (cosine logits from the BNNeck) with label smoothing
  0.1, the label repeated for every part, averaged over samples x parts.

Under DDP (OpenGait ``gather_and_scale_wrapper``) the triplet loss sees the whole global batch:
embeddings and labels are all-gathered, only the local slice carries gradients, and the gradient is
multiplied by the world size, so that DDP's gradient mean is the gradient of the triplet loss of the
global batch. CE stays per process (its per-rank means average to the global mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kpt.engine.distributed import all_gather_with_grad, group_world_size, scale_grad


def partwise_distance(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distance per part, computed as OpenGait does.

    Args:
        x: (P, n, C) features; y: (P, m, C).

    Returns:
        (P, n, m) distances sqrt(relu(|x|^2 + |y|^2 - 2 x.y)).
    """
    x2 = x.pow(2).sum(-1, keepdim=True)
    y2 = y.pow(2).sum(-1).unsqueeze(1)
    inner = x @ y.transpose(1, 2)
    # OpenGait takes sqrt(relu(.)); the 1e-12 floor (1e-6 in distance) keeps the gradient finite
    # where a distance is ~0 (every anchor is its own positive), which plain sqrt does not.
    return torch.sqrt((x2 + y2 - 2 * inner).clamp_min(1e-12))


class TripletLoss(nn.Module):
    """Batch-all triplet loss per part with the average-over-non-zero reduction.

    Args:
        margin: triplet margin (0.2).
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """
        Args:
            embeddings: (n, C, P) part embeddings (``embed_1``).
            labels: (n,) int identity labels.

        Returns:
            scalar loss and logs: ``triplet_nonzero`` (fraction of active triplets, averaged over
            parts) and ``triplet_dist_gap`` (mean negative minus mean positive distance).
        """
        feats = embeddings.float().permute(2, 0, 1)  # (P, n, C)
        dist = partwise_distance(feats, feats)  # (P, n, n)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)  # (n, n), diagonal included
        diff = ~same
        # (P, n, n_pos, n_neg) over all (anchor, positive, negative) index triples, masked.
        ap = dist.unsqueeze(3)
        an = dist.unsqueeze(2)
        valid = (same.unsqueeze(2) & diff.unsqueeze(1)).unsqueeze(0)
        losses = F.relu(ap - an + self.margin) * valid
        nonzero = (losses > 0).flatten(1).sum(1)  # (P,)
        per_part = losses.flatten(1).sum(1) / nonzero.clamp(min=1)
        loss = per_part.mean()
        num_valid = valid.sum().clamp(min=1)
        with torch.no_grad():
            pos = dist[:, same].mean() if same.any() else dist.new_zeros(())
            neg = dist[:, diff].mean() if diff.any() else dist.new_zeros(())
        logs = {"triplet_nonzero": float(nonzero.float().mean() / num_valid),
                "triplet_dist_gap": float(neg - pos)}
        return loss, logs


class PartCrossEntropy(nn.Module):
    """Cross-entropy over parts on scaled cosine logits (OpenGait ``CrossEntropyLoss``).

    Args:
        scale: logit scale (16).
        label_smoothing: epsilon (0.1).
    """

    def __init__(self, scale: float = 16.0, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.scale, self.label_smoothing = scale, label_smoothing

    def forward(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """
        Args:
            logits: (n, num_classes, P) cosine logits.
            labels: (n,) int labels.

        Returns:
            scalar loss and logs: ``accuracy`` (part-wise top-1, in [0, 1]).
        """
        n, _, parts = logits.shape
        target = labels.unsqueeze(1).expand(n, parts)
        loss = F.cross_entropy(self.scale * logits.float(), target,
                               label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(1) == target).float().mean()
        return loss, {"accuracy": float(acc)}


class GaitLoss(nn.Module):
    """Weighted sum of :class:`TripletLoss` and :class:`PartCrossEntropy` (weights 1.0 / 1.0).

    Args:
        global_triplet: under DDP, compute the triplet loss over the embeddings of every process
            (OpenGait); False: each process's own batch only. No effect in a single process.
    """

    def __init__(self, margin: float = 0.2, scale: float = 16.0, label_smoothing: float = 0.1,
                 triplet_weight: float = 1.0, ce_weight: float = 1.0,
                 global_triplet: bool = True) -> None:
        super().__init__()
        self.triplet = TripletLoss(margin)
        self.ce = PartCrossEntropy(scale, label_smoothing)
        self.triplet_weight, self.ce_weight = triplet_weight, ce_weight
        self.global_triplet = global_triplet

    def forward(self, embeddings: Tensor, logits: Tensor, labels: Tensor
                ) -> tuple[Tensor, dict[str, float]]:
        """
        Args:
            embeddings: (n, C, P) ``embed_1``; logits: (n, num_classes, P); labels: (n,).

        Returns:
            scalar loss and a flat dict of logs. Under DDP with ``global_triplet`` the ``triplet``
            log (and the triplet part of the loss value) is the global batch's triplet loss; only
            its gradient carries OpenGait's world-size factor.
        """
        world = group_world_size() if self.global_triplet else 1
        if world > 1:
            tri, tri_logs = self.triplet(all_gather_with_grad(embeddings),
                                         all_gather_with_grad(labels))
            tri = scale_grad(tri, world)
        else:
            tri, tri_logs = self.triplet(embeddings, labels)
        ce, ce_logs = self.ce(logits, labels)
        loss = self.triplet_weight * tri + self.ce_weight * ce
        logs = {"triplet": float(tri.detach()), "ce": float(ce.detach())}
        return loss, {**logs, **tri_logs, **ce_logs}
