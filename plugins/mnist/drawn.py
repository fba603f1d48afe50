"""Keypoints drawn onto the input as extra channels (the paper's Abs-PE* baseline and ``drawn``).

Each keypoint becomes one Gaussian heat map, exp(−‖p − k‖² / 2σ²) over the pixel centres, appended to
the image channels before the patch embedding. With an absolute embedding this is the paper's Abs-PE*
(Fig. 1); without any position embedding (``drawn``) the patch tokens still learn where they lie
relative to the keypoints, which makes it a strong baseline on MNIST → affNIST.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def draw_keypoints(keypoints: Tensor, height: int, width: int, sigma: float = 4.0) -> Tensor:
    """Gaussian heat maps of keypoints.

    Args:
        keypoints: (B, K, 2) (x, y) in [0, 1].
        height, width: output size in pixels.
        sigma: Gaussian standard deviation in pixels.

    Returns:
        (B, K, H, W) in [0, 1], 1 at each keypoint, same dtype/device as ``keypoints``.
    """
    if keypoints.dim() != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"draw_keypoints: keypoints must be (B, K, 2), got {tuple(keypoints.shape)}")
    ys = (torch.arange(height, device=keypoints.device, dtype=keypoints.dtype) + 0.5)
    xs = (torch.arange(width, device=keypoints.device, dtype=keypoints.dtype) + 0.5)
    px = keypoints[..., 0, None, None] * width    # (B, K, 1, 1)
    py = keypoints[..., 1, None, None] * height
    d2 = (xs[None, None, None, :] - px) ** 2 + (ys[None, None, :, None] - py) ** 2
    return torch.exp(-d2 / (2.0 * sigma * sigma))


class KeypointChannels(nn.Module):
    """Wrap a backbone so it sees ``cat(images, heat maps)``.

    Args:
        backbone: called as ``backbone(images (B, C+K, H, W), keypoints or None)``.
        sigma: heat-map width in pixels.
        pass_keypoints: also hand the keypoints to the backbone (for a backbone whose ``pos`` uses
            them, e.g. drawn channels plus KP-RPE); False hands it None.
    """

    def __init__(self, backbone: nn.Module, sigma: float = 4.0, pass_keypoints: bool = False):
        super().__init__()
        self.backbone = backbone
        self.sigma = float(sigma)
        self.pass_keypoints = pass_keypoints

    @property
    def uses_keypoints(self) -> bool:
        """The heat maps need keypoints."""
        return True

    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """images (B, C, H, W), keypoints (B, K, 2) → the backbone's output."""
        if keypoints is None:
            raise ValueError("KeypointChannels: the drawn-keypoint model needs keypoints (B, K, 2)")
        h, w = images.shape[-2:]
        maps = draw_keypoints(keypoints.to(images.dtype), h, w, self.sigma)
        x = torch.cat([images, maps], dim=1)
        return self.backbone(x, keypoints if self.pass_keypoints else None)
