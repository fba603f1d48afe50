"""Input handling shared by the metrics: tensors or arrays in, validated float64/bool numpy out.

Every metric in :mod:`kpt.metrics` accepts ``torch.Tensor`` (any device, any float dtype, with or without
grad) or anything ``numpy.asarray`` understands. The computations run in float64 numpy: evaluation sets are
small enough, and float64 keeps ties and threshold comparisons deterministic across devices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence; kept loose so torch stays an optional import here


def to_numpy(x: ArrayLike, name: str, dtype: Any = np.float64) -> np.ndarray:
    """Convert ``x`` (tensor, array or sequence) to a numpy array of ``dtype``.

    Args:
        x: a ``torch.Tensor`` (detached and moved to the CPU here) or an array-like.
        name: the argument's name, used in error messages.
        dtype: target dtype (float64 by default).

    Raises:
        TypeError: when ``x`` cannot be converted.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()  # numpy has no bfloat16; float16 goes through float32 for exact conversion
        x = x.numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a tensor or array convertible to {np.dtype(dtype)}, "
                        f"got {type(x).__name__} ({exc})") from exc


def as_features(x: ArrayLike, name: str, parts: bool = False) -> np.ndarray:
    """Features as float64 ``(n, D)`` (or ``(n, P, D)`` when ``parts``); checks finiteness.

    Raises:
        ValueError: naming the argument, on a wrong rank, an empty array or NaN/inf values.
    """
    arr = to_numpy(x, name)
    allowed = (2, 3) if parts else (2,)
    if arr.ndim not in allowed:
        shapes = "(n, D) or (n, P, D)" if parts else "(n, D)"
        raise ValueError(f"{name}: expected shape {shapes}, got {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[-1] == 0:
        raise ValueError(f"{name}: empty features {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf")
    return arr


def as_labels(x: ArrayLike, name: str, length: int | None = None) -> np.ndarray:
    """Labels as a 1-D numpy array (any comparable dtype; strings allowed) of ``length`` items.

    Raises:
        ValueError: naming the argument, on a wrong shape or length.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 2 and 1 in arr.shape:  # (n, 1) or (1, n) column/row vectors
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D label array, got shape {tuple(arr.shape)}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name}: expected {length} labels (one per feature row), got {arr.shape[0]}")
    return arr


def as_bool(x: ArrayLike, name: str, length: int | None = None) -> np.ndarray:
    """Binary labels (bool, 0/1 ints or floats) as a 1-D bool array.

    Raises:
        ValueError: when values other than 0/1 appear or the length is wrong.
    """
    arr = as_labels(x, name, length)
    if arr.dtype != np.bool_:
        values = np.unique(arr)
        if not np.all(np.isin(values, (0, 1))):
            raise ValueError(f"{name}: expected booleans or 0/1 values, found {values[:5].tolist()}")
        arr = arr.astype(bool)
    return arr


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x / max(||x||, eps)`` along ``axis`` (the same guard as ``torch.nn.functional.normalize``)."""
    norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True))
    return x / np.maximum(norm, eps)
