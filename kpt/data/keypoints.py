"""Keypoint utilities shared by plugins: normalising, checking, affine transforms, flips, fallbacks.

Convention (DESIGN §3): keypoints are float (..., K, 2), (x, y), normalised to [0, 1] by the width and
height of the image the backbone sees.
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalize_keypoints(points_px: Tensor, width: int, height: int) -> Tensor:
    """Pixel coordinates (..., K, 2) -> normalised [0, 1] by ``width`` and ``height``."""
    scale = torch.tensor([width, height], dtype=points_px.dtype, device=points_px.device)
    return points_px / scale


def denormalize_keypoints(points: Tensor, width: int, height: int) -> Tensor:
    """Normalised (..., K, 2) -> pixel coordinates."""
    scale = torch.tensor([width, height], dtype=points.dtype, device=points.device)
    return points * scale


def check_keypoints(points: Tensor, num_keypoints: int | None = None, what: str = "keypoints",
                    tolerance: float = 0.05) -> None:
    """Raise ValueError unless ``points`` is a finite float (..., K, 2) tensor inside [0, 1].

    Args:
        points: (B, K, 2) or (B, T, K, 2).
        num_keypoints: expected K (None: any).
        what: name used in the message (a file, a keypoint source).
        tolerance: allowed overshoot outside [0, 1] (points near the border after augmentation).
    """
    if not isinstance(points, Tensor) or not points.is_floating_point():
        raise ValueError(f"{what}: expected a float tensor, got {type(points).__name__}"
                         f"{'' if not isinstance(points, Tensor) else ' of ' + str(points.dtype)}")
    if points.ndim < 2 or points.shape[-1] != 2:
        raise ValueError(f"{what}: expected shape (..., K, 2), got {tuple(points.shape)}")
    if num_keypoints is not None and points.shape[-2] != num_keypoints:
        raise ValueError(f"{what}: expected K={num_keypoints} keypoints, got {points.shape[-2]}")
    if not torch.isfinite(points).all():
        raise ValueError(f"{what}: contains NaN or inf (a source must return canonical points instead)")
    lo, hi = float(points.min()), float(points.max())
    if lo < -tolerance or hi > 1 + tolerance:
        raise ValueError(f"{what}: values in [{lo:.3f}, {hi:.3f}], expected normalised (x, y) in [0, 1]; "
                         f"pixel coordinates must be divided by the image width and height")


def affine_keypoints(points: Tensor, matrix: Tensor, src_size: tuple[int, int],
                     dst_size: tuple[int, int] | None = None) -> Tensor:
    """Map normalised keypoints through a pixel-space affine transform.

    Args:
        points: (B, K, 2) normalised to the source image.
        matrix: (B, 2, 3) or (2, 3) pixel affine (the one given to ``cv2.warpAffine`` /
            ``kornia.geometry.warp_affine``), mapping source pixels to destination pixels.
        src_size: (height, width) of the source image.
        dst_size: (height, width) of the destination image (default: same as the source).

    Returns:
        (B, K, 2) normalised to the destination image.
    """
    dst_size = dst_size or src_size
    pixels = denormalize_keypoints(points, src_size[1], src_size[0])
    matrix = matrix.to(points.dtype)
    if matrix.ndim == 2:
        matrix = matrix.expand(points.shape[0], 2, 3)
    mapped = torch.einsum("bij,bkj->bki", matrix[:, :, :2], pixels) + matrix[:, None, :, 2]
    return normalize_keypoints(mapped, dst_size[1], dst_size[0])


def hflip_keypoints(points: Tensor, flip_index: list[int] | None = None) -> Tensor:
    """Keypoints of the horizontally flipped image: x -> 1 - x, left/right points swapped.

    Args:
        points: (..., K, 2) normalised.
        flip_index: new order of the K points (e.g. [1, 0, 2, 4, 3] for 5 face landmarks); None keeps it.
    """
    flipped = points.clone()
    flipped[..., 0] = 1.0 - flipped[..., 0]
    if flip_index is not None:
        flipped = flipped[..., flip_index, :]
    return flipped


def fill_missing(points: Tensor, found: Tensor, canonical: Tensor) -> Tensor:
    """Replace the keypoints of samples where nothing was found by the domain's canonical points.

    Args:
        points: (B, K, 2), may hold garbage where ``found`` is False.
        found: (B,) bool.
        canonical: (K, 2) canonical normalised points.
    """
    canonical = canonical.to(points.dtype).to(points.device).expand_as(points)
    return torch.where(found.to(points.device)[:, None, None], points, canonical)
