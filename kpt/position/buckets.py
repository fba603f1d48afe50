"""Relative-position buckets of iRPE (Wu et al., ICCV 2021), as used by KP-RPE.

A pair of tokens (query i, key j) on a 2-D grid has the integer offset
(Δrow, Δcol) = pos_i − pos_j. iRPE maps that offset to a *bucket* id; a position
encoding then keeps one learned (or keypoint-predicted) value per bucket.

Distances are compressed by the piecewise index φ: exact for |d| ≤ alpha, logarithmic
beyond, clipped at int(beta). With ``ratio`` r: alpha = r, beta = 2r, gamma = 8r. The
official KP-RPE setting r = 1.9 gives φ(|d|) = 0, 1, 2, 2, 3, 3, ... and 49 product buckets.

Methods (``method`` argument):

* ``"product"`` (default, the official KP-RPE choice): id = (φ(Δrow) + β)·(2β + 1) + φ(Δcol) + β
  with β = int(beta); (2β + 1)² buckets.
* ``"euclidean"`` (alias ``"euc"``): φ(round(√(Δrow² + Δcol²))) + β; 2β + 1 buckets.
* ``"quant"``: φ(Δrow² + Δcol²) + β (squared distance, no root, as official); 2β + 1 buckets.
* ``"cross"``: two tables, one for rows and one for columns, whose gathers are summed.
  kpt stores both in one table of width 2·(2β + 1): row ids in [0, 2β + 1), column ids in
  [2β + 1, 2·(2β + 1)); :func:`bucket_ids` then returns a (2, L, L) stack and consumers sum
  the two gathers (see :func:`gather_buckets`).

``skip`` leading non-patch tokens (a cls token) all share one extra bucket per table (id
``num_buckets(skip=0)`` for the single-table methods), as in iRPE's ``get_bucket_ids_2d``.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "METHODS",
    "bucket_ids",
    "gather_buckets",
    "num_buckets",
    "piecewise_coefficients",
    "piecewise_index",
]

METHODS = ("product", "euclidean", "quant", "cross")
_ALIASES = {"euc": "euclidean", "product": "product", "euclidean": "euclidean",
            "quant": "quant", "cross": "cross"}


def _canonical_method(method: str) -> str:
    key = str(method).lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown iRPE bucket method {method!r}; expected one of {', '.join(METHODS)}"
        )
    return _ALIASES[key]


def piecewise_coefficients(ratio: float) -> tuple[float, float, float]:
    """Return (alpha, beta, gamma) = (r, 2r, 8r) for the iRPE ``ratio`` r."""
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio!r}")
    return 1.0 * ratio, 2.0 * ratio, 8.0 * ratio


def piecewise_index(d: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """iRPE piecewise index φ of relative distances (iRPE Eq. 18, official rounding).

    Args:
        d: relative distances, any shape, integer or floating dtype.
        alpha, beta, gamma: piecewise coefficients (see :func:`piecewise_coefficients`).

    Returns:
        LongTensor of the shape of ``d`` with values in [−int(beta), int(beta)]:
        ``round(d)`` (half to even) where |d| ≤ alpha, otherwise
        ``trunc(sign(d)·min(round(alpha + ln(|d|/alpha)/ln(gamma/alpha)·(beta − alpha)), beta))``.
        The truncation is the official cast to long: a clip at beta = 3.8 becomes 3.
    """
    # Integer inputs are promoted to float32 exactly as the official division does.
    work = d if d.is_floating_point() else d.to(torch.float32)
    magnitude = work.abs()
    near = magnitude <= alpha
    # log(0) = -inf only occurs where `near` holds; torch.where discards those lanes.
    far = alpha + torch.log(magnitude / alpha) / math.log(gamma / alpha) * (beta - alpha)
    far = torch.sign(work) * far.round().clamp(max=beta)
    near_value = work.round() if d.is_floating_point() else work
    return torch.where(near, near_value, far).to(torch.long)


def num_buckets(method: str = "product", ratio: float = 1.9, skip: int = 0) -> int:
    """Width of the bucket table for ``method`` (49 for the official product, r = 1.9).

    For ``"cross"`` this is the width of kpt's joint rows+columns table (twice the
    per-direction count). ``skip > 0`` adds one extra bucket per table for the leading tokens.
    """
    method = _canonical_method(method)
    _, beta, _ = piecewise_coefficients(ratio)
    side = 2 * int(beta) + 1
    extra = 1 if skip > 0 else 0
    if method == "product":
        return side * side + extra
    if method == "cross":
        return 2 * (side + extra)
    return side + extra


def _grid_offsets(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(L, L, 2) integer offsets (Δrow, Δcol) = pos_query − pos_key, row-major tokens."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    pos = torch.stack([rows, cols], dim=-1)
    return pos[:, None, :] - pos[None, :, :]


@functools.lru_cache(maxsize=64)
def _cached_bucket_ids(height: int, width: int, method: str, ratio: float, skip: int,
                       device: str) -> torch.Tensor:
    alpha, beta, gamma = piecewise_coefficients(ratio)
    beta_int = int(beta)
    side = 2 * beta_int + 1
    diff = _grid_offsets(height, width, torch.device(device))
    if method == "product":
        rows = piecewise_index(diff[..., 0], alpha, beta, gamma) + beta_int
        cols = piecewise_index(diff[..., 1], alpha, beta, gamma) + beta_int
        tables = [rows * side + cols]
    elif method == "euclidean":
        dist = diff.square().sum(-1).float().sqrt().round()
        tables = [piecewise_index(dist, alpha, beta, gamma) + beta_int]
    elif method == "quant":
        tables = [piecewise_index(diff.square().sum(-1), alpha, beta, gamma) + beta_int]
    else:  # cross: rows table first, columns table offset behind it
        per_table = side + (1 if skip > 0 else 0)
        tables = [piecewise_index(diff[..., 0], alpha, beta, gamma) + beta_int,
                  piecewise_index(diff[..., 1], alpha, beta, gamma) + beta_int + per_table]
    if skip > 0:
        extended = []
        for t, table in enumerate(tables):
            extra_id = side * side if method == "product" else side + t * (side + 1)
            full = torch.full((skip + height * width,) * 2, extra_id, dtype=torch.long,
                              device=table.device)
            full[skip:, skip:] = table
            extended.append(full)
        tables = extended
    ids = tables[0] if len(tables) == 1 else torch.stack(tables)
    return ids.contiguous()


def bucket_ids(height: int, width: int, method: str = "product", ratio: float = 1.9,
               skip: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Bucket id of every (query, key) pair of a row-major ``height``×``width`` grid.

    Results are cached per (grid, method, ratio, skip, device); treat them as read-only.

    Args:
        height, width: grid size in tokens (rectangular grids allowed).
        method: ``"product"``, ``"euclidean"``, ``"quant"`` or ``"cross"``.
        ratio: iRPE ratio r (alpha = r, beta = 2r, gamma = 8r).
        skip: number of leading non-patch tokens (cls); they get the extra bucket.
        device: where the ids live (default CPU).

    Returns:
        LongTensor (skip + h·w, skip + h·w) with ids in [0, num_buckets(method, ratio, skip)),
        or (2, skip + h·w, skip + h·w) for ``"cross"`` (rows table, columns table).
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1, got {height}x{width}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _cached_bucket_ids(int(height), int(width), _canonical_method(method), float(ratio),
                              int(skip), str(dev))


def gather_buckets(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Look up per-query bucket tables: ``out[..., i, j] = table[..., i, ids[i, j]]``.

    Args:
        table: (..., Lq, nb) per-query tables (e.g. (B, H, N, nb)).
        ids: (Lq, Lk) bucket ids, or (2, Lq, Lk) for the cross method (the gathers are summed).

    Returns:
        (..., Lq, Lk) tensor in the dtype of ``table``.
    """
    if ids.dim() == 3:
        return sum(gather_buckets(table, part) for part in ids)
    lead = table.shape[:-2]
    index = ids.expand(*lead, *ids.shape)
    return torch.gather(table, -1, index)
