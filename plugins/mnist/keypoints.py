"""Digit keypoints: the four corners and the centre of the tight foreground box.

The same rule runs on every image (training digits, MNIST test, transformed test digits), so a
translated or scaled test digit gets the box of the transformed digit: the keypoints move with it.

Order (K = 5): top-left, top-right, bottom-left, bottom-right, centre. Coordinates are (x, y) in
[0, 1], normalised by the width and height of the image the backbone sees (DESIGN §3); box edges are
pixel edges, so a digit that fills columns 6..33 of a 40-pixel image spans x ∈ [6/40, 34/40].
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_KEYPOINTS = 5
KEYPOINT_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
#: Foreground threshold as a fraction of the maximum intensity (ink vs. resampling haze).
DEFAULT_THRESHOLD = 0.1


def _as_float_images(images: Tensor) -> Tensor:
    """(B, H, W) or (B, 1, H, W), uint8 or float in [0, 1] → float (B, H, W) in [0, 1]."""
    if images.dim() == 4:
        if images.shape[1] != 1:
            raise ValueError(f"box_keypoints: expected one channel, got images of shape "
                             f"{tuple(images.shape)}")
        images = images[:, 0]
    if images.dim() != 3:
        raise ValueError(f"box_keypoints: expected (B, H, W) or (B, 1, H, W), got "
                         f"{tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def tight_boxes(images: Tensor, threshold: float = DEFAULT_THRESHOLD) -> tuple[Tensor, Tensor]:
    """Tight foreground boxes in pixels.

    Args:
        images: (B, H, W) or (B, 1, H, W), uint8 or float in [0, 1].
        threshold: a pixel is foreground when its intensity exceeds this (fraction of full scale).

    Returns:
        boxes (B, 4) float ``(x0, y0, x1, y1)`` with exclusive pixel-edge ends, and found (B,) bool
        (False for blank images, whose box is the whole frame).
    """
    x = _as_float_images(images)
    b, h, w = x.shape
    mask = x > threshold
    cols, rows = mask.any(dim=1), mask.any(dim=2)  # (B, W), (B, H)
    found = cols.any(dim=1)
    col_idx = torch.arange(w, device=x.device, dtype=torch.float32).expand(b, w)
    row_idx = torch.arange(h, device=x.device, dtype=torch.float32).expand(b, h)
    big = float(max(h, w) + 1)
    x0 = torch.where(cols, col_idx, big).amin(dim=1)
    x1 = torch.where(cols, col_idx, -1.0).amax(dim=1) + 1
    y0 = torch.where(rows, row_idx, big).amin(dim=1)
    y1 = torch.where(rows, row_idx, -1.0).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    frame = torch.tensor([0.0, 0.0, float(w), float(h)], device=x.device)
    boxes = torch.where(found[:, None], boxes, frame)
    return boxes, found


def box_to_keypoints(boxes: Tensor, width: int, height: int) -> Tensor:
    """boxes (B, 4) pixels ``(x0, y0, x1, y1)`` → keypoints (B, 5, 2) normalised (x, y)."""
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    pts = torch.stack([
        torch.stack([x0, y0], 1), torch.stack([x1, y0], 1),
        torch.stack([x0, y1], 1), torch.stack([x1, y1], 1),
        torch.stack([cx, cy], 1),
    ], dim=1)
    scale = torch.tensor([float(width), float(height)], device=boxes.device)
    return (pts / scale).clamp(0.0, 1.0)


def box_keypoints(images: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """Keypoints of the tight foreground box of each image.

    Args:
        images: (B, H, W) or (B, 1, H, W), uint8 or float in [0, 1].
        threshold: foreground threshold (fraction of full scale).

    Returns:
        (B, 5, 2) float (x, y) in [0, 1]; a blank image gets the corners and centre of the frame.
    """
    boxes, _ = tight_boxes(images, threshold)
    h, w = images.shape[-2:]
    return box_to_keypoints(boxes, w, h)


def box_keypoints_batched(images: Tensor, threshold: float = DEFAULT_THRESHOLD,
                          chunk: int = 8192) -> Tensor:
    """:func:`box_keypoints` over a large stack in chunks (bounded memory); (N, 5, 2)."""
    return torch.cat([box_keypoints(images[i:i + chunk], threshold)
                      for i in range(0, len(images), chunk)]) if len(images) else \
        torch.zeros(0, NUM_KEYPOINTS, 2)


class BoxKeypoints:
    """Keypoint source ``box`` (``kpt.create("keypoints", "box")``-style callable).

    ``__call__(images (B, 1, H, W) | (B, H, W)) -> (keypoints (B, 5, 2) in [0, 1], found (B,) bool)``;
    where no ink is found, the frame's corners and centre are returned and ``found`` is False.
    """

    num_keypoints = NUM_KEYPOINTS
    names = KEYPOINT_NAMES

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        boxes, found = tight_boxes(images, self.threshold)
        h, w = images.shape[-2:]
        return box_to_keypoints(boxes, w, h), found
