"""Five-point face alignment to the ArcFace 112×112 template (insightface ``face_align.py``).

The similarity transform is Umeyama's least-squares estimate with scaling (what
``skimage.transform.SimilarityTransform.estimate`` computes), batched in torch so it runs on the
GPU and is differentiable. The warp is kornia's ``warp_affine``, which takes the same source→output
pixel matrix as ``cv2.warpAffine`` (bilinear, black border). The same matrix maps keypoints into
the aligned frame; its inverse maps them back, so keypoints can be given in either frame.

Conventions: pixel coordinates are (x, y) with pixel centres at integers (OpenCV); normalised
keypoints are pixel / (W, H) as in kpt (DESIGN §3), so the template normalised is template / 112.
Matrices are (B, 2, 3) float, ``[c·R | t]`` mapping source pixels to aligned pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from kpt.data.keypoints import affine_keypoints

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "align_faces",
    "arcface_template",
    "invert_affine",
    "keypoints_from_aligned",
    "keypoints_to_aligned",
    "transform_points",
    "umeyama_similarity",
    "warp_affine",
]

# insightface ``arcface_dst`` (x, y) pixels in a 112×112 crop; order: eye with smaller x, other
# eye, nose tip, mouth corner with smaller x, other mouth corner.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def arcface_template(size: int = 112) -> np.ndarray:
    """Template for a square crop of ``size`` px (``estimate_norm``'s rule).

    Multiples of 112 scale the template; multiples of 128 scale by size/128 and shift x by
    8·size/128 (the 112-wide template centred in 128).

    Returns:
        (5, 2) float64 pixel coordinates.
    """
    if size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (size / 112.0)
    if size % 128 == 0:
        t = ARCFACE_TEMPLATE_112 * (size / 128.0)
        t[:, 0] += 8.0 * size / 128.0
        return t
    raise ValueError(f"ArcFace template size must be a multiple of 112 or 128, got {size}")


def umeyama_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src → dst.

    Args:
        src: (B, K, 2) or (K, 2) source points.
        dst: (B, K, 2), (K, 2) target points (broadcast over the batch).

    Returns:
        (B, 2, 3) (or (2, 3) for unbatched input) matrices M with dst ≈ M[:, :2]·src + M[:, 2].
    """
    unbatched = src.ndim == 2
    src = src.unsqueeze(0) if unbatched else src
    dst = torch.as_tensor(dst, dtype=src.dtype, device=src.device)
    dst = dst.unsqueeze(0).expand(src.shape[0], -1, -1) if dst.ndim == 2 else dst
    mu_s, mu_d = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    a = d.transpose(1, 2) @ s / src.shape[1]  # (B, 2, 2) covariance DᵀS / N
    u, sigma, vh = torch.linalg.svd(a)
    sign = torch.ones_like(sigma)
    sign[:, 1] = torch.where(torch.linalg.det(a) < 0, -1.0, 1.0)
    # skimage also special-cases a rank-1 A (collinear points); five face points never are.
    rot = u @ torch.diag_embed(sign) @ vh
    var_s = s.pow(2).sum(dim=(1, 2)) / src.shape[1]  # population variance summed over x and y
    scale = (sigma * sign).sum(dim=1) / var_s.clamp_min(1e-12)
    lin = scale[:, None, None] * rot
    t = mu_d.transpose(1, 2) - lin @ mu_s.transpose(1, 2)  # (B, 2, 1)
    m = torch.cat([lin, t], dim=2)
    return m[0] if unbatched else m


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Inverse of (…, 2, 3) affine matrices (as ``cv2.invertAffineTransform``)."""
    lin_inv = torch.linalg.inv(m[..., :2])
    return torch.cat([lin_inv, -lin_inv @ m[..., 2:]], dim=-1)


def transform_points(points: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Apply (B, 2, 3) matrices to (B, K, 2) points → (B, K, 2) (unbatched (K, 2)/(2, 3) too)."""
    return points @ m[..., :2].transpose(-1, -2) + m[..., 2].unsqueeze(-2)


def warp_affine(images: torch.Tensor, m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Warp (B, C, H, W) float images by source→output pixel matrices (B, 2, 3).

    Same convention as ``cv2.warpAffine(img, M, (w, h))`` with bilinear sampling and a black
    border.

    Args:
        size: output (height, width).

    Returns:
        (B, C, height, width).
    """
    import kornia.geometry.transform as kgt

    return kgt.warp_affine(
        images,
        m.to(images.dtype),
        dsize=size,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )


def _pixel_scale(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([w, h], dtype=like.dtype, device=like.device)


def alignment_matrix(keypoints: torch.Tensor, image_hw: tuple[int, int], size: int = 112):
    """Similarity matrices mapping each image onto the ArcFace template of ``size``.

    Args:
        keypoints: (B, 5, 2) normalised (x, y) in the source image frame.
        image_hw: source (H, W) in pixels.

    Returns:
        (B, 2, 3) source-pixel → aligned-pixel matrices (float32 like ``keypoints``).
    """
    h, w = image_hw
    src = keypoints.double() * _pixel_scale(h, w, keypoints.double())
    dst = torch.as_tensor(arcface_template(size), dtype=torch.float64, device=keypoints.device)
    return umeyama_similarity(src, dst).to(keypoints.dtype)


def keypoints_to_aligned(
    keypoints: torch.Tensor, m: torch.Tensor, image_hw: tuple[int, int], size: int = 112
) -> torch.Tensor:
    """Normalised keypoints (B, K, 2) of the source frame → normalised in the aligned frame."""
    return affine_keypoints(keypoints, m, image_hw, (size, size))


def keypoints_from_aligned(
    keypoints: torch.Tensor, m: torch.Tensor, image_hw: tuple[int, int], size: int = 112
) -> torch.Tensor:
    """Normalised keypoints (B, K, 2) of the aligned frame → normalised in the source frame."""
    return affine_keypoints(keypoints, invert_affine(m.to(keypoints.dtype)), (size, size), image_hw)


def align_faces(
    images: torch.Tensor, keypoints: torch.Tensor, size: int = 112
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align faces to the ArcFace template.

    Args:
        images: (B, C, H, W) float images (any value range; the border is 0 in that range).
        keypoints: (B, 5, 2) normalised (x, y) in the frame of ``images``, template order.
        size: output side (multiple of 112 or 128).

    Returns:
        aligned (B, C, size, size), aligned keypoints (B, 5, 2) normalised by ``size``, and the
        (B, 2, 3) source-pixel → aligned-pixel matrices (use :func:`keypoints_from_aligned` to go
        back).
    """
    if keypoints.ndim != 3 or keypoints.shape[1:] != (5, 2):
        raise ValueError(f"align_faces needs keypoints (B, 5, 2), got {tuple(keypoints.shape)}")
    h, w = images.shape[-2:]
    m = alignment_matrix(keypoints.float(), (h, w), size)
    aligned = warp_affine(images.float(), m, (size, size))
    return aligned, keypoints_to_aligned(keypoints.float(), m, (h, w), size), m
