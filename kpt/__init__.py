"""kpt: keypoint-conditioned vision transformers (KP-RPE) with domain plugins.

Public API (DESIGN §4)::

    kpt.create_model(name, **kw) -> nn.Module      kpt.list_models(pattern="*") -> list[str]
    kpt.create(kind, name, **kw)                   kpt.list(kind=None) -> dict[str, list[str]]
    kpt.load_model(path) -> nn.Module
"""

from __future__ import annotations

from typing import Any

from kpt import plugin  # noqa: F401 - installs the registry's source of third-party plugin components
from kpt._version import __version__
from kpt.registry import create, create_model, list_models
from kpt.registry import list as list  # explicit re-export: kpt.list is public API (DESIGN §4)

# `list` stays out of __all__: a star import must not shadow the builtin (use kpt.list).
__all__ = ["__version__", "create", "create_model", "list_models", "load_model"]


def load_model(path: str, map_location: str = "cpu") -> Any:
    """Load a model from a kpt checkpoint or weights file; the architecture is read from the file.

    Engine checkpoints and weights of plugin runs (``last.pt``, ``best.pt``, ``weights.safetensors``)
    are rebuilt through their plugin, bare backbones (``kpt.models.save_model``, ``kpt convert``) through
    the model registry; a run folder resolves to its weights. Files are read with safetensors or
    ``torch.load(weights_only=True)`` (never arbitrary pickles); unreadable or foreign files raise
    ``kpt.engine.weights.CheckpointError`` (a ``kpt.errors.UserError``) naming the file.
    """
    from kpt.engine.weights import load_model as _load

    return _load(path, map_location=map_location)
