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

After the geometry, :class:`AppearanceAugment` applies the other parts of ``gridsample_v1`` to
every image, in the official order: cutout (probability 0.2), blur (probability 0.2; average,
Gaussian or down-up resize, the resize 8× more likely) and photometric (two RandAugment-style colour
operations). They change pixels only; the keypoints are left as the geometry put them, and they are
not clamped to [0, 1] (the official code does not clamp them either).

Deliberate differences: the whole batch is warped in one ``grid_sample`` call (collate time)
instead of per image with ``cv2.warpAffine`` in the Dataset, and the appearance operations run on
uint8 tensors with torchvision / OpenCV instead of PIL / imgaug / albumentations (the same
operations; rounding may differ by one grey level). :class:`RepeatedAugmentSampler` reproduces
"RA10" repeated augmentation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import Sampler
from torch.utils.data._utils.collate import default_collate

from kpt.data.samplers import ShardedBatchSampler
from kpt.errors import UserError

from ..align import ARCFACE_TEMPLATE_112

__all__ = [
    "FLIP_PERMUTATION",
    "PHOTOMETRIC_OPS",
    "AppearanceAugment",
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


def jitter_keypoints(keypoints: Tensor, pixels: float, image_hw: Sequence[int],
                     generator: torch.Generator | None = None) -> Tensor:
    """(B, K, 2) normalised keypoints, each point moved by its own uniform offset in ±``pixels``."""
    h, w = int(image_hw[0]), int(image_hw[1])
    scale = keypoints.new_tensor([pixels / w, pixels / h])
    noise = torch.rand(keypoints.shape, generator=generator, dtype=keypoints.dtype) * 2 - 1
    return keypoints + noise.to(keypoints.device) * scale


class FaceCollate:
    """DataLoader ``collate_fn``: stack items, augment the batch, normalise images to [−1, 1].

    Images are warped in 0–255 (black border, as the official uint8 pipeline), rounded to uint8
    for the appearance operations when ``appearance`` is given (the official warp also returns
    uint8), and normalised afterwards. Keypoints are not clamped: a point the augmentation pushes
    off the picture keeps its position outside [0, 1], as in the official code (KP-RPE only needs
    its offset from every patch).

    ``keypoint_jitter`` (pixels, training only, kpt's own option, not official): after the
    augmentation every keypoint moves by its own uniform offset in ±``keypoint_jitter`` px in x
    and y while the image stays, as a landmark detector's error would move it (issue 24 measures
    whether this changes how much KP-RPE relies on its keypoints).

    ``keypoint_blind`` (training only, kpt's own): the model is given the ArcFace template as the
    keypoints of every training image, whatever the image and its augmentation: the keypoint-blind
    control of docs/face.md (same architecture, no keypoint information; evaluate it with template
    keypoints).
    """

    def __init__(self, augment: FaceAugment | None = None,
                 appearance: AppearanceAugment | None = None, keypoint_jitter: float = 0.0,
                 keypoint_blind: bool = False) -> None:
        if not keypoint_jitter >= 0:
            raise ValueError(f"data.keypoint_jitter={keypoint_jitter}: expected >= 0 (pixels)")
        self.augment = augment
        self.appearance = appearance
        self.keypoint_jitter = float(keypoint_jitter)
        self.keypoint_blind = bool(keypoint_blind)

    def __call__(self, items: Sequence[dict]) -> dict[str, Tensor]:
        batch = default_collate(list(items))
        images, keypoints = batch["image"].float(), batch["keypoints"].float()
        if self.augment is not None and self.augment.enabled:
            images, keypoints = self.augment(images, keypoints)
            if self.appearance is not None and self.appearance.active:
                images = self.appearance(images.round().clamp(0, 255).to(torch.uint8))
            if self.keypoint_jitter > 0:
                keypoints = jitter_keypoints(keypoints, self.keypoint_jitter, images.shape[-2:])
            if self.keypoint_blind:
                template = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112.0, dtype=keypoints.dtype)
                keypoints = template.expand_as(keypoints).clone()
        batch["image"] = normalize_images(images)
        batch["keypoints"] = keypoints
        return batch


