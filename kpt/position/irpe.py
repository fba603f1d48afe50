"""Contextual iRPE on keys (Wu et al., ICCV 2021), the "irpe" baseline.

Each query builds its own bucket table from its content:

    T[b, h, i, m]   = q_scaled[b, h, i, :] · W[h, :, m]        W: (H, head_dim, nb), zero-init
    bias[b, h, i, j] = T[b, h, i, bucket(i, j)]

as ``vit_irpe/RPE/iRPE/irpe.py`` (mode "contextual", transposed, rpe on k) does. KP-RPE keeps
the same gather but predicts T from keypoints instead of from q. The official iRPE ViT config
also puts contextual RPE on q and v (``rpe_on: qkv``); kpt's baseline is the keys part only,
the one comparable with KP-RPE. A per-head W is used (``shared_head=False`` in iRPE terms).
"""

from __future__ import annotations

import torch
from torch import nn

from kpt.layers.windows import to_pair
from kpt.position.buckets import bucket_ids, gather_buckets, num_buckets

__all__ = ["ContextualRPE"]


class ContextualRPE(nn.Module):
    """Query-dependent relative position bias for one attention layer.

    Args:
        num_heads: H.
        head_dim: d.
        grid_size: token grid, int or (h, w) (global attention).
        ratio: iRPE ratio (1.9 gives 49 product buckets).
        window_size: int or (wh, ww) for windowed attention (window-local buckets).
        method: iRPE bucket method.
        skip: leading non-patch tokens (cls), which share one extra bucket.
    """

    def __init__(self, num_heads: int, head_dim: int, grid_size: int | tuple[int, int],
                 ratio: float = 1.9, window_size: int | tuple[int, int] | None = None,
                 method: str = "product", skip: int = 0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.grid_size = to_pair(grid_size, "grid_size")
        self.window_size = None if window_size is None else to_pair(window_size, "window_size")
        self.ratio, self.method, self.skip = ratio, method, skip
        self.num_buckets = num_buckets(method, ratio, skip)
        self.lookup_table_weight = nn.Parameter(torch.zeros(num_heads, head_dim, self.num_buckets))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, grid={self.grid_size}, "
                f"window={self.window_size}, buckets={self.num_buckets}")

    def forward(self, q_scaled: torch.Tensor) -> torch.Tensor:
        """Args:
            q_scaled: (B', H, L, d) queries already multiplied by the attention scale;
                L = skip + h·w (global) or wh·ww (windowed, B' = B·nW).

        Returns:
            (B', H, L, L) bias.
        """
        h, w = self.window_size or self.grid_size
        skip = 0 if self.window_size else self.skip
        length = skip + h * w
        if q_scaled.dim() != 4 or q_scaled.shape[1:] != (self.num_heads, length, self.head_dim):
            raise ValueError(f"ContextualRPE expects queries (B, {self.num_heads}, {length}, "
                             f"{self.head_dim}), got {tuple(q_scaled.shape)}")
        table = torch.matmul(q_scaled, self.lookup_table_weight.to(q_scaled.dtype))
        ids = bucket_ids(h, w, self.method, self.ratio, skip, device=q_scaled.device)
        return gather_buckets(table, ids)
