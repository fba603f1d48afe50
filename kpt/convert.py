"""Convert official CVLface ViT-KPRPE (and Swin-V2-KPRPE) checkpoints into kpt model files.

``kpt convert cvlface SRC DST`` calls :func:`convert_cvlface`. The source is a state dict as written
by CVLface: research ``model.pt`` (keys ``net.…``) or the Hugging Face ``model.safetensors`` (keys
``model.net.…``); a dict holding it under ``state_dict`` is accepted too. The architecture is read
from the tensor shapes (reference kprpe.md §5), so every size converts, not only small/base:

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
No official code is imported; files are read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from kpt.errors import UserError

logger = logging.getLogger(__name__)

PREFIXES = ("model.net.", "net.", "module.net.", "")
_KPRPE_VARIANT = "rel_splithead_unshared"  # the only variant of the released configs (kprpe.md §2)


class ConversionError(UserError, ValueError):
    """The source file is not an official ViT-KPRPE state dict kpt can convert."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Args:
        path: source file.
    Returns:
        Flat ``{key: tensor}``.
    Raises:
        ConversionError: unreadable file or no tensor dict inside (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise ConversionError(f"{path}: not a readable .safetensors file ({exc}); expected the "
                                  f"official CVLface model.safetensors") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign / unsafe pickles
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint torch.load(weights_only=True) can read "
            f"({type(exc).__name__}: {exc}); expected the official CVLface model.pt or "
            f"model.safetensors"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(
            f"{path}: expected a dict of tensors (a state dict), got {type(obj)}."
        )
    return obj


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


def _shape(state: dict[str, Tensor], key: str, source: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"{source}: missing key {key!r}.")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ConversionError(f"{source}: {key!r} has shape {shape}, expected {ndim} dims.")
    return shape


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

    dim, in_chans, patch, patch_w = _shape(state, "patch_embed.proj.weight", source, 4)
    if patch != patch_w:
        raise ConversionError(f"{source}: non-square patch {patch}×{patch_w} is not supported.")
    _, num_patches, pos_dim = _shape(state, "pos_embed", source, 3)
    side = math.isqrt(num_patches)
    if side * side != num_patches or pos_dim != dim:
        raise ConversionError(
            f"{source}: pos_embed {tuple(state['pos_embed'].shape)} is not (1, S², {dim})."
        )
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(block_ids)
    if depth == 0 or block_ids != set(range(depth)):
        raise ConversionError(f"{source}: blocks are not numbered 0..depth-1: {sorted(block_ids)}.")
    hidden = _shape(state, "blocks.0.mlp.fc1.weight", source, 2)[0]
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
        head_hidden, flat = _shape(state, "feature.0.weight", source, 2)
        if flat != num_patches * dim or head_hidden != dim:
            raise ConversionError(
                f"{source}: feature.0.weight {(head_hidden, flat)} is not "
                f"({dim}, {num_patches * dim})."
            )
        cfg["num_classes"] = _shape(state, "feature.2.weight", source, 2)[0]
    else:
        cfg["num_classes"] = 0
    if "keypoint_linear.weight" in state:
        rows, cols = _shape(state, "keypoint_linear.weight", source, 2)
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


def _check_and_load(model, mapped: dict[str, Tensor], cfg: dict, source: str):
    """Load ``mapped`` into ``model`` after checking key sets and shapes (clear errors)."""
    target = model.state_dict()
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise ConversionError(
            f"{source}: keys do not match the inferred architecture {cfg}: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}."
        )
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ConversionError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, the inferred model expects "
                f"{tuple(target[key].shape)}."
            )
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()}, strict=True)
    logger.info("%s: converted %s", source, cfg)
    return model.eval()


def convert_cvlface_state_dict(
    state: dict[str, Tensor], source: str = "checkpoint", **overrides: Any
):
    """Build the kpt model for an official (prefixed or not) state dict and load its weights.

    ViT-KPRPE (``patch_embed.…``) and Swin-V2-KPRPE (``features.…``, :mod:`kpt.convert_swin`)
    are recognised by their keys.

    Args:
        state: official state dict. source: name for messages.
        **overrides: ViT: ``num_heads`` / ``rpe_ratio``; Swin: ``img_size``.
    Returns:
        The kpt model (eval mode, ``kpt_spec`` set), weights loaded strictly.
    """
    from kpt import convert_swin
    from kpt.models.presets import build

    swin_prefix = convert_swin.find_swin_prefix(state)
    if swin_prefix is not None:
        net, kprpe = convert_swin.split_swin_state(state, swin_prefix)
        cfg = convert_swin.infer_swin_config(net, kprpe, source, **overrides)
        model = build("swin", **cfg)
        return _check_and_load(model, convert_swin.map_swin_keys(net, kprpe), cfg, source)
    inner = strip_prefix(state, source)
    cfg = infer_vit_config(inner, source, **overrides)
    model = build("vit", **cfg)
    return _check_and_load(model, map_vit_keys(inner, list(model.state_dict())), cfg, source)


def convert_cvlface(src: str | Path, dst: str | Path, **overrides: Any) -> Path:
    """Convert an official CVLface ViT-KPRPE or Swin-V2-KPRPE checkpoint to a kpt model file.

    Args:
        src: ``model.pt`` (``net.`` keys) or ``model.safetensors`` (``model.net.`` keys).
        dst: output file, ``.safetensors`` (default when no suffix) or ``.pt``.
        **overrides: ViT ``num_heads`` / ``rpe_ratio``, Swin ``img_size``, when they cannot be
            read from the shapes.
    Returns:
        The written path; ``kpt.load_model(path)`` rebuilds the model.
    """
    from kpt.models.serialization import save_model

    src, dst = Path(src), Path(dst)
    if not dst.suffix:
        dst = dst.with_suffix(".safetensors")
    model = convert_cvlface_state_dict(read_state_dict(src), str(src), **overrides)
    return save_model(model, dst)