# ------------------------------------------------------------------- appearance (gridsample_v1)
#: The photometric operations of ``gridsample_v1`` and whether their magnitude takes a random sign.
PHOTOMETRIC_OPS: dict[str, bool] = {
    "Identity": False, "Brightness": True, "Saturate": True, "Contrast": True,
    "Sharpness": True, "Equalize": False, "Grayscale": False,
}
_RARE_OPS = ("Equalize", "Grayscale")
#: OpenCV interpolations the down-up resize blur draws from (official list).
RESIZE_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC,
                         cv2.INTER_LANCZOS4)


def _uniform(generator: torch.Generator | None, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator | None, lo: int, hi: int) -> int:
    """Integer in [lo, hi) (numpy's ``randint`` convention)."""
    return int(torch.randint(lo, hi, (), generator=generator))


def sample_photometric(num_ops: int = 2, magnitude: int = 14, magnitude_offset: int = 9,
                       num_bins: int = 31, generator: torch.Generator | None = None
                       ) -> list[tuple[str, float]]:
    """The official photometric draw: ``num_ops`` (operation, magnitude) pairs.

    Each operation is uniform over :data:`PHOTOMETRIC_OPS`, Equalize and Grayscale being redrawn
    (up to twice) to make them rarer; the magnitude bin is uniform in [m − offset, m + offset)
    clipped to the bins, its value ``linspace(0, 0.9, num_bins)[bin]``, with a random sign for the
    signed operations.
    """
    names = list(PHOTOMETRIC_OPS)
    levels = torch.linspace(0.0, 0.9, num_bins, dtype=torch.float64)
    ops = []
    for _ in range(num_ops):
        name = names[_randint(generator, 0, len(names))]
        for _retry in range(2):
            if name not in _RARE_OPS:
                break
            name = names[_randint(generator, 0, len(names))]
        level = _randint(generator, magnitude - magnitude_offset, magnitude + magnitude_offset)
        value = float(levels[min(max(level, 0), num_bins - 1)]) if PHOTOMETRIC_OPS[name] else 0.0
        if PHOTOMETRIC_OPS[name] and _randint(generator, 0, 2):
            value = -value
        ops.append((name, value))
    return ops


def apply_photometric(image: Tensor, ops: Sequence[tuple[str, float]]) -> Tensor:
    """Apply (operation, magnitude) pairs to one uint8 RGB image (3, H, W); factor = 1 + magnitude."""
    for name, value in ops:
        if name == "Brightness":
            image = TF.adjust_brightness(image, 1.0 + value)
        elif name == "Saturate":
            image = TF.adjust_saturation(image, 1.0 + value)
        elif name == "Contrast":
            image = TF.adjust_contrast(image, 1.0 + value)
        elif name == "Sharpness":
            image = TF.adjust_sharpness(image, 1.0 + value)
        elif name == "Equalize":
            image = TF.equalize(image)
        elif name == "Grayscale":
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        elif name != "Identity":
            raise ValueError(f"unknown photometric operation {name!r}; expected one of "
                             f"{list(PHOTOMETRIC_OPS)}")
    return image


def sample_blur(prob: float = 0.2, magnitude: float = 1.0,
                generator: torch.Generator | None = None) -> tuple:
    """The official blur draw: ``("skip",)``, ``("avg", k)``, ``("gaussian", sigma)`` or
    ``("resize", side_ratio, (down, up))`` (the resize is 8 times likelier than each other blur)."""
    if _uniform(generator) >= prob:
        return ("skip",)
    method = _randint(generator, 0, 10)  # official list: avg, gaussian, 8 × resize
    if method == 0:
        return ("avg", _randint(generator, 1, max(2, int(10 * magnitude))))
    if method == 1:
        return ("gaussian", _uniform(generator) * 4.0 * magnitude)
    ratio = _uniform(generator, 1.0 - 0.8 * magnitude, 1.0)
    down = RESIZE_INTERPOLATIONS[_randint(generator, 0, len(RESIZE_INTERPOLATIONS))]
    up = RESIZE_INTERPOLATIONS[_randint(generator, 0, len(RESIZE_INTERPOLATIONS))]
    return ("resize", ratio, (down, up))


