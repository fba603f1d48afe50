"""Convert official CVLface ViT-KPRPE state dicts (reference kprpe.md §5) into kpt ViT weights.

Used by :func:`kpt.convert.convert_cvlface` when the source holds ``patch_embed.proj.weight`` (under
``model.net.``, ``net.`` or no prefix). The architecture is read from the tensor shapes, so every
size converts, not only small/base:

==========================  ===============================================================
``patch_embed.proj.weight``  (D, C, p, p): embed_dim, in_chans, patch_size
``pos_embed``                (1, N, D): N = S² patches → img_size = S·p (square, as official)
``blocks.{i}.…``             depth = number of blocks; ``attn.qkv.bias`` present → qkv_bias
``blocks.0.mlp.fc1.weight``  (D·r, D): mlp_ratio r
``keypoint_linear.weight``   (L·H·nb, 2K): K keypoints; H heads from the rows (nb = 49 at r 1.9)
``feature.{0..3}``           flatten-BN head; output dim = rows of ``feature.2.weight``
==========================  ===============================================================

Keys map one to one onto :class:`kpt.models.vit.VisionTransformer` except ``pos_embed`` →
``abs_pos.*`` and ``keypoint_linear.*`` → ``kprpe.linear.*`` (same row order: layer, head, bucket).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from torch import Tensor

from kpt.convert.common import ConversionError, tensor_shape

logger = logging.getLogger(__name__)

PREFIXES = ("model.net.", "net.", "module.net.", "")
_KPRPE_VARIANT = "rel_splithead_unshared"  # the only variant of the released configs (kprpe.md §2)


def strip_prefix(state: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Remove the ``model.net.`` / ``net.`` prefix, dropping keys outside the backbone.

    Raises:
        ConversionError: no ``patch_embed.proj.weight`` under any known prefix.
    """
    for prefix in PREFIXES:
        if f"{prefix}patch_embed.proj.weight" in state:
            inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            dropped = len(state) - len(inner)
            if dropped:
                logger.info("%s: ignoring %d keys outside %r", source, dropped, prefix)
            return inner
    raise ConversionError(
        f"{source}: no 'patch_embed.proj.weight' under prefixes {list(PREFIXES)}; not a CVLface "
        f"ViT state dict (first keys: {list(state)[:5]})."
    )


def infer_vit_config(
    state: dict[str, Tensor],
    source: str = "checkpoint",
    num_heads: int | None = None,
    rpe_ratio: float = 1.9,
) -> dict[str, Any]:
    """Infer :class:`~kpt.models.vit.VisionTransformer` kwargs from an un-prefixed state dict.

    Args:
        state: keys without ``net.`` prefix. source: name for error messages.
        num_heads: heads, needed only when the checkpoint has no KP-RPE linear to read them from.
        rpe_ratio: iRPE ratio the checkpoint was trained with (official 1.9 → 49 buckets).

    Returns:
        Constructor kwargs for ``kpt.create_model("vit", **kwargs)``.
    """
    from kpt.position import num_buckets

    dim, in_chans, patch, patch_w = tensor_shape(state, "patch_embed.proj.weight", source, 4)
    if patch != patch_w:
        raise ConversionError(f"{source}: non-square patch {patch}×{patch_w} is not supported.")
    _, num_patches, pos_dim = tensor_shape(state, "pos_embed", source, 3)
    side = math.isqrt(num_patches)
    if side * side != num_patches or pos_dim != dim:
        raise ConversionError(
            f"{source}: pos_embed {tuple(state['pos_embed'].shape)} is not (1, S², {dim})."
        )
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(block_ids)
    if depth == 0 or block_ids != set(range(depth)):
        raise ConversionError(f"{source}: blocks are not numbered 0..depth-1: {sorted(block_ids)}.")
    hidden = tensor_shape(state, "blocks.0.mlp.fc1.weight", source, 2)[0]
    cfg: dict[str, Any] = {
        "img_size": side * patch,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": dim,
        "depth": depth,
        "mlp_ratio": hidden / dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "act_layer": "relu6",
        "head": "flatten_bn",
        "class_token": False,
        "rpe_ratio": rpe_ratio,
        "drop_path_rate": 0.1,
        "final_norm_fp32": True,
    }
    if "feature.3.weight" in state:
        head_hidden, flat = tensor_shape(state, "feature.0.weight", source, 2)
        if flat != num_patches * dim or head_hidden != dim:
            raise ConversionError(
                f"{source}: feature.0.weight {(head_hidden, flat)} is not "
                f"({dim}, {num_patches * dim})."
            )
        cfg["num_classes"] = tensor_shape(state, "feature.2.weight", source, 2)[0]
    else:
        cfg["num_classes"] = 0
    if "keypoint_linear.weight" in state:
        rows, cols = tensor_shape(state, "keypoint_linear.weight", source, 2)
        buckets = num_buckets("product", rpe_ratio)
        if cols % 2 or rows % (depth * buckets):
            raise ConversionError(
                f"{source}: keypoint_linear.weight {(rows, cols)} is not "
                f"(depth·heads·{buckets}, 2K) "
                f"for depth {depth} (only the official 'rel_keypoint_splithead_unshared' converts)."
            )
        heads = rows // (depth * buckets)
        if num_heads is not None and num_heads != heads:
            raise ConversionError(f"{source}: KP-RPE rows give {heads} heads, not {num_heads}.")
        cfg.update(pos="abs+kprpe", num_keypoints=cols // 2, kprpe_variant=_KPRPE_VARIANT)
        num_heads = heads
    else:
        cfg["pos"] = "abs"
        if num_heads is None:
            raise ConversionError(
                f"{source}: no keypoint_linear to read the heads from; pass num_heads."
            )
    if dim % num_heads:
        raise ConversionError(f"{source}: embed dim {dim} is not divisible by {num_heads} heads.")
    cfg["num_heads"] = num_heads
    return cfg


def map_vit_keys(state: dict[str, Tensor], target_keys: list[str]) -> dict[str, Tensor]:
    """Rename official ViT-KPRPE keys to kpt keys.

    Args:
        state: un-prefixed official state dict.
        target_keys: keys of the kpt model's state dict (to find the absolute-embedding name).
    Returns:
        State dict for the kpt model (``mask_token`` of MAE-style training is dropped).
    """
    abs_keys = [k for k in target_keys if k.startswith("abs_pos.")]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed":
            if len(abs_keys) != 1:
                raise ConversionError(f"kpt model has {len(abs_keys)} absolute-embedding tensors.")
            out[abs_keys[0]] = value
        elif key.startswith("keypoint_linear."):
            out["kprpe.linear." + key[len("keypoint_linear.") :]] = value
        elif key == "mask_token":
            logger.info("dropping mask_token (MAE-style masking is not used at inference)")
        else:
            out[key] = value
    return out
