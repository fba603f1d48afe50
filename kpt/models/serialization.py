"""Save and load bare backbones with the architecture recorded next to the weights.

Two formats, chosen by the file suffix:

* ``.safetensors``: tensors = the model's ``state_dict()``; string metadata ``kpt_format =
  "kpt-model"``, ``kpt_version``, ``model`` (registered name) and ``kwargs`` (JSON constructor
  arguments).
* ``.pt`` / ``.pth`` / ``.ckpt``: ``torch.save`` of ``{"kpt_format": "kpt-model", "kpt_version",
  "model", "kwargs" (JSON string), "state_dict"}``, read with ``torch.load(weights_only=True)``.

``kpt.load_model`` (toolkit) delegates bare-model files here; :func:`is_model_file` tells the two
apart from engine checkpoints without loading the tensors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

FORMAT = "kpt-model"
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")


def _version() -> str:
    import kpt

    return getattr(kpt, "__version__", "0")


def _spec(model: nn.Module, name: str | None, kwargs: dict[str, Any] | None) -> tuple[str, dict]:
    spec = getattr(model, "kpt_spec", None) or {}
    name = name or spec.get("name")
    if kwargs is None:
        kwargs = spec.get("kwargs")
    if not name or kwargs is None:
        raise ValueError(
            "save_model: the model has no kpt_spec (it was not built by kpt.create_model); pass "
            "name= and kwargs= explicitly."
        )
    return name, dict(kwargs)


def save_model(
    model: nn.Module,
    path: str | Path,
    name: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights with its registered name and constructor kwargs.

    Args:
        model: the backbone. path: destination; ``.safetensors`` or ``.pt``/``.pth``/``.ckpt``.
        name: registered model name; default ``model.kpt_spec["name"]`` (set by kpt factories).
        kwargs: constructor keyword arguments (JSON-serialisable); default ``model.kpt_spec``.

    Returns:
        The written path. The write is atomic (temporary file, then rename).
    """
    path = Path(path)
    name, kwargs = _spec(model, name, kwargs)
    try:
        kwargs_json = json.dumps(kwargs, sort_keys=True)
    except TypeError as exc:
        raise ValueError(
            f"save_model: kwargs for {name!r} are not JSON-serialisable: {exc}"
        ) from exc
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        meta = {
            "kpt_format": FORMAT,
            "kpt_version": _version(),
            "model": name,
            "kwargs": kwargs_json,
        }
        save_file(state, str(tmp), metadata=meta)
    elif path.suffix in _TORCH_SUFFIXES:
        torch.save(
            {
                "kpt_format": FORMAT,
                "kpt_version": _version(),
                "model": name,
                "kwargs": kwargs_json,
                "state_dict": state,
            },
            tmp,
        )
    else:
        raise ValueError(f"save_model: {path}: suffix must be .safetensors, .pt, .pth or .ckpt.")
    tmp.replace(path)
    logger.info("saved %s (%d tensors) to %s", name, len(state), path)
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """Return ``{"model": name, "kwargs": dict, "kpt_version": str}`` of a kpt model file.

    Raises:
        ValueError: the file is not a kpt model file (message names the file and what is missing).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    elif path.suffix in _TORCH_SUFFIXES:
        meta = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: expected a dict saved by kpt save_model, got {type(meta)}.")
    else:
        raise ValueError(f"{path}: not a model file (suffix .safetensors, .pt, .pth or .ckpt).")
    if meta.get("kpt_format") != FORMAT:
        raise ValueError(
            f"{path}: field 'kpt_format' is {meta.get('kpt_format')!r}, expected {FORMAT!r} "
            "(a bare model written by kpt save_model / kpt convert)."
        )
    for field in ("model", "kwargs"):
        if field not in meta:
            raise ValueError(f"{path}: kpt model file lacks the field {field!r}.")
    try:
        kwargs = json.loads(meta["kwargs"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: field 'kwargs' is not valid JSON: {exc}") from exc
    return {"model": meta["model"], "kwargs": kwargs, "kpt_version": meta.get("kpt_version", "")}


def is_model_file(path: str | Path) -> bool:
    """True if ``path`` is a bare kpt model file (cheap for safetensors: reads the header only)."""
    try:
        read_header(path)
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or ``kpt convert``) and load its weights.

    Args:
        path: ``.safetensors`` or ``.pt``/``.pth``/``.ckpt`` kpt model file.
        map_location: device for the weights.

    Returns:
        The model in eval mode, with ``kpt_spec`` set.
    """
    import kpt

    path = Path(path)
    header = read_header(path)
    model = kpt.create_model(header["model"], **header["kwargs"])
    if path.suffix == ".safetensors":
        state = load_file(str(path), device=str(map_location))
    else:
        state = torch.load(path, map_location=map_location, weights_only=True)["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit {header['model']} built from its kwargs; missing "
            f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}."
        )
    return model.to(map_location).eval()