def _gaussian_ksize(sigma: float) -> int:
    """imgaug's kernel size for a Gaussian blur of ``sigma`` (odd, at least 5)."""
    factor = 3.3 if sigma < 3.0 else 2.9 if sigma < 5.0 else 2.6
    size = int(max(factor * sigma, 5))
    return size + 1 if size % 2 == 0 else size


def apply_blur(image: Tensor, param: tuple) -> Tensor:
    """Apply a :func:`sample_blur` draw to one uint8 image (3, H, W) with OpenCV, as imgaug does."""
    kind = param[0]
    if kind == "skip" or (kind == "avg" and param[1] <= 1) or (kind == "gaussian"
                                                               and param[1] <= 1e-3):
        return image
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    h, w = hwc.shape[:2]
    if kind == "avg":
        out = cv2.blur(hwc, (param[1], param[1]))
    elif kind == "gaussian":
        k = _gaussian_ksize(param[1])
        out = cv2.GaussianBlur(hwc, (k, k), sigmaX=param[1], sigmaY=param[1],
                               borderType=cv2.BORDER_REFLECT_101)
    elif kind == "resize":
        side = max(1, int(param[1] * h))  # official: a square of side ratio · height
        small = cv2.resize(hwc, (side, side), interpolation=int(param[2][0]))
        out = cv2.resize(small, (w, h), interpolation=int(param[2][1]))
    else:
        raise ValueError(f"unknown blur {kind!r}; expected skip, avg, gaussian or resize")
    return torch.from_numpy(out.reshape(h, w, -1)).permute(2, 0, 1).contiguous().to(image.device)


