"""Named model factories: generic ``vit`` / ``swin`` and the official KP-RPE presets.

Each factory merges its preset arguments with the caller's keyword arguments (caller wins) and
records what it built in ``model.kpt_spec = {"name", "kwargs", "preset"}`` where ``name`` is the
generic architecture (``"vit"`` / ``"swin"``) and ``kwargs`` the complete constructor arguments, so
:func:`kpt.models.serialization.save_model` can write a checkpoint that rebuilds the model without
depending on preset defaults.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from torch import nn

from kpt.models.swin import SwinTransformer
from kpt.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[nn.Module]] = {"vit": VisionTransformer, "swin": SwinTransformer}

# Official CVLface face presets (reference kprpe.md §3.1): 112×112, patch 8, 196 tokens, no cls
# token, ReLU6 MLP, qkv without bias, learned absolute embedding + KP-RPE, flatten-BN head → 512.
_VIT_FACE = {
    "img_size": 112,
    "patch_size": 8,
    "in_chans": 3,
    "embed_dim": 512,
    "num_classes": 512,
    "pos": "abs+kprpe",
    "kprpe_variant": "rel_splithead_unshared",
    "num_keypoints": 5,
    "rpe_ratio": 1.9,
    "head": "flatten_bn",
    "act_layer": "relu6",
    "qkv_bias": False,
    "drop_path_rate": 0.1,
    "final_norm_fp32": True,
}
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_small_kprpe": ("vit", {**_VIT_FACE, "depth": 12, "num_heads": 8, "mlp_ratio": 5.0}),
    "vit_base_kprpe": ("vit", {**_VIT_FACE, "depth": 24, "num_heads": 16, "mlp_ratio": 3.0}),
    # Official Swin-V2-KPRPE face model (reference kprpe.md §4): 112×112, stem 3×3 stride 3 (37×37),
    # windows 5×5, res-post-norm cosine attention, KP-RPE replacing the continuous position bias.
    "swin_v2_s_kprpe": (
        "swin",
        {
            "img_size": 112,
            "patch_size": 3,
            "embed_dim": 128,
            "depths": (2, 2, 12, 2),
            "num_heads": (4, 8, 16, 32),
            "window_size": 5,
            "style": "v2",
            "pos": "kprpe",
            "num_keypoints": 5,
            "num_classes": 512,
            "head": "flatten_bn",
            "drop_path_rate": 0.3,
        },
    ),
}


def full_kwargs(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The architecture's constructor defaults updated with ``kwargs`` (unknown keys rejected)."""
    cls = ARCHITECTURES[arch]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"{arch}: unknown argument(s) {unknown}; accepted: "
            f"{sorted(p for p in params if p != 'self')}"
        )
    merged = {
        name: p.default
        for name, p in params.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }
    merged.update(kwargs)
    return merged


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a generic architecture or a preset by name, recording ``kpt_spec`` on the model.

    Args:
        name: ``"vit"``, ``"swin"`` or a key of :data:`PRESETS`.
        **kwargs: constructor arguments overriding the preset's.
    """
    if name in ARCHITECTURES:
        arch, preset_kwargs, preset = name, {}, None
    elif name in PRESETS:
        arch, preset_kwargs = PRESETS[name]
        preset = name
    else:
        raise KeyError(
            f"unknown model {name!r}; available: {sorted(ARCHITECTURES) + sorted(PRESETS)}"
        )
    merged = full_kwargs(arch, {**preset_kwargs, **kwargs})
    model = ARCHITECTURES[arch](**merged)
    model.kpt_spec = {"name": arch, "kwargs": merged, "preset": preset}
    return model


def vit(**kwargs: Any) -> nn.Module:
    """Generic ViT (:class:`kpt.models.vit.VisionTransformer`), any size and ``pos``."""
    return build("vit", **kwargs)


def swin(**kwargs: Any) -> nn.Module:
    """Generic Swin (:class:`kpt.models.swin.SwinTransformer`), V1 or V2 style, any ``pos``."""
    return build("swin", **kwargs)


def vit_small_kprpe(**kwargs: Any) -> nn.Module:
    """Official CVLface ViT-KPRPE small: D 512, depth 12, 8 heads, MLP ×5 (96,004,128 params)."""
    return build("vit_small_kprpe", **kwargs)


def vit_base_kprpe(**kwargs: Any) -> nn.Module:
    """Official CVLface ViT-KPRPE base: D 512, depth 24, 16 heads, MLP ×3 (115,076,736 params)."""
    return build("vit_base_kprpe", **kwargs)


def swin_v2_s_kprpe(**kwargs: Any) -> nn.Module:
    """Swin-V2-S with KP-RPE as the official CVLface face model (112×112, windows 5, 37×37 stem)."""
    return build("swin_v2_s_kprpe", **kwargs)


FACTORIES = {
    "vit": vit,
    "swin": swin,
    "vit_small_kprpe": vit_small_kprpe,
    "vit_base_kprpe": vit_base_kprpe,
    "swin_v2_s_kprpe": swin_v2_s_kprpe,
}
