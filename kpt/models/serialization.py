"""Bare backbones saved with their registered name and kwargs: the names kept from before the merge.

The format, writer and loader live in :mod:`kpt.engine.checkpoint` (one header schema for run weights
and bare models); files of the older ``kpt-model`` schema still load. ``kpt.load_model`` reads both.
"""

from kpt.engine.weights import (
    LEGACY_MODEL_FORMAT,
    is_model_file,
    load_model,
    read_header,
    save_model,
)

__all__ = ["LEGACY_MODEL_FORMAT", "is_model_file", "load_model", "read_header", "save_model"]
