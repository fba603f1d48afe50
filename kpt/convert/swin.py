"""Convert official CVLface Swin-V2-KPRPE checkpoints (reference kprpe.md §4-5) into kpt models.

Used by :func:`kpt.convert.convert_cvlface` when the source holds ``net.features.0.0.weight``.
Official layout (torchvision-style Swin with a flat ``features`` list):

===================================  ==========================================================
``net.features.0.{0,2}``             stem Conv2d(3, C, p, stride p) and its LayerNorm
``net.features.{i}.…`` (a block)     ``norm1, attn.{qkv, proj, logit_scale}, norm2, mlp.{0,3}``
``net.features.{i}.…`` (a merge)     ``reduction.weight, norm`` (V2: Linear then LayerNorm)
``net.norm``, ``net.feature.{0..3}`` final LayerNorm and the flatten-BN head
``keypoint_linear.{s}``              one KP-RPE linear per stage, **outside** ``net.``;
                                     rows (block-in-stage, head, bucket)
===================================  ==========================================================

The unused ``relative_coords_table`` / ``relative_position_index`` buffers are dropped. The image
size cannot be read from the shapes (the stem floors 112 / 3 to 37); it defaults to 112, the only
size the official face head supports, and can be overridden.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from torch import Tensor

from kpt.convert.common import ConversionError

logger = logging.getLogger(__name__)

NET_PREFIXES = ("model.net.", "net.", "module.net.")


def find_swin_prefix(state: dict[str, Tensor]) -> str | None:
    """The ``…net.`` prefix of a Swin-KPRPE state dict, or None if it is not one."""
    for prefix in NET_PREFIXES:
        if f"{prefix}features.0.0.weight" in state:
            return prefix
    return None


def _layout(net: dict[str, Tensor], source: str = "checkpoint") -> list[tuple[int, str]]:
    """[(feature index, "block" | "merge")] for features 1…, in order."""
    indices = sorted({int(m.group(1)) for k in net if (m := re.match(r"features\.(\d+)\.", k))})
    layout = []
    for i in indices:
        if i == 0:
            continue
        if f"features.{i}.attn.qkv.weight" in net:
            layout.append((i, "block"))
        elif f"features.{i}.reduction.weight" in net:
            layout.append((i, "merge"))
        else:
            raise ConversionError(
                f"{source}: features.{i} is neither a Swin block nor a patch merging.")
    return layout


def infer_swin_config(
    net: dict[str, Tensor], kprpe: dict[str, Tensor], source: str, img_size: int = 112
) -> dict[str, Any]:
    """kpt ``swin`` kwargs from un-prefixed ``net`` tensors and the ``keypoint_linear`` tensors."""
    from kpt.position import num_buckets

    stem = tuple(net["features.0.0.weight"].shape)
    if len(stem) != 4 or stem[2] != stem[3]:
        raise ConversionError(
            f"{source}: features.0.0.weight has shape {stem}, expected a square stem conv "
            "(C, in_chans, p, p)."
        )
    dim, in_chans, patch, _ = stem
    stages: list[list[int]] = [[]]
    for i, kind in _layout(net, source):
        if kind == "merge":
            stages.append([])
        else:
            stages[-1].append(i)
    if any(not blocks for blocks in stages):
        raise ConversionError(f"{source}: a stage without blocks in the features list.")
    depths = [len(blocks) for blocks in stages]
    heads = []
    for blocks in stages:
        key = f"features.{blocks[0]}.attn.logit_scale"
        if key not in net:
            raise ConversionError(
                f"{source}: no {key}: only the Swin-V2 (cosine attention) face model is converted."
            )
        heads.append(int(net[key].shape[0]))
    first = stages[0][0]
    table = net.get(f"features.{first}.attn.relative_coords_table")
    if table is None:
        raise ConversionError(
            f"{source}: features.{first}.attn.relative_coords_table missing "
            "(needed for the window size)."
        )
    window = (int(table.shape[1]) + 1) // 2
    mlp_ratio = net[f"features.{first}.mlp.0.weight"].shape[0] / dim
    final_dim, flat = net["feature.0.weight"].shape
    grid = img_size // patch
    for _ in range(len(depths) - 1):
        grid = (grid + 1) // 2
    if grid * grid * final_dim != flat:
        raise ConversionError(
            f"{source}: feature.0.weight {(final_dim, flat)} does not fit img_size {img_size}; "
            "pass img_size= for a non-112 model."
        )
    cfg: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": int(patch),
        "in_chans": int(in_chans),
        "embed_dim": int(dim),
        "depths": depths,
        "num_heads": heads,
        "window_size": window,
        "mlp_ratio": mlp_ratio,
        "style": "v2",
        "head": "flatten_bn",
        "num_classes": int(net["feature.2.weight"].shape[0]),
        "drop_path_rate": 0.3,
    }
    if not kprpe:
        raise ConversionError(f"{source}: no keypoint_linear.*: only Swin-KPRPE converts.")
    buckets = num_buckets("product", 1.9)
    keypoints = set()
    for s, (depth, h) in enumerate(zip(depths, heads)):
        key = f"keypoint_linear.{s}.weight"
        if key not in kprpe:
            raise ConversionError(f"{source}: missing {key}.")
        rows, cols = kprpe[key].shape
        if rows != depth * h * buckets:
            raise ConversionError(
                f"{source}: {key} has {rows} rows, expected {depth}·{h}·{buckets}."
            )
        keypoints.add(cols // 2)
    if len(keypoints) != 1:
        raise ConversionError(f"{source}: stages disagree on the keypoint count {keypoints}.")
    cfg.update(
        pos="kprpe",
        num_keypoints=keypoints.pop(),
        native_bias=False,
        kprpe_variant="rel_splithead_unshared",
    )
    return cfg


def map_swin_keys(net: dict[str, Tensor], kprpe: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename official Swin-KPRPE keys to :class:`kpt.models.swin.SwinTransformer` keys."""
    mapping = {
        "features.0.0.": "patch_embed.proj.",
        "features.0.2.": "patch_embed.norm.",
        "norm.": "norm.",
        "feature.": "feature.",
    }
    stage = block = merge = 0
    for i, kind in _layout(net):
        if kind == "merge":
            mapping[f"features.{i}."] = f"merges.{merge}."
            merge, stage, block = merge + 1, stage + 1, 0
            continue
        dst = f"stages.{stage}.blocks.{block}."
        for a, b in (
            ("norm1.", "norm1."),
            ("norm2.", "norm2."),
            ("attn.qkv.", "attn.qkv."),
            ("attn.proj.", "attn.proj."),
            ("attn.logit_scale", "attn.logit_scale"),
            ("mlp.0.", "mlp.fc1."),
            ("mlp.3.", "mlp.fc2."),
        ):
            mapping[f"features.{i}.{a}"] = dst + b
        block += 1
    out: dict[str, Tensor] = {}
    for key, value in net.items():
        if key.endswith(("relative_coords_table", "relative_position_index")):
            continue
        for a, b in mapping.items():
            if key.startswith(a):
                out[b + key[len(a) :]] = value
                break
        else:
            out[key] = value  # reported as unexpected by the caller
    for key, value in kprpe.items():
        stage_id, rest = key[len("keypoint_linear.") :].split(".", 1)
        out[f"stages.{stage_id}.kprpe.linear.{rest}"] = value
    return out


def split_swin_state(
    state: dict[str, Tensor], prefix: str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(net tensors without ``prefix``, ``keypoint_linear.*`` tensors without the outer prefix)."""
    outer = prefix[: -len("net.")]
    net = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    kp_prefix = outer + "keypoint_linear."
    kprpe = {k[len(outer) :]: v for k, v in state.items() if k.startswith(kp_prefix)}
    return net, kprpe
