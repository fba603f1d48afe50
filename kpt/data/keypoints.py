"""Keypoint utilities shared by plugins: normalising, checking, affine transforms, flips, fallbacks.

Convention (DESIGN §3): keypoints are float (..., K, 2), (x, y), normalised to [0, 1] by the width and
height of the image the backbone sees.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _tracing() -> bool:
    """True while exporting, tracing or compiling: a data-dependent check cannot run there."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _expected_shape(sequence: bool | None, batch_size: int | None, frames: int | None,
                    num_keypoints: int | None) -> str:
    b = "B" if batch_size is None else f"B={batch_size}"
    t = "T" if frames is None else f"T={frames}"
    k = "K" if num_keypoints is None else f"K={num_keypoints}"
    single, clips = f"({b}, {k}, 2)", f"({b}, {t}, {k}, 2)"
    if sequence is None:
        return f"{single} or {clips}"
    return clips if sequence else single


def check_keypoints(keypoints: Tensor | None, num_keypoints: int | None = None, *,
                    batch_size: int | None = None, frames: int | None = None,
                    sequence: bool | None = None, what: str = "keypoints",
                    tolerance: float | None = 0.05) -> Tensor:
    """The one keypoint check: type, shape, K, batch, finite (and range), with one host sync.

    Backbones call it once at the top of ``forward`` (with ``tolerance=None``); the position
    modules they feed trust them. Data-side checks (``kpt plugins check``) keep the range check.
    The value checks read the tensor back from the device once; they are skipped while tracing,
    exporting or compiling, where a data-dependent branch cannot run.

    Args:
        keypoints: (B, K, 2) or, for clips, (B, T, K, 2) float, (x, y) normalised to [0, 1] by
            the width and height of the image the backbone sees.
        num_keypoints: expected K (None: any).
        batch_size: expected B, that of the images the points belong to (None: any).
        frames: expected T of clips (None: any).
        sequence: False accepts only (B, K, 2), True only (B, T, K, 2), None either.
        what: who is checking or what is checked, for the message (a model, a batch key, a file).
        tolerance: allowed overshoot outside [0, 1] (points near the border after augmentation);
            None skips the range check (a backbone accepts points off the image).

    Returns:
        ``keypoints``, unchanged.

    Raises:
        ValueError: missing keypoints, wrong shape, K, batch or dtype, NaN/inf, or out of range.
        TypeError: ``keypoints`` is not a tensor.
    """
    expected = (f"a float tensor {_expected_shape(sequence, batch_size, frames, num_keypoints)} "
                "of (x, y) in [0, 1]")
    if keypoints is None:
        raise ValueError(f"{what} uses keypoints (KP-RPE) but was called without them: call "
                         f"model(images, keypoints) with keypoints {expected}")
    if not isinstance(keypoints, Tensor):
        raise TypeError(f"{what}: keypoints must be {expected}, got {type(keypoints).__name__}")
    ndims = {None: (3, 4), False: (3,), True: (4,)}[sequence]
    if keypoints.ndim not in ndims or keypoints.shape[-1] != 2:
        raise ValueError(f"{what}: keypoints must be {expected}, got shape {tuple(keypoints.shape)}")
    if num_keypoints is not None and keypoints.shape[-2] != num_keypoints:
        raise ValueError(f"{what}: expected K={num_keypoints} keypoints (num_keypoints="
                         f"{num_keypoints}), got {keypoints.shape[-2]} (shape "
                         f"{tuple(keypoints.shape)})")
    if batch_size is not None and keypoints.shape[0] != batch_size:
        raise ValueError(f"{what}: keypoints batch {keypoints.shape[0]} does not match the images "
                         f"batch {batch_size}")
    if frames is not None and keypoints.shape[1] != frames:
        raise ValueError(f"{what}: keypoints have {keypoints.shape[1]} frames, the images {frames}")
    if not keypoints.is_floating_point():
        raise ValueError(f"{what}: keypoints must be {expected}, got dtype {keypoints.dtype}")
    if _tracing() or keypoints.numel() == 0:
        return keypoints
    points = keypoints.detach()
    if tolerance is None:
        finite = bool(torch.isfinite(points).all())  # the one host sync
    else:
        # finite flag, min and max come back together: still one sync
        stats = torch.stack([torch.isfinite(points).all().to(points.dtype), points.min(),
                             points.max()]).tolist()
        finite, (lo, hi) = bool(stats[0]), stats[1:]
    if not finite:
        # the error path may sync again to name the samples
        bad = (~torch.isfinite(points)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{what}: keypoints contain NaN or inf (samples {bad[:8]}); a keypoint "
                         "source must return finite points (the domain's canonical points where "
                         "it finds none)")
    if tolerance is not None and (lo < -tolerance or hi > 1 + tolerance):
        raise ValueError(f"{what}: values in [{lo:.3f}, {hi:.3f}], expected normalised (x, y) in "
                         "[0, 1]; pixel coordinates must be divided by the image width and height")
    return keypoints


def affine_keypoints(points: Tensor, matrix: Tensor, src_size: tuple[int, int],
                     dst_size: tuple[int, int] | None = None) -> Tensor:
    """Map normalised keypoints through a pixel-space affine transform.

    Args:
        points: (B, K, 2) (or (K, 2), or any (..., K, 2)) normalised to the source image.
        matrix: (B, 2, 3) or (2, 3) pixel affine (the one given to ``cv2.warpAffine`` /
            ``kornia.geometry.warp_affine``), mapping source pixels to destination pixels;
            broadcast against the leading dimensions of ``points``.
        src_size: (height, width) of the source image.
        dst_size: (height, width) of the destination image (default: same as the source).

    Returns:
        (..., K, 2) normalised to the destination image, in the dtype of ``points``.
    """
    dst_size = dst_size or src_size
    pixels = denormalize_keypoints(points, src_size[1], src_size[0])
    matrix = matrix.to(points.dtype)
    mapped = pixels @ matrix[..., :2].transpose(-1, -2) + matrix[..., 2].unsqueeze(-2)
    return normalize_keypoints(mapped, dst_size[1], dst_size[0])


def hflip_keypoints(points: Tensor, flip_index: Sequence[int] | None = None) -> Tensor:
    """Keypoints of the horizontally mirrored image: x -> 1 - x, left/right points swapped.

    With pixel centres at integers the exact mirror of pixel x is W - 1 - x; ``1 - x`` differs by
    1/W (below any detector's precision) and keeps the flip independent of the image size.

    Args:
        points: (..., K, 2) normalised.
        flip_index: new order of the K points (e.g. (1, 0, 2, 4, 3) for 5 face landmarks: eyes
            and mouth corners swap); None keeps it.

    Returns:
        (..., K, 2), a new tensor.
    """
    flipped = points.clone()
    flipped[..., 0] = 1.0 - flipped[..., 0]
    if flip_index is not None:
        # a list, not a tuple: a tuple would index several dimensions
        flipped = flipped[..., list(flip_index), :]
    return flipped


def fill_missing(points: Tensor, found: Tensor, canonical: Tensor) -> Tensor:
    """Replace the keypoints of samples where nothing was found by the domain's canonical points.

    Args:
        points: (B, K, 2), may hold garbage where ``found`` is False.
        found: (B,) bool.
        canonical: (K, 2) canonical normalised points (or (B, K, 2), one set per sample).

    Returns:
        (B, K, 2): ``points`` where found, ``canonical`` elsewhere.
    """
    canonical = canonical.to(points.dtype).to(points.device).expand_as(points)
    return torch.where(found.to(points.device)[:, None, None], points, canonical)
