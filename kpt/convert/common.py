"""What every CVLface converter shares: the error type, reading a source file, checked loading.

No official code is imported; files are read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from kpt.errors import UserError

logger = logging.getLogger(__name__)


class ConversionError(UserError, ValueError):
    """The source file is not an official ViT-KPRPE state dict kpt can convert."""


CVLFACE_EXPECTED = "expected the official CVLface model.pt or model.safetensors"


def read_state_dict(path: str | Path, expected: str = CVLFACE_EXPECTED,
                    error: type[Exception] = ConversionError) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``; a dict holding
    it under ``state_dict``, as Lightning checkpoints do, is unwrapped).

    Args:
        path: source file.
        expected: what the file should have been, ending every error message.
        error: the exception type raised (each converter has its own).
    Returns:
        Flat ``{key: tensor}``.
    Raises:
        error: missing, empty or unreadable file, or no dict of tensors inside (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file; {expected}")
    if path.stat().st_size == 0:
        raise error(f"{path} is empty (0 bytes): its write never completed; {expected}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise error(f"{path}: not a readable .safetensors file ({exc}); {expected}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign / unsafe pickles
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (it holds {found[1]}, which kpt refuses to unpickle)" if found else ""
        raise error(
            f"{path}: not a PyTorch checkpoint torch.load(weights_only=True) can read{what} "
            f"({type(exc).__name__}); {expected}; re-save just the tensors, e.g. "
            f"torch.save(ckpt['state_dict'], 'weights.pt')") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise error(f"{path} holds a {type(obj).__name__}, not a state dict; {expected}")
    others = [k for k, v in obj.items() if not isinstance(v, Tensor)][:5]
    if others:
        raise error(f"{path}: entries {others} are not tensors; {expected}")
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
