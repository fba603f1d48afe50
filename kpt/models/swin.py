"""Swin Transformer (V1 and V2 style) with per-stage position encodings, KP-RPE included.

``SwinTransformer(images (B, C, H, W), keypoints (B, K, 2) | None) -> Tensor``.

Reusable parts (the gait plugin builds SwinGait-2D from them):

* :class:`SwinBlock`: one (shifted-)window block on a (B, H, W, C) map. ``style="v1"`` is pre-norm
  with scaled dot-product attention (Swin-V1, SwinGait); ``style="v2"`` is res-post-norm with cosine
  attention (Swin-V2, the official Swin-KPRPE face model). An optional external bias
  (B·nW | 1, H, w², w²) — e.g. one KP-RPE bias — is added to the logits.
* :class:`SwinStage`: ``depth`` blocks on one (h, w) grid, alternating unshifted / shifted windows,
  owning that stage's relative position encoding: the native Swin bias table, plain RPE, iRPE, or
  :class:`~kpt.position.KeypointRPE` computed on the stage's own grid (rectangular maps allowed,
  padding to window multiples). ``stage(x (B, h, w, C), keypoints) -> (B, h, w, C)``.
* :class:`PatchMerging`: 2×2 neighbour concat (zero-padding odd sizes) → Linear(4C → 2C).

Windows follow :mod:`kpt.layers` (``pad_to_windows``, roll by −shift, row-major windows, batch-major
stacking); the KP-RPE windowed biases use the same helpers, so bias and attention windows line up.
Shifts are disabled per axis where one window covers the padded map (``effective_shift``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import get_relative_position_index
from torch import Tensor, nn

from kpt.data.keypoints import check_keypoints
from kpt.layers import WindowAttention
from kpt.layers.windows import (
    effective_shift,
    padded_size,
    roll_to_windows,
    shifted_window_mask,
    window_reverse,
)
from kpt.models.common import (
    FlattenBNHead,
    init_linear_layernorm,
    stochastic_depth,
)
from kpt.position import (
    AbsolutePositionEmbedding,
    ContextualRPE,
    KeypointRPE,
    RelativePositionBias,
    parse_pos,
)

logger = logging.getLogger(__name__)

_POSITION_MODULES = (KeypointRPE, RelativePositionBias, ContextualRPE, AbsolutePositionEmbedding)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


class SwinWindowBias(nn.Module):
    """Swin's native learned relative position bias for one window (Liu et al. 2021).

    A table ((2·wh − 1)(2·ww − 1), H), trunc-normal(0.02) init, indexed by the in-window offset.
    ``forward() -> (1, H, wh·ww, wh·ww)``.
    """

    def __init__(self, num_heads: int, window_size: int | Sequence[int]):
        super().__init__()
        wh, ww = _pair(window_size)
        self.table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        trunc_normal_(self.table, std=0.02)
        self.register_buffer("index", get_relative_position_index(wh, ww), persistent=False)

    def forward(self) -> Tensor:
        """→ (1, H, n, n) with n = wh·ww."""
        return self.table[self.index].permute(2, 0, 1).unsqueeze(0)


class SwinBlock(nn.Module):
    """One Swin block on a (B, H, W, C) map with (optionally shifted) window attention.

    Args:
        dim: channels C. num_heads: attention heads.
        window_size: window (wh, ww) or int. shift_size: nominal shift (sh, sw) or int (0 = W-MSA);
            disabled per axis where the window covers the padded map.
        mlp_ratio: MLP hidden width / C (GELU MLP, timm ``Mlp``: ``fc1``, ``fc2``).
        qkv_bias: bias on qkv (V2: the key part is not used, as official).
        style: ``"v1"`` (pre-norm, scaled dot product) or ``"v2"`` (res-post-norm, cosine).
        native_bias: add Swin's learned window bias table (:class:`SwinWindowBias`).
        rel_bias: optional plain RPE module (``forward() -> (1, H, n, n)``).
        rpe: optional iRPE module given to the attention (query-dependent bias).
        drop: MLP dropout. drop_path: stochastic depth rate.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | Sequence[int],
        shift_size: int | Sequence[int] = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        style: str = "v1",
        native_bias: bool = True,
        rel_bias: nn.Module | None = None,
        rpe: nn.Module | None = None,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if style not in ("v1", "v2"):
            raise ValueError(f"SwinBlock: style must be 'v1' or 'v2'; got {style!r}.")
        self.style = style
        self.num_heads = num_heads
        self.window_size = _pair(window_size)
        self.shift_size = _pair(shift_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, num_heads, self.window_size, qkv_bias=qkv_bias, cosine=style == "v2", rpe=rpe
        )
        self.window_bias = SwinWindowBias(num_heads, self.window_size) if native_bias else None
        self.rel_bias = rel_bias
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def shift_for(self, height: int, width: int) -> tuple[int, int]:
        """The shift actually used on an (height, width) map (after padding to windows)."""
        hp, wp = padded_size(height, width, self.window_size)
        return tuple(effective_shift(hp, wp, self.window_size, self.shift_size))

    def _window_attention(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x (B, H, W, C) → attention output (B, H, W, C): pad, roll, partition, attend, undo."""
        _, height, width, _ = x.shape
        hp, wp = padded_size(height, width, self.window_size)
        windows, shift = roll_to_windows(x, self.window_size, self.shift_size)
        for extra in (self.window_bias, self.rel_bias):
            if extra is not None:
                bias = extra() if bias is None else bias + extra()
        if bias is not None:
            bias = bias.to(windows.dtype) if not torch.is_autocast_enabled() else bias
        # None when no shift remains; cached per size by kpt.layers.windows
        mask = shifted_window_mask(
            hp, wp, self.window_size, shift, device=windows.device, dtype=windows.dtype
        )
        out = self.attn(windows, bias, mask)
        x = window_reverse(out, self.window_size, hp, wp)
        if shift != (0, 0):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width, :]

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (B, H, W, C), bias (B·nW | 1, heads, n, n) | None → (B, H, W, C)."""
        if self.style == "v1":
            x = x + self.drop_path(self._window_attention(self.norm1(x), bias))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.norm1(self._window_attention(x, bias)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class SwinStage(nn.Module):
    """``depth`` Swin blocks on one (h, w) grid, with that grid's relative position encoding.

    Blocks alternate shift 0 and ``shift_size`` (default: half the window). The stage owns:
    ``kprpe`` (one :class:`KeypointRPE` for all its blocks, on this grid with these windows),
    per-block ``blocks.{i}.rel_bias`` (plain RPE), ``blocks.{i}.attn.rpe`` (iRPE), and
    ``blocks.{i}.window_bias`` (Swin's native table).

    Args:
        dim: channels C. depth: blocks. num_heads: heads of every block.
        grid_size: (h, w) of the maps this stage receives (fixed: biases are built for it).
        window_size: (wh, ww) or int. shift_size: shift of odd blocks, default window // 2.
        relative: ``None``, ``"rpe"``, ``"irpe"`` or ``"kprpe"``.
        native_bias: Swin's learned window table; default: only when ``relative`` is None.
        num_keypoints, kprpe_variant, rpe_ratio, keypoint_grad: KP-RPE / bucket options.
        mlp_ratio, qkv_bias, style, drop: see :class:`SwinBlock`.
        drop_path: one rate or a list of ``depth`` rates.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        grid_size: int | Sequence[int],
        window_size: int | Sequence[int] = 7,
        shift_size: int | Sequence[int] | None = None,
        relative: str | None = None,
        native_bias: bool | None = None,
        num_keypoints: int = 5,
        kprpe_variant: str = "rel_splithead_unshared",
        rpe_ratio: float = 1.9,
        keypoint_grad: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        style: str = "v1",
        drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
    ):
        super().__init__()
        if relative not in (None, "rpe", "irpe", "kprpe"):
            raise ValueError(f"SwinStage: unknown relative encoding {relative!r}.")
        self.grid_size = _pair(grid_size)
        self.window_size = _pair(window_size)
        half = (self.window_size[0] // 2, self.window_size[1] // 2)
        shift = half if shift_size is None else _pair(shift_size)
        native_bias = relative is None if native_bias is None else native_bias
        rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        self.relative = relative
        self.num_keypoints = num_keypoints
        head_dim = dim // num_heads
        blocks = []
        for i in range(depth):
            rel_bias = (
                RelativePositionBias(
                    num_heads, self.grid_size, ratio=rpe_ratio, window_size=self.window_size
                )
                if relative == "rpe"
                else None
            )
            rpe = (
                ContextualRPE(
                    num_heads,
                    head_dim,
                    self.grid_size,
                    ratio=rpe_ratio,
                    window_size=self.window_size,
                )
                if relative == "irpe"
                else None
            )
            blocks.append(
                SwinBlock(
                    dim,
                    num_heads,
                    self.window_size,
                    (0, 0) if i % 2 == 0 else shift,
                    mlp_ratio,
                    qkv_bias,
                    style,
                    native_bias,
                    rel_bias,
                    rpe,
                    drop,
                    rates[i],
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.kprpe = None
        if relative == "kprpe":
            self.kprpe = KeypointRPE(
                num_keypoints,
                num_heads,
                depth,
                self.grid_size,
                window_size=self.window_size,
                shift_sizes=[b.shift_for(*self.grid_size) for b in self.blocks],
                ratio=rpe_ratio,
                variant=kprpe_variant,
                keypoint_grad=keypoint_grad,
            )

    def forward(self, x: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """x (B, h, w, C), keypoints (B, K, 2) in [0, 1] | None → (B, h, w, C)."""
        if tuple(x.shape[1:3]) != self.grid_size:
            raise ValueError(
                f"SwinStage built for a {self.grid_size} grid got a map of {tuple(x.shape[1:3])}."
            )
        if self.kprpe is None:
            for block in self.blocks:
                x = block(x)
            return x
        if keypoints is None:
            # values are checked by the backbone; a stage only refuses to run without points
            raise ValueError("SwinStage(pos='kprpe') uses keypoints (KP-RPE) but was called "
                             "without them: pass keypoints (B, K, 2) in [0, 1]")
        # each block's windowed bias is built right before the block (one alive at a time)
        for block, bias in zip(self.blocks, self.kprpe.iter_biases(keypoints)):
            x = block(x, bias)
        return x


class PatchMerging(nn.Module):
    """2×2 patch merging: (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C), zero-padding odd sizes.

    Neighbours concatenated in torchvision's order [(0,0), (1,0), (0,1), (1,1)] (row, col offsets).
    V1: LayerNorm(4C) then Linear(4C → 2C, no bias); V2: Linear then LayerNorm(2C).
    """

    def __init__(self, dim: int, style: str = "v1"):
        super().__init__()
        self.style = style
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim if style == "v1" else 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C)."""
        height, width = x.shape[1:3]
        x = nn.functional.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        if self.style == "v1":
            return self.reduction(self.norm(x))
        return self.norm(self.reduction(x))


class SwinTransformer(nn.Module):
    """Swin backbone taking ``(images, keypoints)``; KP-RPE per stage on that stage's grid.

    Args:
        img_size: input side or (H, W). patch_size: stem conv kernel = stride (edge pixels that do
            not fill a patch are dropped, as official: 112 / 3 → 37).
        in_chans: image channels. embed_dim: channels C of stage 1 (doubling per stage).
        depths: blocks per stage. num_heads: heads per stage.
        window_size: window (int or (wh, ww)), the same in every stage.
        mlp_ratio, qkv_bias: block options. style: ``"v1"`` or ``"v2"`` (see :class:`SwinBlock`).
        pos: ``"none"``, ``"abs"``, ``"rpe"``, ``"irpe"``, ``"kprpe"``, ``"abs+<rel>"``; ``abs`` is
            a
            learned embedding on the stem tokens.
        native_bias: Swin's learned window table in every block. Default: only when ``pos`` has no
            relative part (with KP-RPE the official model *replaces* the native bias).
        num_keypoints, kprpe_variant, rpe_ratio, keypoint_grad: KP-RPE options.
        num_classes: head output size; 0 returns pooled features (flatten: (B, h·w·C'),
            avg: (B, C')).
        head: ``"flatten_bn"`` (official face head) or ``"avg"`` (mean + Linear).
        drop_rate, drop_path_rate: dropout and stochastic depth (linear over all blocks).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        style: str = "v1",
        pos: str = "none",
        native_bias: bool | None = None,
        num_keypoints: int = 5,
        kprpe_variant: str = "rel_splithead_unshared",
        rpe_ratio: float = 1.9,
        keypoint_grad: bool = False,
        num_classes: int = 0,
        head: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"swin: depths {list(depths)} and num_heads {list(num_heads)} differ.")
        if head not in ("flatten_bn", "avg"):
            raise ValueError(f"swin: head must be 'flatten_bn' or 'avg'; got {head!r}.")
        self.absolute, self.relative = parse_pos(pos)
        self.pos = pos
        self.head_type = head
        self.num_keypoints = num_keypoints
        self.num_classes = num_classes

        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC"
        )
        grid = tuple(self.patch_embed.grid_size)
        self.abs_pos = (
            AbsolutePositionEmbedding(grid[0] * grid[1], embed_dim) if self.absolute else None
        )
        self.pos_drop = nn.Dropout(drop_rate)

        rates = stochastic_depth(drop_path_rate, sum(depths))
        stages, merges, dim = [], [], embed_dim
        for s, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:s])
            stages.append(
                SwinStage(
                    dim,
                    depth,
                    heads,
                    grid,
                    window_size,
                    relative=self.relative,
                    native_bias=native_bias,
                    num_keypoints=num_keypoints,
                    kprpe_variant=kprpe_variant,
                    rpe_ratio=rpe_ratio,
                    keypoint_grad=keypoint_grad,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    style=style,
                    drop=drop_rate,
                    drop_path=rates[start : start + depth],
                )
            )
            if s < len(depths) - 1:
                merges.append(PatchMerging(dim, style))
                dim, grid = 2 * dim, ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        self.stages = nn.ModuleList(stages)
        self.merges = nn.ModuleList(merges)
        self.num_features = dim
        self.final_grid = grid
        self.norm = nn.LayerNorm(dim)
        self.feature: nn.Module | None = None
        self.head: nn.Module | None = None
        if num_classes > 0 and head == "flatten_bn":
            self.feature = FlattenBNHead(grid[0] * grid[1], dim, num_classes)
        elif num_classes > 0:
            self.head = nn.Linear(dim, num_classes)
        init_linear_layernorm(self, skip=_POSITION_MODULES + (SwinWindowBias,))

    @property
    def uses_keypoints(self) -> bool:
        """Whether ``forward`` needs keypoints."""
        return self.relative == "kprpe"

    def forward_features(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """images (B, C, H, W), keypoints (B, K, 2) | None → final map after norm (B, h, w, C')."""
        if self.uses_keypoints:
            # the one check of this forward; stages and their KP-RPE modules trust it
            check_keypoints(keypoints, self.num_keypoints, batch_size=images.shape[0],
                            sequence=False, what=f"swin(pos={self.pos!r})", tolerance=None)
        x = self.patch_embed(images)
        if self.abs_pos is not None:
            b, h, w, c = x.shape
            x = self.abs_pos(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        x = self.pos_drop(x)
        for s, stage in enumerate(self.stages):
            x = stage(x, keypoints)
            if s < len(self.merges):
                x = self.merges[s](x)
        return self.norm(x)

    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """images (B, C, H, W), keypoints (B, K, 2) in [0, 1] (x, y) | None → (B, num_classes).

        With ``num_classes=0``: (B, h·w·C') for ``flatten_bn`` (row-major, token-major) or
        (B, C') for ``avg``.
        """
        x = self.forward_features(images, keypoints)
        if self.feature is not None:
            return self.feature(x.flatten(1, 2))
        pooled = x.flatten(1) if self.head_type == "flatten_bn" else x.mean(dim=(1, 2))
        return self.head(pooled) if self.head is not None else pooled
