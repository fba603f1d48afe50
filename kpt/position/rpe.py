"""Plain relative position bias: a learned value per head and iRPE bucket (the "rpe" baseline).

    bias[h, i, j] = table[h, bucket(i, j)]          table: (H, nb), zero-initialised

This is iRPE's "bias" mode on keys (Wu et al., ICCV 2021) with product buckets, the same buckets
KP-RPE uses, so the two differ only in where the table comes from (learned constant here,
predicted from keypoints per query there). Models keep one module per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from kpt.layers.windows import to_pair
from kpt.position.buckets import bucket_ids, gather_buckets, num_buckets

__all__ = ["RelativePositionBias"]


class RelativePositionBias(nn.Module):
    """Learned per-head bucket bias for one attention layer.

    Args:
        num_heads: H.
        grid_size: token grid, int or (h, w) (used when ``window_size`` is None).
        ratio: iRPE ratio (1.9 gives 49 product buckets).
        window_size: for windowed attention, int or (wh, ww): buckets are window-local and the
            same bias serves every window.
        method: iRPE bucket method.
        skip: leading non-patch tokens (cls) that get one extra learned bucket.
    """

    def __init__(self, num_heads: int, grid_size: int | tuple[int, int], ratio: float = 1.9,
                 window_size: int | tuple[int, int] | None = None, method: str = "product",
                 skip: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.grid_size = to_pair(grid_size, "grid_size")
        self.window_size = None if window_size is None else to_pair(window_size, "window_size")
        self.ratio, self.method, self.skip = ratio, method, skip
        self.num_buckets = num_buckets(method, ratio, skip)
        self.lookup_table_bias = nn.Parameter(torch.zeros(num_heads, self.num_buckets))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, grid={self.grid_size}, window={self.window_size}, "
                f"buckets={self.num_buckets}")

    def forward(self) -> torch.Tensor:
        """Returns (1, H, L, L): L = skip + h·w (global) or wh·ww (windowed)."""
        h, w = self.window_size or self.grid_size
        skip = 0 if self.window_size else self.skip
        ids = bucket_ids(h, w, self.method, self.ratio, skip, device=self.lookup_table_bias.device)
        length = ids.shape[-1]
        table = self.lookup_table_bias[None, :, None, :].expand(1, self.num_heads, length, -1)
        return gather_buckets(table, ids)
