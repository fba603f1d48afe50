"""Training augmentation of the official KP-RPE face recipe, batched, keypoints kept consistent.

Geometry follows CVLface ``gridsample_v1`` (reference kprpe.md §6.4): per image a scale
U(0.8, 1.2), a rotation U(±20°) with probability 0.2, a horizontal flip with probability 0.5 and a
translation towards a random corner (fractions px, py ∈ U(0, 1), random signs, plus an extra
offset U(0, 0.1)). As in the official code the transform is one affine ``theta`` in
``affine_grid`` coordinates ([-1, 1], ``align_corners=True``) that maps an output location to the
input location it samples:

    theta = R(angle) · S(1/scale) · T(tx, ty) · F(hflip)

The keypoints are mapped with the inverse of ``theta`` (they live in the input frame and must
follow the content) and, when the image is mirrored, the left/right points swap (0↔1, 3↔4) so
that index 0 stays the eye with the smaller x, as RetinaFace and the ArcFace template order them.

Deliberate differences: the whole batch is warped in one ``grid_sample`` call (collate time)
instead of per image in the Dataset, and the photometric / blur / cutout parts of
``gridsample_v1`` are not reproduced (they do not touch keypoints; kpt's synthetic benchmark
isolates geometry). :class:`RepeatedAugmentSampler` reproduces "RA10" repeated augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler
from torch.utils.data._utils.collate import default_collate

from kpt.data.samplers import ShardedBatchSampler

__all__ = [
    "FLIP_PERMUTATION",
    "FaceAugment",
    "FaceCollate",
    "RepeatedAugmentSampler",
    "normalize_images",
]

logger = logging.getLogger(__name__)

#: Keypoint order after a horizontal mirror: eyes and mouth corners swap, the nose stays.
FLIP_PERMUTATION = (1, 0, 2, 4, 3)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 / 0–255 RGB (B, 3, H, W) → float32 ``(x/255 − 0.5)/0.5`` in [−1, 1]."""
    return images.float().div(127.5).sub(1.0)


