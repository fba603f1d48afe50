"""The shallow digit ViT of the MNIST → affNIST study, built on ``kpt.create_model("vit")``.

``model.pos`` picks the position encoding; every variant is the same backbone otherwise:

========== ====================================================================================
pos         what the backbone gets
========== ====================================================================================
none        no position information
abs         learned absolute embedding (the paper's Abs-PE)
abs_drawn   absolute embedding + the 5 keypoints drawn as input channels (the paper's Abs-PE*)
drawn       keypoint channels, no position embedding
rpe         learned bias per layer, head and product bucket, no absolute embedding
irpe        contextual iRPE on keys, no absolute embedding
kprpe       KP-RPE alone (default): the bias follows the keypoints
abs+kprpe   the official face combination (absolute embedding kept, KP-RPE added)
========== ====================================================================================

``model.stem: conv`` replaces the linear patch projection by a 3×3 convolution (+BN, GELU) followed by
the p×p patchify convolution. The grid of tokens is unchanged (40/p per side), so KP-RPE's patch
centres are the same; the small receptive field overlap makes a token's content depend less on where
the patch boundary cuts a stroke, which a translated test digit changes.
"""

from __future__ import annotations

import torch
from kpt_plugins.mnist.drawn import KeypointChannels
from kpt_plugins.mnist.keypoints import NUM_KEYPOINTS
from torch import nn

import kpt

#: mnist ``pos`` → (kpt ViT ``pos``, draw keypoint channels).
POS_VARIANTS: dict[str, tuple[str, bool]] = {
    "none": ("none", False),
    "abs": ("abs", False),
    "abs_drawn": ("abs", True),
    "drawn": ("none", True),
    "rpe": ("rpe", False),
    "irpe": ("irpe", False),
    "kprpe": ("kprpe", False),
    "abs+kprpe": ("abs+kprpe", False),
    "abs+rpe": ("abs+rpe", False),
    "drawn+kprpe": ("kprpe", True),
}
IMG_SIZE = 40


class ConvStem(nn.Sequential):
    """3×3 conv (stride 1, zero padding = background) + BN + GELU, then p×p/p patchify conv.

    (B, C, 40, 40) → (B, D, 40/p, 40/p), a drop-in for timm ``PatchEmbed.proj``. Runs channels-last:
    oneDNN's convolution backward on these few channels is 0.91x the time per train step of the
    whole model (measured interleaved, batch 64, 2 threads); the values are the same.
    """

    def __init__(self, in_chans: int, channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_chans, channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.Conv2d(channels, embed_dim, patch_size, stride=patch_size),
        )
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def build_digit_vit(pos: str = "kprpe", patch_size: int = 5, embed_dim: int = 64, depth: int = 4,
                    num_heads: int = 4, mlp_ratio: float = 2.0, stem: str = "conv",
                    stem_channels: int = 16, drawn_sigma: float = 4.0, drop_path_rate: float = 0.0,
                    kprpe_variant: str = "rel_splithead_unshared", num_classes: int = 10,
                    in_chans: int = 1) -> nn.Module:
    """The study's ViT: ``model(images (B, 1, 40, 40), keypoints (B, 5, 2)) -> logits (B, 10)``.

    Args:
        pos: one of :data:`POS_VARIANTS`.
        patch_size: patch side p (40 must be divisible by p): 4 → 10×10 tokens, 5 → 8×8.
        embed_dim, depth, num_heads, mlp_ratio: ViT width, blocks, heads, MLP ratio.
        stem: ``"patch"`` (linear patch embedding) or ``"conv"`` (see module docstring).
        stem_channels: width of the 3×3 convolution of the conv stem.
        drawn_sigma: heat-map σ in pixels for the drawn-keypoint variants.
        drop_path_rate: stochastic depth.
        kprpe_variant: KP-RPE table layout (official: ``rel_splithead_unshared``).
        num_classes: classes (10 digits).
        in_chans: image channels.
    """
    if pos not in POS_VARIANTS:
        raise ValueError(f"model.pos={pos!r}: expected one of {', '.join(POS_VARIANTS)}")
    if IMG_SIZE % patch_size:
        raise ValueError(f"model.patch_size={patch_size}: must divide the image size {IMG_SIZE}")
    if stem not in ("patch", "conv"):
        raise ValueError(f"model.stem={stem!r}: expected 'patch' or 'conv'")
    vit_pos, drawn = POS_VARIANTS[pos]
    chans = in_chans + (NUM_KEYPOINTS if drawn else 0)
    backbone = kpt.create_model(
        "vit", img_size=IMG_SIZE, patch_size=patch_size, in_chans=chans, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
        pos=vit_pos, head="avg", kprpe_variant=kprpe_variant, num_keypoints=NUM_KEYPOINTS,
        drop_path_rate=drop_path_rate)
    if stem == "conv":
        backbone.patch_embed.proj = ConvStem(chans, stem_channels, embed_dim, patch_size)
    if drawn:
        return KeypointChannels(backbone, drawn_sigma, pass_keypoints="kprpe" in vit_pos)
    return backbone