def _crop_box(h: int, w: int, generator: torch.Generator | None, scale: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """A ``RandomResizedCrop`` box (top, left, height, width): torchvision's sampling rule."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return _randint(generator, 0, h - ch + 1), _randint(generator, 0, w - cw + 1), ch, cw
    # fallback: the central crop of the allowed aspect ratios
    if w / h < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def sample_cutout(h: int, w: int, prob: float = 0.2, generator: torch.Generator | None = None
                  ) -> tuple:
    """The official cutout draw: ``("skip",)``; 5 % of the time ``("holes", [(y, x, 16, 16), ...])``
    (albumentations CoarseDropout, 12–20 holes); otherwise ``("keep", (y, x, h, w))``, a
    RandomResizedCrop box (scale 0.2–1, ratio 3/4–4/3) kept in place with the rest zeroed."""
    if _uniform(generator) >= prob:
        return ("skip",)
    if _uniform(generator) < 0.05:
        holes = []
        for _ in range(_randint(generator, 12, 21)):
            hh, hw = min(16, h), min(16, w)
            holes.append((_randint(generator, 0, h - hh + 1), _randint(generator, 0, w - hw + 1),
                          hh, hw))
        return ("holes", holes)
    return ("keep", _crop_box(h, w, generator, (0.2, 1.0), (3 / 4, 4 / 3)))


def apply_cutout(image: Tensor, param: tuple) -> Tensor:
    """Apply a :func:`sample_cutout` draw to one image (C, H, W): zeroed holes, or only a box kept."""
    if param[0] == "skip":
        return image
    if param[0] == "holes":
        out = image.clone()
        for y, x, hh, hw in param[1]:
            out[:, y:y + hh, x:x + hw] = 0
        return out
    if param[0] == "keep":
        y, x, hh, hw = param[1]
        out = torch.zeros_like(image)
        out[:, y:y + hh, x:x + hw] = image[:, y:y + hh, x:x + hw]
        return out
    raise ValueError(f"unknown cutout {param[0]!r}; expected skip, holes or keep")


@dataclass
class AppearanceAugment:
    """Cutout, blur and photometric parts of ``gridsample_v1``, per image, after the geometry.

    Official values (CVLface ``data_augs/configs/gridsample_v1.yaml``) are the defaults. A
    probability of 0 (or ``photometric_num_ops=0``) switches that part off.

    Args:
        cutout_prob: probability of a cutout (:func:`sample_cutout`).
        blur_prob, blur_magnitude: probability and strength of a blur (:func:`sample_blur`).
        photometric_num_ops, photometric_magnitude, photometric_magnitude_offset,
        photometric_num_bins: the colour operations (:func:`sample_photometric`).
    """

    cutout_prob: float = 0.2
    blur_prob: float = 0.2
    blur_magnitude: float = 1.0
    photometric_num_ops: int = 2
    photometric_magnitude: int = 14
    photometric_magnitude_offset: int = 9
    photometric_num_bins: int = 31

    def __post_init__(self) -> None:
        for key in ("cutout_prob", "blur_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"data.{key}={getattr(self, key)!r}: expected a probability in "
                                "[0, 1]")
        if not 0.0 <= self.blur_magnitude <= 1.0:
            raise UserError(f"data.blur_magnitude={self.blur_magnitude!r}: expected 0 to 1 "
                            "(official 1.0)")
        if (self.photometric_num_ops < 0 or self.photometric_magnitude_offset < 1
                or self.photometric_num_bins < 1):
            raise UserError("data.photometric_num_ops >= 0, data.photometric_magnitude_offset >= 1 "
                            "and data.photometric_num_bins >= 1 expected, got "
                            f"{self.photometric_num_ops}, {self.photometric_magnitude_offset}, "
                            f"{self.photometric_num_bins}")

    @property
    def active(self) -> bool:
        return self.cutout_prob > 0 or self.blur_prob > 0 or self.photometric_num_ops > 0

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images (B, 3, H, W) uint8 RGB → (B, 3, H, W) uint8, each image drawn independently."""
        if images.dtype != torch.uint8:
            raise TypeError(f"appearance augmentation expects uint8 images, got {images.dtype}")
        _, _, h, w = images.shape
        out = []
        for image in images:
            # the official order: cutout, then blur, then photometric
            image = apply_cutout(image, sample_cutout(h, w, self.cutout_prob, generator))
            image = apply_blur(image, sample_blur(self.blur_prob, self.blur_magnitude, generator))
            ops = sample_photometric(self.photometric_num_ops, self.photometric_magnitude,
                                     self.photometric_magnitude_offset,
                                     self.photometric_num_bins, generator)
            out.append(apply_photometric(image, ops))
        return torch.stack(out) if out else images


class RepeatedAugmentSampler(Sampler[list[int]]):
    """Batches where, with probability ``prob``, a sample is replaced by another image of the
    previous sample's identity (official "RA10": ``repeated_augment_prob`` 0.1, batch size kept),
    except right after a replacement (official ``not self.repeated``).

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
        # official rule (CVLface RepeatedWithLdmkThetaMXDataset): draw for every sample after the
        # first; never repeat right after a repeat; the previous sample carries across batches
        previous, repeated = None, False
        for batch in self.base:
            batch = list(batch)
            for i in range(len(batch)):
                if previous is not None:
                    if rng.random() < self.prob and not repeated:
                        label = int(self.labels[previous])
                        j = self._start[label] + int(rng.integers(self._count[label]))
                        batch[i] = int(self._sorted[j])
                        repeated = True
                    else:
                        repeated = False
                previous = batch[i]
            yield batch
