"""Vision Transformer with a choice of position encoding, KP-RPE included.

``VisionTransformer(images (B, C, H, W), keypoints (B, K, 2) | None) -> Tensor``.

Position encodings (``pos``, see :func:`kpt.position.parse_pos`):

* ``"none"``: no position information at all;
* ``"abs"``: learned absolute embedding on the patch tokens;
* ``"rpe"``: a learned bias per layer, head and product bucket (:class:`RelativePositionBias`);
* ``"irpe"``: contextual iRPE on keys (:class:`ContextualRPE`, lives inside each attention);
* ``"kprpe"``: keypoint relative position encoding (:class:`KeypointRPE`, one module for all layers,
  computed once per forward from the keypoints);
* ``"abs+<rel>"``: the absolute embedding plus the relative one (``"abs+kprpe"`` is the
  official face model). A relative encoding alone carries no absolute embedding (DESIGN §4).

Module names follow the official CVLface ViT so checkpoints map key by key: ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``feature.{0..3}``.
kpt-specific names: ``abs_pos`` (absolute embedding), ``kprpe.linear`` (official
``keypoint_linear``), ``rel_bias.{i}`` (plain RPE) and ``blocks.{i}.attn.rpe`` (iRPE).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, get_act_layer, trunc_normal_
from torch import Tensor, nn

from kpt.data.keypoints import check_keypoints
from kpt.layers import Attention
from kpt.models.common import (
    HEAD_TYPES,
    FlattenBNHead,
    final_norm,
    head_input_dtype,
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


class Block(nn.Module):
    """Pre-norm block: ``x + DropPath(Attn(LN(x), bias))``, then ``x + DropPath(MLP(LN(x)))``.

    Args:
        dim: token width D. num_heads: H. mlp_ratio: hidden width of the MLP is ``int(D·ratio)``.
        qkv_bias: bias on the qkv projection (official face ViT: False). act_layer: MLP activation.
        drop: dropout after the MLP and the attention projection. attn_drop: attention dropout.
        drop_path: stochastic depth rate of this block. rpe: optional iRPE module for the attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        rpe: nn.Module | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, rpe=rpe
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (B, N, D), bias broadcastable to (B, H, N, N) or None → (B, N, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x), bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT backbone taking ``(images, keypoints)``.

    Args:
        img_size: input side (int) or (H, W); inputs must have exactly this size.
        patch_size: square patch side; the token grid is (H/p) × (W/p), token n = row·W' + col.
        in_chans: image channels.
        embed_dim: token width D.
        depth: number of blocks L.
        num_heads: attention heads H (D must be divisible by H).
        mlp_ratio: MLP hidden width / D.
        num_classes: output size of the head; 0 returns pooled features without a head
            (``"flatten_bn"``: (B, N·D) token-major; ``"avg"``/``"cls"``: (B, D)).
        pos: position encoding, see module docstring.
        kprpe_variant: ``"rel"``, ``"rel_splithead"``, ``"rel_unshared"``,
            ``"rel_splithead_unshared"`` (official default).
        kprpe_hidden: 0 (official linear tables) or the width of KP-RPE's non-linear keypoint
            encoder (:class:`kpt.position.kprpe.KeypointRPE` ``hidden``).
        num_keypoints: K for KP-RPE.
        rpe_ratio: iRPE piecewise ratio r (1.9 → 49 product buckets) for rpe/irpe/kprpe.
        keypoint_grad: let gradients reach the keypoints (official: no).
        head: ``"flatten_bn"`` (official face head, no cls token), ``"avg"`` (mean of patch tokens
            + Linear) or ``"cls"`` (class token + Linear).
        class_token: prepend a learned class token; default: only for ``head="cls"``. Relative
            biases give the class token's row and column a zero bias.
        act_layer: MLP activation name for timm's ``get_act_layer`` (``"gelu"``, ``"relu6"``, …).
        qkv_bias: bias on the qkv projection.
        drop_rate, attn_drop_rate, drop_path_rate: dropout / attention dropout / stochastic depth
            (linearly increasing over depth).
        final_norm_fp32: run the final LayerNorm (and the head input) in float32, as official.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 112,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        pos: str = "abs",
        kprpe_variant: str = "rel_splithead_unshared",
        kprpe_hidden: int = 0,
        num_keypoints: int = 5,
        rpe_ratio: float = 1.9,
        keypoint_grad: bool = False,
        head: str = "avg",
        class_token: bool | None = None,
        act_layer: str = "gelu",
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        final_norm_fp32: bool = True,
    ):
        super().__init__()
        if head not in HEAD_TYPES:
            raise ValueError(f"vit: head must be one of {HEAD_TYPES}; got {head!r}.")
        if embed_dim % num_heads:
            raise ValueError(
                f"vit: embed_dim {embed_dim} is not divisible by num_heads {num_heads}."
            )
        class_token = (head == "cls") if class_token is None else bool(class_token)
        if head == "cls" and not class_token:
            raise ValueError("vit: head='cls' needs class_token=True.")
        if head == "flatten_bn" and class_token:
            raise ValueError("vit: head='flatten_bn' flattens patch tokens; use class_token=False.")
        self.absolute, self.relative = parse_pos(pos)
        if kprpe_hidden and self.relative != "kprpe":
            # e.g. --preset follow_keypoints with model.pos=abs: the encoder has nothing to feed
            logger.warning("vit: kprpe_hidden=%s has no effect with pos=%r (no KP-RPE)",
                           kprpe_hidden, pos)
        if self.relative == "irpe" and class_token:
            raise ValueError(
                "vit: pos with 'irpe' is implemented for patch tokens only (no class token)."
            )

        self.pos = pos
        self.head_type = head
        self.num_classes = num_classes
        self.num_keypoints = num_keypoints
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.final_norm_fp32 = final_norm_fp32

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = int(class_token)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.abs_pos = (
            AbsolutePositionEmbedding(self.num_patches, embed_dim) if self.absolute else None
        )
        self.pos_drop = nn.Dropout(drop_rate)

        head_dim = embed_dim // num_heads
        irpe = [
            ContextualRPE(num_heads, head_dim, self.grid_size, ratio=rpe_ratio)
            if self.relative == "irpe"
            else None
            for _ in range(depth)
        ]
        rates = stochastic_depth(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                get_act_layer(act_layer),
                drop_rate,
                attn_drop_rate,
                rates[i],
                rpe=irpe[i],
            )
            for i in range(depth)
        )
        self.rel_bias = (
            nn.ModuleList(
                RelativePositionBias(num_heads, self.grid_size, ratio=rpe_ratio)
                for _ in range(depth)
            )
            if self.relative == "rpe"
            else None
        )
        self.kprpe = (
            KeypointRPE(
                num_keypoints,
                num_heads,
                depth,
                self.grid_size,
                ratio=rpe_ratio,
                variant=kprpe_variant,
                keypoint_grad=keypoint_grad,
                hidden=kprpe_hidden,
            )
            if self.relative == "kprpe"
            else None
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.feature: nn.Module | None = None
        self.head: nn.Module | None = None
        if num_classes > 0 and head == "flatten_bn":
            self.feature = FlattenBNHead(self.num_patches, embed_dim, num_classes)
        elif num_classes > 0:
            self.head = nn.Linear(embed_dim, num_classes)

        init_linear_layernorm(self, skip=_POSITION_MODULES)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)

    @property
    def uses_keypoints(self) -> bool:
        """Whether ``forward`` needs keypoints."""
        return self.kprpe is not None

    def _layer_biases(self, keypoints: Tensor | None) -> Iterator[Tensor | None]:
        """Yield one additive bias per block: (B|1, H, N', N') or None (N' includes cls).

        KP-RPE biases come from :meth:`KeypointRPE.iter_biases`, built right before the block
        that uses them, so only one (B, H, N, N) bias is alive at a time outside autograd.
        """
        kprpe_biases = self.kprpe.iter_biases(keypoints) if self.kprpe is not None else None
        for layer in range(self.depth):
            if kprpe_biases is not None:
                bias = next(kprpe_biases)
            elif self.rel_bias is not None:
                bias = self.rel_bias[layer]()
            else:
                yield None
                continue
            if self.num_prefix_tokens:
                # The class token has no grid position: its row and column get a zero bias.
                p = self.num_prefix_tokens
                bias = torch.nn.functional.pad(bias, (p, 0, p, 0))
            yield bias

    def forward_features(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """images (B, C, H, W), keypoints (B, K, 2) | None → tokens after the final norm (B, N', D).

        N' = N patch tokens (+1 leading class token when ``class_token``). float32 when
        ``final_norm_fp32``.
        """
        if self.kprpe is not None:
            # the one check of this forward; the KP-RPE module trusts it
            check_keypoints(keypoints, self.num_keypoints, batch_size=images.shape[0],
                            sequence=False, what=f"vit(pos={self.pos!r})", tolerance=None)
        x = self.patch_embed(images)
        if self.abs_pos is not None:
            x = self.abs_pos(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pos_drop(x)
        for block, bias in zip(self.blocks, self._layer_biases(keypoints)):
            x = block(x, bias)
        return final_norm(self.norm, x, self.final_norm_fp32)

    def pool(self, tokens: Tensor) -> Tensor:
        """tokens (B, N', D) → (B, N·D) for ``flatten_bn``, (B, D) for ``avg`` / ``cls``."""
        if self.head_type == "cls":
            return tokens[:, 0]
        if self.head_type == "avg":
            return tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return tokens.flatten(1)

    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """images (B, C, H, W), keypoints (B, K, 2) in [0, 1] (x, y) | None → (B, num_classes).

        With ``num_classes=0`` returns the pooled features (see :meth:`pool`).
        """
        tokens = self.forward_features(images, keypoints)
        if self.feature is not None:
            return self.feature(head_input_dtype(tokens, self.feature))
        pooled = self.pool(tokens)
        if self.head is not None:
            return self.head(head_input_dtype(pooled, self.head))
        return pooled

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay (embeddings, tokens)."""
        names = {n for n, _ in self.named_parameters() if n.startswith(("abs_pos.", "cls_token"))}
        return names
