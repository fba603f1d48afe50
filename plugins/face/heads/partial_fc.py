"""PartialFC: margin softmax over class centres sampled per step and sharded over ranks (An et al. 2022).

Use it instead of a plain head when the identity count does not fit one device (WebFace42M: 2M classes)::

    pfc = PartialFC(embedding_size=512, num_classes=2_000_000, head="adaface", sample_rate=0.2)
    loss = pfc(embeddings, labels)          # a scalar; no logits are returned
    loss.backward()

Behaviour (insightface ``recognition/arcface_torch/partial_fc_v2.py``, CVLface ``classifiers/partial_fc``;
reference face.md §3.3, kprpe.md §6.2):

* **Sharding.** With world size R (a ``torch.distributed`` process group; R = 1 without one), rank r owns
  ``num_local = C//R + (r < C%R)`` centres starting at ``class_start = C//R·r + min(r, C%R)``. The centres
  are the ``weight`` (num_local, D) of an inner margin head (N(0, 0.01) init). Do **not** wrap this module in
  DistributedDataParallel: its weights differ per rank. Embeddings (with gradient) and labels are
  all-gathered; the gradient reaching each rank's embeddings is the full gradient of the global-batch loss
  times R, which cancels DDP's averaging of the backbone gradients (as insightface does).
* **Sampling** (training mode, ``sample_rate < 1``): the positive classes of the global batch in this shard
  are always kept; ``int(sample_rate·num_local)`` centres are taken in all (random scores, positives set to
  2, top-k, sorted); when the positives alone exceed that number only the positives are used. Labels are
  remapped into the sampled set. Only the sampled rows receive gradient. In eval mode all centres are used.
* **Margin.** The same head margins (AdaFace, ArcFace, CosFace with their defaults and keywords) are applied
  to the sampled cosines; rows whose class lives on another rank get no margin (label -1). AdaFace's norm
  statistics are computed over the gathered global batch, so they agree on all ranks.
* **Loss.** Softmax cross-entropy over all ranks' logits: a plain ``F.cross_entropy`` in one process, a
  distributed one otherwise (all-reduced max, sum and target logit; exact log-softmax rather than
  insightface's ``-log(max(p, 1e-30))``, see ``_DistributedCrossEntropy``).

KappaFace is not offered here: its per-class statistics assume the full set of centres in one place.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .margins import HEADS, MarginHead

logger = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank``'s centres (insightface's split: the first C%R ranks +1)."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient for our slice and multiplies by R."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        world_size = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.world_size, ctx.rows = dist.get_rank(), world_size, tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # all_reduce rather than reduce_scatter: gloo (CPU) has no reduce_scatter, and the gathered
        # embedding gradient is small (global batch × D).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows] * ctx.world_size


class _DistributedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits sharded over ranks along the class axis; labels -1 = class elsewhere.

    insightface computes ``-log(max(p_target, 1e-30))`` from the all-reduced softmax; here the loss is the
    exact ``log(Σ exp) - logit_target`` (with the all-reduced max subtracted), so it equals the
    one-process ``F.cross_entropy`` even where ``p_target`` underflows (a hopeless sample at s = 64). The
    gradient, ``(softmax − onehot)/N``, is the same in both.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        max_logits = logits.max(dim=1, keepdim=True).values
        dist.all_reduce(max_logits, op=dist.ReduceOp.MAX)
        shifted = logits - max_logits
        exp = torch.exp(shifted)
        denominator = exp.sum(dim=1, keepdim=True)
        dist.all_reduce(denominator, op=dist.ReduceOp.SUM)
        rows = torch.nonzero(labels >= 0, as_tuple=False).squeeze(1)
        target = torch.zeros(logits.shape[0], 1, dtype=logits.dtype, device=logits.device)
        target[rows, 0] = shifted[rows, labels[rows]]
        dist.all_reduce(target, op=dist.ReduceOp.SUM)
        ctx.save_for_backward(exp / denominator, rows, labels)
        return (denominator.log() - target).mean()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        probs, rows, labels = ctx.saved_tensors
        grad = probs.clone()
        grad[rows, labels[rows]] -= 1
        return grad * (grad_output / probs.shape[0]), None


class PartialFC(nn.Module):
    """Margin softmax loss with sampled, rank-sharded class centres.

    Args:
        embedding_size: D.
        num_classes: C, the total identity count over all ranks.
        head: margin head name (``"adaface"``, ``"arcface"``, ``"cosface"``) or a
            :class:`~kpt_plugins.face.heads.margins.MarginHead` built for this shard
            (``num_classes=num_local``).
        sample_rate: fraction of this shard's centres used per training step (1.0: all, model parallel).
        **margins: keywords of the head (``m``, ``s``, ``h``, ``t_alpha``, ...).
    """

    # Rank-sharded weights: the kpt engine keeps them out of DDP and checkpoints them per rank
    # (kpt/engine/rank_local.py).
    kpt_rank_local = True

    def __init__(self, embedding_size: int, num_classes: int, head: str | MarginHead = "adaface",
                 sample_rate: float = 1.0, **margins: float) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PartialFC: sample_rate must lie in (0, 1], got {sample_rate}")
        self.rank, self.world_size = _world()
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.class_start, self.num_local = shard_range(self.num_classes, self.rank, self.world_size)
        if self.num_local < 1:
            raise ValueError(f"PartialFC: {num_classes} classes cannot be sharded over "
                             f"{self.world_size} ranks")
        self.sample_rate = float(sample_rate)
        self.num_sample = int(self.sample_rate * self.num_local)
        if isinstance(head, MarginHead):
            if margins:
                raise ValueError("PartialFC: pass margins to the head you built, not to PartialFC")
            if head.num_classes != self.num_local or head.embedding_size != self.embedding_size:
                raise ValueError(f"PartialFC: the head must hold this rank's {self.num_local} centres of "
                                 f"size {self.embedding_size}, got ({head.num_classes}, "
                                 f"{head.embedding_size})")
            self.head = head
        elif head in HEADS:
            self.head = HEADS[head](self.embedding_size, self.num_local, **margins)
        else:
            raise ValueError(f"PartialFC: head must be one of {sorted(HEADS)} or a MarginHead, got {head!r}")
        self.last_index: Tensor | None = None  # centres used by the last forward (for inspection)

    @property
    def weight(self) -> nn.Parameter:
        """This rank's class centres ``(num_local, D)``."""
        return self.head.weight

    def sample(self, local_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Pick the centres for this step and remap the labels into them.

        Args:
            local_labels: ``(N,)`` shard-local labels, -1 for classes on other ranks.

        Returns:
            ``(index (S,) sorted centre ids, labels (N,) remapped into [0, S) or -1)``.
        """
        with torch.no_grad():
            has_target = local_labels >= 0
            positive = torch.unique(local_labels[has_target], sorted=True)
            if self.num_sample - positive.numel() >= 0:
                scores = torch.rand(self.num_local, device=local_labels.device)
                scores[positive] = 2.0
                index = torch.topk(scores, k=self.num_sample)[1].sort()[0]
            else:
                index = positive
            remapped = local_labels.clone()
            remapped[has_target] = torch.searchsorted(index, local_labels[has_target])
        return index, remapped

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """``(B, D)`` embeddings and ``(B,)`` global labels in ``[0, C)`` -> scalar loss."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"PartialFC: embeddings must be (B, {self.embedding_size}), got "
                             f"{tuple(embeddings.shape)}")
        labels = labels.reshape(-1).long()
        if labels.numel() != embeddings.shape[0]:
            raise ValueError(f"PartialFC: {labels.numel()} labels for {embeddings.shape[0]} embeddings")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"PartialFC: labels must lie in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        distributed = self.world_size > 1
        if distributed:
            sizes = [torch.zeros(1, dtype=torch.long, device=labels.device) for _ in range(self.world_size)]
            dist.all_gather(sizes, torch.tensor([labels.numel()], device=labels.device))
            if len({int(s) for s in sizes}) != 1:
                raise ValueError(f"PartialFC: every rank needs the same batch size, got "
                                 f"{[int(s) for s in sizes]} (use drop_last=True)")
            embeddings = _AllGatherWithGrad.apply(embeddings)
            gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
            dist.all_gather(gathered, labels.contiguous())
            labels = torch.cat(gathered)

        in_shard = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local_labels = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))
        weight = self.weight
        if self.training and self.sample_rate < 1.0:
            index, local_labels = self.sample(local_labels)
            weight = weight[index]
            self.last_index = index
        else:
            self.last_index = None

        cos, norms = self.head.cosine(embeddings, weight)
        logits = self.head.margin(cos, local_labels, norms)
        if distributed:
            return _DistributedCrossEntropy.apply(logits, local_labels)
        return F.cross_entropy(logits, local_labels)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, rank={self.rank}/{self.world_size}, "
                f"class_start={self.class_start}, num_local={self.num_local}, "
                f"sample_rate={self.sample_rate}")
