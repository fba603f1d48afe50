"""Margin heads for face recognition: AdaFace, ArcFace, CosFace and KappaFace.

``kpt.create("head", name, embedding_size=D, num_classes=C, **margins)`` builds one (DESIGN §4). Every head
holds a parameter ``weight`` of shape (C, D) and maps raw backbone embeddings to scaled logits with the
margin applied to the target class only; the loss is plain cross-entropy on those logits::

    head = kpt.create("head", "adaface", embedding_size=512, num_classes=10_000)
    loss = F.cross_entropy(head(embeddings, labels), labels)

The split into :meth:`MarginHead.cosine` and :meth:`MarginHead.margin` lets :class:`PartialFC` reuse the same
margin on a sampled / sharded subset of class centres. In ``margin`` a label of -1 marks a row whose class is
not among the given centres (another rank's shard): that row gets no margin.

Numerics follow the KP-RPE code base (CVLface ``classifiers/fc/fc.py``, ``losses/adaface.py``,
``losses/margin_loss.py``; reference kprpe.md §6.1, face.md §3):

* class centres initialised N(0, 0.01), cosines ``clamp(ẑ·ŵ, -1, 1)``, embedding norm ``clamp_min(1e-8)``;
* the margin is computed without gradient and written into the target logit, so backward sees the target
  logit as ``s·cos θ_y`` (straight-through, as insightface's ``CombinedMarginLoss``). The written value is
  exactly the margin formula's value (``new + (cos - cos.detach())``, the second term being exactly 0).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def target_rows(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Rows that have a target among the given class centres, and their column.

    Args:
        labels: ``(B,)`` int64 class indices; -1 marks "no target here".

    Returns:
        ``(rows (R,), cols (R,))`` int64 index tensors.
    """
    rows = torch.nonzero(labels >= 0, as_tuple=False).squeeze(1)
    return rows, labels[rows]


def write_target_straight_through(cos: Tensor, rows: Tensor, cols: Tensor, new_target: Tensor) -> Tensor:
    """Replace the target entries of ``cos`` by ``new_target`` with an identity gradient.

    Args:
        cos: ``(B, C)`` cosines (with grad).
        rows, cols: ``(R,)`` target positions.
        new_target: ``(R,)`` values computed without gradient.

    Returns:
        ``(B, C)``: equal to ``cos`` off-target and to ``new_target`` (exactly) on target; the gradient
        w.r.t. ``cos`` is 1 everywhere (CVLface writes the value under ``torch.no_grad()``).
    """
    with torch.no_grad():
        onehot = torch.zeros_like(cos, dtype=torch.bool)
        onehot[rows, cols] = True
        values = torch.zeros_like(cos)
        values[rows, cols] = new_target.to(cos.dtype)
    return torch.where(onehot, values + (cos - cos.detach()), cos)


