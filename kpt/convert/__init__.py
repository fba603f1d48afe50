"""Convert official CVLface ViT-KPRPE and Swin-V2-KPRPE checkpoints into kpt model files.

``kpt convert cvlface SRC DST`` calls :func:`convert_cvlface`. The source is a state dict as written
by CVLface: research ``model.pt`` (keys ``net.…``) or the Hugging Face ``model.safetensors`` (keys
``model.net.…``); a dict holding it under ``state_dict`` is accepted too. The architecture is read
from the tensor shapes (reference kprpe.md §5) and the keys say which backbone it is:

* :mod:`kpt.convert.vit`: ViT-KPRPE (``patch_embed.…``);
* :mod:`kpt.convert.swin`: Swin-V2-KPRPE (``features.…``);
* :mod:`kpt.convert.common`: the error type, reading the source file, loading with checked keys
  and shapes.

No official code is imported; files are read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kpt.convert import swin
from kpt.convert.common import ConversionError, load_checked, read_state_dict
from kpt.convert.vit import PREFIXES, infer_vit_config, map_vit_keys, strip_prefix

__all__ = [
    "PREFIXES",
    "ConversionError",
    "convert_cvlface",
    "convert_cvlface_state_dict",
    "infer_vit_config",
    "map_vit_keys",
    "read_state_dict",
    "strip_prefix",
]


def convert_cvlface_state_dict(
    state: dict[str, Tensor], source: str = "checkpoint", **overrides: Any
) -> nn.Module:
    """Build the kpt model for an official (prefixed or not) state dict and load its weights.

    ViT-KPRPE (``patch_embed.…``) and Swin-V2-KPRPE (``features.…``, :mod:`kpt.convert.swin`)
    are recognised by their keys.

    Args:
        state: official state dict. source: name for messages.
        **overrides: ViT: ``num_heads`` / ``rpe_ratio``; Swin: ``img_size``.
    Returns:
        The kpt model (eval mode, ``kpt_spec`` set), weights loaded strictly.
    """
    from kpt.models.presets import build

    swin_prefix = swin.find_swin_prefix(state)
    if swin_prefix is not None:
        net, kprpe = swin.split_swin_state(state, swin_prefix)
        cfg = swin.infer_swin_config(net, kprpe, source, **overrides)
        model = build("swin", **cfg)
        return load_checked(model, swin.map_swin_keys(net, kprpe), cfg, source)
    inner = strip_prefix(state, source)
    cfg = infer_vit_config(inner, source, **overrides)
    model = build("vit", **cfg)
    return load_checked(model, map_vit_keys(inner, list(model.state_dict())), cfg, source)


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
