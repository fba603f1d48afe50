"""SwinGait-2D (reference gait.md 1.2) with optional KP-RPE in every windowed attention.

Per frame: conv stem (3x3 conv-BN-ReLU, one basic block, four basic blocks with stride 2),
bilinear resize (align_corners=True) to 2x the token grid, 2x2 patch embedding + LayerNorm,
two Swin stages on the 15x10 token grid with 3x5 windows (shift (1, 2) on odd blocks) joined by
a channel doubling (LayerNorm + Linear, no spatial merge), final LayerNorm. Then temporal max
pooling over the frames, horizontal pyramid pooling (15 strips: mean + max), part-wise FCs and a
part-wise BNNeck with cosine classifier (OpenGait SwinGait / DeepGaitV2 heads).

Position encoding (``pos``):

* ``"none"``: Swin's native learned window bias only -- the plain SwinGait-2D baseline.
* ``"kprpe"``: the native bias *and* KP-RPE in every block. Each stage holds one
  :class:`kpt.position.KeypointRPE` on its own 15x10 grid with its 3x5 windows; the 17 joints of a
  frame condition that frame's bias. KP-RPE's linear layer is zero-initialised, so at
  initialisation this model computes exactly the baseline (the face Swin *replaces* its bias
  table; keeping it here makes "+ KP-RPE" a strict extension of the baseline, as the paper's
  table reads).

Parameter count of the default (Gait3D) preset: 25,318,464 with ``pos="none"`` (13,030,464
without the 3000-way classifier), the figure reference gait.md 1.2 gives for the 2D variant built
from OpenGait's classes; 16 FC/BNNeck parts of which the 16th is a detached copy of strip 15 that
is dropped (OpenGait keeps it to load 16-bin DeepGaitV2 heads; ``parts=15`` drops it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.resnet import BasicBlock
from torch import Tensor, nn

from kpt.data.keypoints import check_keypoints
from kpt.models.swin import SwinStage

logger = logging.getLogger(__name__)


def _basic_block(cin: int, cout: int, stride: int) -> BasicBlock:
    """torchvision-style basic block; 1x1 conv + BN shortcut when the shape changes."""
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return BasicBlock(cin, cout, stride=stride, downsample=down)


class SeparateFCs(nn.Module):
    """One (in, out) matrix per part, no bias: (n, in, P) -> (n, out, P)."""

    def __init__(self, parts: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc_bin = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(parts, in_channels,
                                                                       out_channels)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("ncp,pco->nop", x, self.fc_bin)


class SeparateBNNeck(nn.Module):
    """BN over all parts' features, then cosine logits against per-part class weights.

    ``forward(x (n, C, P)) -> (bn_features (n, C, P) L2-normalised per part, logits (n, classes, P))``.
    """

    def __init__(self, parts: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc_bin = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(parts, in_channels,
                                                                       num_classes)))
        self.bn1d = nn.BatchNorm1d(in_channels * parts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, c, p = x.shape
        x = self.bn1d(x.reshape(n, c * p)).reshape(n, c, p)
        feature = F.normalize(x, dim=1)
        logits = torch.einsum("ncp,pck->nkp", feature, F.normalize(self.fc_bin, dim=1))
        return feature, logits


class SwinGait2D(nn.Module):
    """SwinGait-2D for silhouette sequences (+ KP-RPE).

    Args:
        pos: ``"none"`` (baseline) or ``"kprpe"``.
        channels: stem channels (stage 0/1 and stage 2) -- (64, 128).
        embed_dim: Swin stage-1 width (doubled for stage 2) -- 256.
        depths, num_heads: Swin blocks and heads per stage -- (4, 2), (16, 32).
        token_grid: per-frame token grid (h, w) -- (15, 10).
        window_size: (3, 5). shift_size: (1, 2).
        embedding_dim: part embedding width -- 256.
        num_classes: training identities (BNNeck classifier) -- 3000 for Gait3D.
        parts: FC/BNNeck parts, 16 (OpenGait, last one dropped) or 15.
        num_keypoints: joints (17). kprpe_variant, rpe_ratio: KP-RPE options.
        drop_path_rate: stochastic depth, linear over all Swin blocks -- 0.1.
    """

    def __init__(self, pos: str = "none", channels: Sequence[int] = (64, 128),
                 embed_dim: int = 256, depths: Sequence[int] = (4, 2),
                 num_heads: Sequence[int] = (16, 32), token_grid: Sequence[int] = (15, 10),
                 window_size: Sequence[int] = (3, 5), shift_size: Sequence[int] = (1, 2),
                 embedding_dim: int = 256, num_classes: int = 3000, parts: int = 16,
                 num_keypoints: int = 17, kprpe_variant: str = "rel_splithead_unshared",
                 rpe_ratio: float = 1.9, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        if pos not in ("none", "kprpe"):
            raise ValueError(f"SwinGait2D: pos must be 'none' or 'kprpe', got {pos!r}")
        if len(depths) != 2 or len(num_heads) != 2:
            raise ValueError("SwinGait2D: depths and num_heads need two stages")
        self.pos, self.num_keypoints = pos, num_keypoints
        self.token_grid = (int(token_grid[0]), int(token_grid[1]))
        self.num_bins = self.token_grid[0]
        if parts not in (self.num_bins, self.num_bins + 1):
            raise ValueError(f"SwinGait2D: parts must be {self.num_bins} or {self.num_bins + 1}")
        self.parts = parts
        c0, c1 = channels
        self.layer0 = nn.Sequential(nn.Conv2d(1, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0),
                                    nn.ReLU(inplace=True))
        self.layer1 = _basic_block(c0, c0, 1)
        self.layer2 = nn.Sequential(_basic_block(c0, c1, 2),
                                    *[_basic_block(c1, c1, 1) for _ in range(3)])
        self.patch_embed = nn.Conv2d(c1, embed_dim, 2, 2)
        self.patch_norm = nn.LayerNorm(embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        relative = "kprpe" if pos == "kprpe" else None
        dims = (embed_dim, 2 * embed_dim)
        self.stages = nn.ModuleList([
            SwinStage(dims[s], depths[s], num_heads[s], self.token_grid, tuple(window_size),
                      tuple(shift_size), relative=relative, native_bias=True,
                      num_keypoints=num_keypoints, kprpe_variant=kprpe_variant,
                      rpe_ratio=rpe_ratio, drop_path=rates[sum(depths[:s]):sum(depths[:s + 1])])
            for s in range(2)])
        # channel doubling between the stages, no spatial merge (OpenGait `layers.0.downsample`)
        self.expand = nn.Sequential(nn.LayerNorm(dims[0]), nn.Linear(dims[0], dims[1], bias=False))
        self.norm = nn.LayerNorm(dims[1])
        self.fcs = SeparateFCs(parts, dims[1], embedding_dim)
        self.bnneck = SeparateBNNeck(parts, embedding_dim, num_classes)
        self._init_parameters()

    def _init_parameters(self) -> None:
        """OpenGait's ``init_parameters``; KP-RPE tables keep their zero init."""
        for name, m in self.named_modules():
            if "kprpe" in name:
                continue
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @property
    def uses_keypoints(self) -> bool:
        return self.pos == "kprpe"

    def frame_features(self, frames: Tensor, keypoints: Tensor | None) -> Tensor:
        """Per-frame backbone.

        Args:
            frames: (B, H, W) silhouettes in [0, 1] (B = sequences x frames).
            keypoints: (B, 17, 2) joints in [0, 1] of the same frames, or None for the baseline.

        Returns:
            (B, h, w, 2 * embed_dim) token maps (h, w = token grid).
        """
        x = self.layer2(self.layer1(self.layer0(frames.unsqueeze(1))))
        gh, gw = self.token_grid
        x = F.interpolate(x, size=(2 * gh, 2 * gw), mode="bilinear", align_corners=True)
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))  # (B, h, w, C)
        x = self.stages[0](x, keypoints)
        x = self.stages[1](self.expand(x), keypoints)
        return self.norm(x)

    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> dict[str, Tensor]:
        """
        Args:
            images: (n, T, H, W) silhouettes in [0, 1] (e.g. 30 x 64 x 44).
            keypoints: (n, T, 17, 2) joints (x, y) in [0, 1]; required when ``pos="kprpe"``.

        Returns:
            ``embeddings`` (n, E, 15): part embeddings before the BNNeck (``embed_1``; used by the
            triplet loss and for retrieval); ``bn_embeddings`` (n, E, 15); ``logits``
            (n, num_classes, 15) cosine logits.
        """
        if images.ndim != 4:
            raise ValueError(f"SwinGait2D expects images (n, T, H, W), got {tuple(images.shape)}")
        n, t = images.shape[:2]
        kp = None
        if self.uses_keypoints:
            # the one check of this forward; the Swin stages and KP-RPE trust it
            check_keypoints(keypoints, self.num_keypoints, batch_size=n, frames=t, sequence=True,
                            what="SwinGait2D(pos='kprpe')", tolerance=None)
            kp = keypoints.reshape(n * t, self.num_keypoints, 2).to(images.dtype)
        x = self.frame_features(images.reshape(n * t, *images.shape[2:]), kp)
        x = rearrange(x, "(n t) h w c -> n t c h w", n=n).amax(1)  # temporal max pooling
        x = x.flatten(3)  # (n, C, h, w): horizontal pyramid pooling, one strip per token row
        feat = x.mean(-1) + x.amax(-1)  # (n, C, bins)
        if self.parts > self.num_bins:  # OpenGait's detached 16th part
            feat = torch.cat([feat, feat[..., -1:].detach()], -1)
        embed = self.fcs(feat)
        bn_embed, logits = self.bnneck(embed)
        k = self.num_bins
        return {"embeddings": embed[..., :k], "bn_embeddings": bn_embed[..., :k],
                "logits": logits[..., :k]}