@dataclass
class FaceAugment:
    """Random affine augmentation of a batch with consistent keypoints (official ``gridsample_v1``).

    Args:
        scale_min, scale_max: zoom range (>1 zooms in).
        rot_prob, max_rot: probability of a rotation and its range in degrees.
        hflip_prob: probability of a horizontal mirror.
        extra_offset: extra translation fraction beyond the corner (official 0.1).
        enabled: ``False`` returns the batch unchanged.
    """

    scale_min: float = 0.8
    scale_max: float = 1.2
    rot_prob: float = 0.2
    max_rot: float = 20.0
    hflip_prob: float = 0.5
    extra_offset: float = 0.1
    enabled: bool = True

    def sample_theta(self, batch: int, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
        """Random ``theta`` (B, 2, 3) in ``affine_grid`` coordinates and the flip flags (B,) bool."""
        def u(lo: float = 0.0, hi: float = 1.0) -> Tensor:
            return torch.rand(batch, generator=generator, dtype=torch.float64) * (hi - lo) + lo

        px, py = u(), u()
        sign_x = torch.where(u() < 0.5, -1.0, 1.0).double()
        sign_y = torch.where(u() < 0.5, -1.0, 1.0).double()
        scale = u(self.scale_min, self.scale_max)
        angle = torch.where(u() < self.rot_prob, u(-self.max_rot, self.max_rot), 0.0)
        hflip = u() < self.hflip_prob
        extra = u(0.0, self.extra_offset)
        # the corner the image may move to: where its border meets the output border, plus extra
        extreme = 1.0 - scale + extra * scale
        tx, ty = extreme * px * sign_x, extreme * py * sign_y
        rad = torch.deg2rad(angle)
        cos, sin = torch.cos(rad), torch.sin(rad)
        flip = torch.where(hflip, -1.0, 1.0).double()
        # theta = R · S(1/scale) · [T(tx, ty) · F]: linear part R·diag(flip, 1)/scale,
        # translation R·(tx, ty)/scale.
        inv_s = 1.0 / scale
        theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cos * flip * inv_s
        theta[:, 0, 1] = -sin * inv_s
        theta[:, 1, 0] = sin * flip * inv_s
        theta[:, 1, 1] = cos * inv_s
        theta[:, 0, 2] = (cos * tx - sin * ty) * inv_s
        theta[:, 1, 2] = (sin * tx + cos * ty) * inv_s
        return theta.float(), hflip

    def __call__(self, images: Tensor, keypoints: Tensor,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Augment a batch.

        Args:
            images: (B, C, H, W) float; the border is filled with 0 (black for 0–255 input, as
                the official uint8 pipeline).
            keypoints: (B, K, 2) normalised (x, y) in the input frame; K = 5 in template order.
            generator: optional random generator (default: the global torch RNG).

        Returns:
            images (B, C, H, W) float and keypoints (B, K, 2) in the output frame.
        """
        if not self.enabled:
            return images, keypoints
        b, _, h, w = images.shape
        theta, hflip = self.sample_theta(b, generator)
        theta = theta.to(images.device)
        grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=True)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out, transform_keypoints(keypoints, theta, hflip.to(keypoints.device), (h, w))


def transform_keypoints(keypoints: Tensor, theta: Tensor, hflip: Tensor,
                        image_hw: tuple[int, int]) -> Tensor:
    """Map normalised keypoints (B, K, 2) of the input frame into the frame sampled by ``theta``.

    ``theta`` (B, 2, 3) maps output grid coordinates to input grid coordinates (``affine_grid``,
    ``align_corners=True``: −1 and 1 are the centres of the first and last pixel), so a point moves
    by its inverse. Mirrored images (``hflip`` (B,) bool) get their left/right points swapped.
    """
    h, w = image_hw
    size = torch.tensor([w, h], dtype=theta.dtype, device=theta.device)
    pixels = keypoints.to(theta.dtype) * size
    grid_in = 2.0 * pixels / (size - 1) - 1.0
    lin_inv = torch.linalg.inv(theta[:, :, :2])
    grid_out = (grid_in - theta[:, None, :, 2]) @ lin_inv.transpose(1, 2)
    out = ((grid_out + 1.0) * (size - 1) / 2.0 / size).to(keypoints.dtype)
    if keypoints.shape[1] == len(FLIP_PERMUTATION):
        swapped = out[:, list(FLIP_PERMUTATION)]
        out = torch.where(hflip[:, None, None], swapped, out)
    return out


class FaceCollate:
    """DataLoader ``collate_fn``: stack items, normalise images to [−1, 1], augment the batch.

    Images are warped in 0–255 (black border, as the official uint8 pipeline) and normalised
    afterwards. Keypoints are clamped to [0, 1]: a point pushed out of the picture by the
    augmentation stays at the border (KP-RPE only needs its direction from each patch).
    """

    def __init__(self, augment: FaceAugment | None = None) -> None:
        self.augment = augment

    def __call__(self, items: Sequence[dict]) -> dict[str, Tensor]:
        batch = default_collate(list(items))
        images, keypoints = batch["image"].float(), batch["keypoints"].float()
        if self.augment is not None and self.augment.enabled:
            images, keypoints = self.augment(images, keypoints)
        batch["image"] = normalize_images(images)
        batch["keypoints"] = keypoints.clamp(0.0, 1.0)
        return batch


class RepeatedAugmentSampler(Sampler[list[int]]):
    """Batches where, with probability ``prob``, a sample is replaced by another image of the
    previous sample's identity (official "RA10": ``repeated_augment_prob`` 0.1, batch size kept).

    Wraps :class:`kpt.data.samplers.ShardedBatchSampler`; the replacement draws are a function of
    (seed, epoch, rank), so resumed runs see the same batches.

    Args:
        labels: (N,) integer identity of every training item.
        batch_size: per-process batch. seed, rank, world_size: as the sharded sampler.
        prob: replacement probability.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, prob: float = 0.1) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.base = ShardedBatchSampler(len(self.labels), batch_size, seed, rank, world_size)
        self.prob, self.seed, self.rank = prob, seed, rank
        order = np.argsort(self.labels, kind="stable")
        self._sorted = order
        uniq, start, count = np.unique(self.labels[order], return_index=True, return_counts=True)
        self._start = dict(zip(uniq.tolist(), start.tolist()))
        self._count = dict(zip(uniq.tolist(), count.tolist()))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 10])
        for batch in self.base:
            batch = list(batch)
            for i in range(1, len(batch)):
                if self.prob > 0 and rng.random() < self.prob:
                    label = int(self.labels[batch[i - 1]])
                    j = self._start[label] + int(rng.integers(self._count[label]))
                    batch[i] = int(self._sorted[j])
            yield batch

