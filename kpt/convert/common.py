"""What every CVLface converter shares: the error type, reading a source file, checked loading.

No official code is imported; files are read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from kpt.errors import UserError

logger = logging.getLogger(__name__)


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


def tensor_shape(state: dict[str, Tensor], key: str, source: str, ndim: int) -> tuple[int, ...]:
    """The shape of ``state[key]``, which must exist and have ``ndim`` dimensions.

    Raises:
        ConversionError: the key is missing or has another number of dimensions (names ``source``).
    """
    if key not in state:
        raise ConversionError(f"{source}: missing key {key!r}.")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ConversionError(f"{source}: {key!r} has shape {shape}, expected {ndim} dims.")
    return shape


def load_checked(model: nn.Module, mapped: dict[str, Tensor], cfg: dict, source: str) -> nn.Module:
    """Load ``mapped`` into ``model`` after checking key sets and shapes (clear errors).

    Args:
        model: the kpt model built from the inferred ``cfg``.
        mapped: the source tensors under kpt's key names.
        cfg: the inferred constructor kwargs (named in errors and in the log).
        source: the source file, for messages.

    Returns:
        ``model`` in eval mode, weights loaded strictly (cast to the model's dtypes).
    """
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
