"""Batch samplers the engine and plugins share: sharded shuffling, P×K identity batches, resume skipping.

All samplers are deterministic functions of ``(seed, epoch)`` and know their rank, so that (a) every rank
of a DDP run draws its own share of the same global batch, and (b) a resumed run can skip the batches it
already trained on without loading them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from kpt.errors import DataError, UserError


class ShardedBatchSampler(Sampler[list[int]]):
    """Shuffled batches, the global batch split over ranks (the engine's default).

    Global batch i of an epoch is ``perm[i·B : (i+1)·B]`` with ``B = batch_size · world_size`` and
    ``perm = randperm(n, seed + epoch)`` (the permutation ``DistributedSampler`` uses); rank r takes the
    elements r, r + world, ... of it. So one process with batch B sees exactly the union of what
    ``world_size`` processes with ``batch_size`` each see. The incomplete last batch is dropped.

    Args:
        num_samples: dataset length.
        batch_size: batch size of this process.
        seed: base seed.
        rank: this process's rank.
        world_size: number of processes.
        shuffle: False for the identity order.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        global_batch = self.batch_size * self.world_size
        for i in range(len(self)):
            chunk = order[i * global_batch:(i + 1) * global_batch]
            yield chunk[self.rank::self.world_size]


class PKBatchSampler(Sampler[list[int]]):
    """P identities × K samples per global batch (triplet / ReID training, OpenGait's TripletSampler).

    Each global batch picks P distinct labels at random and K indices of each (with replacement when a
    label has fewer than K samples). Under DDP the P identities are split over ranks, so ``p`` must be
    a multiple of ``world_size``; rank r gets ``(p / world_size) · k`` indices, whole identities.

    Args:
        labels: label of every dataset item (length n).
        p: identities per global batch.
        k: samples per identity.
        seed: base seed; batches are a function of (seed, epoch).
        rank: this process's rank.
        world_size: number of processes.
        batches_per_epoch: default ``n // (p·k)``.
        hint: appended to the errors: which config keys set ``p`` and ``k`` (e.g. " Lower
            train.batch_size ...").

    Raises:
        DataError: (a ValueError) ``p`` exceeds the number of labels, is not a multiple of
            ``world_size``, or ``p`` / ``k`` is below 1.
    """

    def __init__(self, labels: Sequence[Any], p: int, k: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, batches_per_epoch: int | None = None,
                 hint: str = "") -> None:
        labels = np.asarray(labels)
        self.by_label = {lab: np.flatnonzero(labels == lab) for lab in np.unique(labels)}
        if p < 1 or k < 1:
            raise DataError(f"P×K batch sampler: P={p} identities × K={k} samples per batch; "
                            f"both must be at least 1.{hint}")
        if p > len(self.by_label):
            raise DataError(f"P×K batch sampler: P={p} identities per batch, but the training set "
                            f"has only {len(self.by_label)} labels (identities).{hint}")
        if p % world_size:
            raise DataError(f"P×K batch sampler: P={p} identities per batch must be a multiple of "
                            f"the world size {world_size} (number of processes).{hint}")
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.batches = batches_per_epoch or max(1, len(labels) // (p * k))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        keys = sorted(self.by_label)
        per_rank = self.p // self.world_size
        for _ in range(self.batches):
            chosen = rng.choice(len(keys), size=self.p, replace=False)
            batch = []
            for j in chosen:
                pool = self.by_label[keys[j]]
                batch.append(rng.choice(pool, size=self.k, replace=len(pool) < self.k).tolist())
            mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield [int(i) for ids in mine for i in ids]


def pk_batch_sampler(k: int, labels: Sequence[Any] | None = None,
                     batches_per_epoch: int | None = None) -> Callable[..., PKBatchSampler]:
    """A ``TaskData.batch_sampler`` factory for :class:`PKBatchSampler`: K samples per identity,
    P = ``train.batch_size // k`` identities per batch.

    The engine calls the factory with the per-process batch size, so a global batch holds
    ``world_size · batch_size / k`` identities, split over the ranks.

    Args:
        k: samples per identity.
        labels: label of every training item; default: the dataset's ``labels`` attribute.
        batches_per_epoch: default ``n // (p·k)`` (see :class:`PKBatchSampler`).
    """
    def factory(dataset: Any, batch_size: int, seed: int, rank: int, world_size: int
                ) -> PKBatchSampler:
        if batch_size < k or batch_size % k:
            raise UserError(f"train.batch_size={batch_size} must be a multiple of the {k} samples "
                            f"per identity of a P×K batch (data.k={k})")
        items = labels if labels is not None else getattr(dataset, "labels", None)
        if items is None:
            raise TypeError("pk_batch_sampler: pass labels, or give the dataset a `labels` "
                            "attribute (one label per item)")
        p = (batch_size // k) * world_size
        hint = (f" Here P = train.batch_size / k = {p * k} / {k} = {p}: lower train.batch_size or "
                f"raise k (data.k) so that P is at most the number of identities.")
        return PKBatchSampler(items, p, k, seed=seed, rank=rank, world_size=world_size,
                              batches_per_epoch=batches_per_epoch, hint=hint)
    return factory


class SkipBatches(Sampler[list[int]]):
    """The batches of ``sampler`` after the first ``skip`` (resuming in the middle of an epoch)."""

    def __init__(self, sampler: Iterable[list[int]], skip: int = 0) -> None:
        self.sampler, self.skip = sampler, skip

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.sampler):
            if i >= self.skip:
                yield batch