class MarginHead(nn.Module):
    """Normalised linear classifier ``s·cos θ`` with a margin on the target logit (base class).

    Args:
        embedding_size: D, the backbone's embedding width.
        num_classes: C, the number of identities (or of locally held centres under PartialFC).
        s: logit scale.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"{type(self).__name__}: embedding_size and num_classes must be >= 1, got "
                             f"{embedding_size} and {num_classes}")
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.s = float(s)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_classes, self.embedding_size)))

    def cosine(self, embeddings: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Cosines between embeddings and (a subset of) class centres.

        Args:
            embeddings: ``(B, D)`` raw backbone embeddings.
            weight: ``(C', D)`` centres to use (default: all of ``self.weight``).

        Returns:
            ``(cos (B, C') clamped to [-1, 1], norms (B, 1) = ||embedding|| clamped at 1e-8)``.
        """
        weight = self.weight if weight is None else weight
        norms = embeddings.norm(p=2, dim=1, keepdim=True).clamp_min(1e-8)
        cos = F.linear(embeddings / norms, F.normalize(weight)).clamp(-1, 1)
        return cos, norms

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        """Scaled logits with the method's margin on each row's target (-1 = none).

        Args:
            cos: ``(B, C')`` cosines. labels: ``(B,)`` int64 in ``[-1, C')``. norms: ``(B, 1)`` norms.

        Returns:
            ``(B, C')`` logits.
        """
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """``(B, D)`` embeddings and ``(B,)`` labels in ``[0, C)`` -> ``(B, C)`` logits for cross-entropy."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"{type(self).__name__}: embeddings must be (B, {self.embedding_size}), got "
                             f"{tuple(embeddings.shape)}")
        labels = labels.reshape(-1).long()
        if labels.numel() != embeddings.shape[0]:
            raise ValueError(f"{type(self).__name__}: {labels.numel()} labels for "
                             f"{embeddings.shape[0]} embeddings")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"{type(self).__name__}: labels must lie in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        cos, norms = self.cosine(embeddings)
        return self.margin(cos, labels, norms)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}"


class CosFace(MarginHead):
    """CosFace / additive cosine margin: target logit ``s·(cos θ_y − m)`` (insightface margin (1, 0, 0.4)).

    Args:
        embedding_size, num_classes: see :class:`MarginHead`. m: cosine margin (0.4). s: scale (64).
    """

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.4, s: float = 64.0) -> None:
        super().__init__(embedding_size, num_classes, s)
        self.m = float(m)

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        rows, cols = target_rows(labels)
        with torch.no_grad():
            new_target = cos[rows, cols] - self.m
        return write_target_straight_through(cos, rows, cols, new_target) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"


class ArcFace(MarginHead):
    """ArcFace / additive angular margin: target logit ``s·cos(θ_y + m)`` (insightface margin (1, 0.5, 0)).

    The KP-RPE code base and current insightface (``CombinedMarginLoss``) apply ``cos(θ + m)`` with no
    guard, even where ``θ + m > π`` makes it non-monotonic; that is the default (``fallback="none"``).
    The pre-2023 insightface ``ArcFace`` guarded it; both of its variants are available:

    * ``fallback="threshold"``: where ``cos θ_y <= cos(π − m)`` use ``cos θ_y − m·sin(π − m)`` instead;
    * ``fallback="easy"`` (insightface ``easy_margin=True``): apply the margin only where ``cos θ_y > 0``.

    Args:
        embedding_size, num_classes: see :class:`MarginHead`. m: angular margin in rad (0.5). s: scale (64).
        fallback: ``"none"``, ``"threshold"`` or ``"easy"``.
    """

    FALLBACKS = ("none", "threshold", "easy")

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.5, s: float = 64.0,
                 fallback: str = "none") -> None:
        super().__init__(embedding_size, num_classes, s)
        if fallback not in self.FALLBACKS:
            raise ValueError(f"ArcFace: fallback must be one of {self.FALLBACKS}, got {fallback!r}")
        self.m = float(m)
        self.fallback = fallback
        self.threshold = math.cos(math.pi - self.m)
        self.sinmm = math.sin(math.pi - self.m) * self.m

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        rows, cols = target_rows(labels)
        with torch.no_grad():
            target = cos[rows, cols]
            new_target = torch.cos(torch.acos(target) + self.m)
            if self.fallback == "threshold":
                new_target = torch.where(target > self.threshold, new_target, target - self.sinmm)
            elif self.fallback == "easy":
                new_target = torch.where(target > 0, new_target, target)
        return write_target_straight_through(cos, rows, cols, new_target) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, fallback={self.fallback!r}"


class AdaFace(MarginHead):
    """AdaFace: a margin that adapts to image quality, measured by the embedding norm (Kim et al. 2022).

    For a batch with norms ``n`` (clipped to [0.001, 100], no gradient), in training mode the running
    statistics are first updated, ``μ ← α·mean(n) + (1−α)·μ`` and ``σ ← α·std(n) + (1−α)·σ`` (unbiased std,
    α = ``t_alpha``), then ``ms = clip(h·(n − μ)/(σ + eps), −1, 1)`` and the target logit becomes
    ``s·[cos(θ_y − m·ms) − (m + m·ms)]``: an angular margin for hard (low-norm) samples, an additive one for
    easy (high-norm) samples. Other logits are ``s·cos θ_j``. Straight-through gradient (CVLface).

    Differences from CVLface, on purpose: the statistics are updated only in training mode (evaluating the
    head does not move them), and a batch of one sample leaves σ unchanged (its unbiased std is NaN).

    Args:
        embedding_size, num_classes: see :class:`MarginHead`.
        m: margin (0.4). h: norm-to-margin concentration (0.333). s: scale (64).
        t_alpha: EMA rate of the norm statistics (0.01). eps: added to σ (1e-3).
        interclass_filtering_threshold: when > 0, non-target cosines above it are set to 0 (CVLface option;
            off by default).
    """

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.4, h: float = 0.333,
                 s: float = 64.0, t_alpha: float = 0.01, eps: float = 1e-3,
                 interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__(embedding_size, num_classes, s)
        self.m, self.h, self.t_alpha, self.eps = float(m), float(h), float(t_alpha), float(eps)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def update_norm_statistics(self, safe_norms: Tensor) -> None:
        """EMA update of ``batch_mean`` / ``batch_std`` from ``(B, 1)`` clipped norms (in place, no grad)."""
        with torch.no_grad():
            mean = safe_norms.mean()
            self.batch_mean.copy_(mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean)
            if safe_norms.numel() > 1:
                std = safe_norms.std()  # unbiased (N - 1), as torch's default in CVLface
                self.batch_std.copy_(std * self.t_alpha + (1 - self.t_alpha) * self.batch_std)

    def margin_scaler(self, norms: Tensor) -> Tensor:
        """``(B, 1)`` norms -> ``(B,)`` margin scaler in [-1, 1]; updates the statistics when training."""
        safe_norms = torch.clip(norms, min=0.001, max=100).detach()
        if self.training:
            self.update_norm_statistics(safe_norms)
        scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps)
        return torch.clip(scaler * self.h, -1, 1).view(-1)

    def _filter_interclass(self, cos: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        with torch.no_grad():
            dirty = (cos > self.interclass_filtering_threshold).to(cos.dtype)
            keep_target = torch.ones_like(dirty[rows])
            keep_target[torch.arange(rows.numel(), device=cos.device), cols] = 0
            dirty[rows] *= keep_target
        return cos * (1 - dirty)

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        rows, cols = target_rows(labels)
        if self.interclass_filtering_threshold > 0:
            cos = self._filter_interclass(cos, rows, cols)
        scaler = self.margin_scaler(norms)[rows]
        with torch.no_grad():
            theta = torch.acos(cos[rows, cols])
            new_target = torch.cos(theta + (self.m * scaler * -1))  # g_angular (CVLface's order)
            new_target = new_target - (self.m + (self.m * scaler))  # g_additive
        return write_target_straight_through(cos, rows, cols, new_target) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"


class KappaFace(MarginHead):
    """KappaFace: ArcFace with a per-class margin ``m·ψ_c`` from class concentration and size (Oinar et al.).

    Target logit ``s·cos(θ_y + m·ψ_y)`` with full autograd through acos/cos and no ``θ + m > π`` guard, as
    the official code (reference kappaface.md §1); ψ starts at 1 (the whole first epoch uses ``m``).

    Statistics (§2-§4), memory-buffer variant (``statistics="memory"``, the default):

    * ``memory`` holds one unit vector per training image; each training ``forward`` called with the batch's
      dataset ``indices`` sets ``slot ← normalize((1 − μ)·slot + μ·ẑ)`` (μ = ``momentum`` = 0.9, i.e. the
      new feature weighs 0.9, as the official code) and adds the updated slots to the per-class sums;
    * :meth:`update_margins` (call once per epoch end) turns the sums into ``κ̂_c = r̄(d − r̄²)/(1 − r̄²)``
      with ``r̄ = ||S_c|| / n_c``, z-scores κ̂ over classes, ``w^κ = 1 − sigmoid(T·κ̃)``,
      ``w^n = (cos(π·n_c / (1.05·max n)) + 1)/2`` and ``ψ = γ·w^κ + (1 − γ)·w^n``, then clears the sums.

    Momentum-encoder variant (``statistics="external"``): no memory; the training loop embeds each batch
    with an EMA copy of the backbone (e.g. ``timm.utils.ModelEmaV3(model, decay=0.9)``, which also averages
    BatchNorm buffers, unlike the official code) and calls :meth:`accumulate` with those features.

    Under torch.distributed, the batch (embeddings, labels, indices) is all-gathered before the memory
    update, so every rank holds the same memory, sums and ψ (no broadcast needed); ψ is indexed with global
    labels (the official code's multi-GPU lookup bug is not reproduced).

    Args:
        embedding_size, num_classes: see :class:`MarginHead`.
        m: base angular margin m₀ (0.8, the official config). s: scale (64).
        temperature: T of the concentration weight (0.4). gamma: γ, weight of the concentration term (0.7).
        momentum: memory update weight of the new feature (0.9).
        num_samples: training-set size (memory slots); required for ``statistics="memory"``.
        class_counts: ``(C,)`` images per class in the training set (n_c). When omitted, the number of
            vectors summed in the epoch is used instead (the official code counts the dataset).
        statistics: ``"memory"`` or ``"external"``.
    """

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.8, s: float = 64.0,
                 temperature: float = 0.4, gamma: float = 0.7, momentum: float = 0.9,
                 num_samples: int = 0, class_counts: Tensor | list[int] | None = None,
                 statistics: str = "memory") -> None:
        super().__init__(embedding_size, num_classes, s)
        if statistics not in ("memory", "external"):
            raise ValueError(f"KappaFace: statistics must be 'memory' or 'external', got {statistics!r}")
        if statistics == "memory" and num_samples < 1:
            raise ValueError("KappaFace: the memory variant needs num_samples (the training-set size)")
        self.m, self.temperature, self.gamma = float(m), float(temperature), float(gamma)
        self.momentum, self.statistics = float(momentum), statistics
        self.register_buffer("psi", torch.ones(num_classes))
        self.register_buffer("class_sums", torch.zeros(num_classes, embedding_size))
        self.register_buffer("summed_counts", torch.zeros(num_classes))
        counts = torch.zeros(num_classes) if class_counts is None else torch.as_tensor(
            class_counts, dtype=torch.float32).reshape(-1)
        if counts.numel() != num_classes:
            raise ValueError(f"KappaFace: class_counts needs {num_classes} entries, got {counts.numel()}")
        self.fixed_counts = class_counts is not None
        self.register_buffer("class_counts", counts)
        if statistics == "memory":
            stdv = 1.0 / math.sqrt(embedding_size / 3)  # official init (RepDistiller's memory)
            # Not saved in checkpoints (MS1MV2: 5.8M × 512 floats = 12 GB); a resumed run refills it.
            self.register_buffer("memory", torch.randn(num_samples, embedding_size) * 2 * stdv - stdv,
                                 persistent=False)

    def margin(self, cos: Tensor, labels: Tensor, norms: Tensor) -> Tensor:
        rows, cols = target_rows(labels)
        # Full autograd through acos: in float32 even under autocast (a bf16 clamp at 1 - 1e-7 rounds to 1),
        # and acos' infinite slope at ±1 is kept out of reach (official: no clamp, NaN risk).
        cos = cos.float()
        theta = torch.acos(cos[rows, cols].clamp(-1 + 1e-7, 1 - 1e-7))
        logits = cos.clone()
        logits[rows, cols] = torch.cos(theta + self.m * self.psi[cols])
        return logits * self.s

    def forward(self, embeddings: Tensor, labels: Tensor, indices: Tensor | None = None) -> Tensor:
        """Logits ``(B, C)``; in training with ``indices`` ``(B,)`` (dataset positions) the memory is updated."""
        logits = super().forward(embeddings, labels)
        if self.training and self.statistics == "memory":
            if indices is None:
                raise ValueError("KappaFace (memory variant): pass the batch's dataset indices in training: "
                                 "head(embeddings, labels, indices)")
            self.update_memory(embeddings, labels, indices)
        return logits

    @torch.no_grad()
    def update_memory(self, embeddings: Tensor, labels: Tensor, indices: Tensor) -> None:
        """Move each sample's slot towards its new unit feature and add the slot to its class sum."""
        features, labels, indices = _gather_if_distributed(
            F.normalize(embeddings.detach().float()), labels.reshape(-1).long(), indices.reshape(-1).long())
        if int(indices.min()) < 0 or int(indices.max()) >= self.memory.shape[0]:
            raise ValueError(f"KappaFace: indices must lie in [0, {self.memory.shape[0]}) (num_samples)")
        slots = F.normalize((1 - self.momentum) * self.memory[indices] + self.momentum * features)
        self.memory[indices] = slots
        self._add_to_sums(slots, labels)

    @torch.no_grad()
    def accumulate(self, features: Tensor, labels: Tensor) -> None:
        """Add L2-normalised ``(B, D)`` features (e.g. from a momentum encoder) to the class sums."""
        features, labels = _gather_if_distributed(F.normalize(features.detach().float()),
                                                  labels.reshape(-1).long())
        self._add_to_sums(features, labels)

    def _add_to_sums(self, vectors: Tensor, labels: Tensor) -> None:
        self.class_sums.index_add_(0, labels, vectors.to(self.class_sums.dtype))
        self.summed_counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.summed_counts.dtype))

    @torch.no_grad()
    def update_margins(self) -> Tensor:
        """End of epoch: κ̂ from the sums, then ψ; clears the sums. Returns κ̂ ``(C,)``."""
        counts = self.class_counts if self.fixed_counts else self.summed_counts
        counts = counts.double()
        r_bar = self.class_sums.double().norm(dim=1) / counts.clamp_min(1)
        d = float(self.embedding_size)
        kappa = r_bar * (d - r_bar**2) / (1 - r_bar**2)
        finite = torch.isfinite(kappa)
        kappa = torch.where(torch.isinf(kappa), kappa[finite].max() if finite.any() else 0.0, kappa)
        kappa = torch.nan_to_num(kappa, nan=0.0)
        std = kappa.std() if kappa.numel() > 1 else kappa.new_zeros(())
        z = (kappa - kappa.mean()) / std if float(std) > 0 else torch.zeros_like(kappa)
        w_kappa = 1 - torch.sigmoid(self.temperature * z)
        max_count = float(counts.max()) if counts.numel() else 0.0
        w_count = (torch.cos(math.pi * counts / (1.05 * max_count)) + 1) / 2 if max_count > 0 else (
            torch.ones_like(counts))
        self.psi.copy_((self.gamma * w_kappa + (1 - self.gamma) * w_count).to(self.psi.dtype))
        self.class_sums.zero_()
        self.summed_counts.zero_()
        return kappa.float()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, m={self.m}, temperature={self.temperature}, "
                f"gamma={self.gamma}, statistics={self.statistics!r}")


def _gather_if_distributed(*tensors: Tensor) -> tuple[Tensor, ...]:
    """All-gather equally sized tensors along dim 0 when a process group is initialised (no grad)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    gathered = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        gathered.append(torch.cat(parts))
    return tuple(gathered)


#: Heads that PartialFC can wrap, by registry name.
HEADS: dict[str, type[MarginHead]] = {"adaface": AdaFace, "arcface": ArcFace, "cosface": CosFace}