def param_groups(model: SwinGait2D, lr: float, weight_decay: float,
                 stem_head_lr_mult: float = 0.1) -> list[dict]:
    """OpenGait's SwinGait parameter groups (``SwinGait.get_optimizer``).

    Transformer parameters (patch embedding, stages, channel doubling, final norm) at ``lr``;
    those named like patch_embed/norm/bias tables without weight decay (the channel doubling's
    LayerNorm is decayed, as OpenGait's ``downsample.0``); stem, FCs and BNNeck at 0.1 x lr.

    Returns:
        torch optimizer parameter groups (each with ``lr`` and ``weight_decay``).
    """
    transformer_no_decay = ("patch_embed", "patch_norm", "norm", "window_bias")
    slow_prefixes = ("layer0.", "layer1.", "layer2.", "fcs.", "bnneck.")
    groups = {"no_decay": [], "decay": [], "slow": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(slow_prefixes):
            groups["slow"].append(param)
        elif any(key in name for key in transformer_no_decay):
            groups["no_decay"].append(param)
        else:
            groups["decay"].append(param)
    return [
        {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0, "name": "transformer_nd"},
        {"params": groups["decay"], "lr": lr, "weight_decay": weight_decay, "name": "transformer"},
        {"params": groups["slow"], "lr": lr * stem_head_lr_mult, "weight_decay": weight_decay,
         "name": "stem_head"},
    ]
