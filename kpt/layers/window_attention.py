"""Window multi-head self-attention (Swin V1, or Swin V2 cosine attention) with an additive bias.

Works on windows already cut by :func:`kpt.layers.windows.window_partition` (after padding and
the cyclic roll of shifted blocks). Per window, logits get

    logits = q·kᵀ/√d                        (V1)  or  cos(q, k)·exp(min(logit_scale, ln 100))  (V2)
    logits += bias                          (KP-RPE / RPE / iRPE; not scaled)
    logits += mask                          (−100 between regions of a shifted window)

and then softmax, as the official Swin-KPRPE (torchvision ``shifted_window_attention``). There
is no built-in position table: KP-RPE replaces Swin-V2's continuous position bias, and the
plain RPE / iRPE baselines come from :mod:`kpt.position` through ``bias`` / ``rpe``.
The kernel choice is :func:`kpt.layers.attention.attend`'s (see its measurements).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kpt.layers.attention import attend
from kpt.layers.windows import to_pair

__all__ = ["WindowAttention", "add_window_mask"]


def add_window_mask(bias: torch.Tensor | None, mask: torch.Tensor | None, num_rows: int
                    ) -> torch.Tensor | None:
    """Combine a window bias with the shifted-window mask.

    Args:
        bias: (B·nW | 1, H | 1, n, n) or None.
        mask: (nW, n, n) or None; window w of every sample gets mask[w].
        num_rows: B·nW, the number of windows in the batch.

    Returns:
        (B·nW, H | 1, n, n) (or ``bias`` unchanged when there is no mask).
    """
    if mask is None:
        return bias
    num_windows, n, _ = mask.shape
    if num_rows % num_windows:
        raise ValueError(f"{num_rows} windows in the batch is not a multiple of the mask's "
                         f"{num_windows} windows per sample")
    samples = num_rows // num_windows
    mask = mask.to(bias.dtype if bias is not None else mask.dtype)
    if bias is not None and bias.shape[0] == num_rows:
        heads = bias.shape[1]
        return (bias.view(samples, num_windows, heads, n, n) + mask[None, :, None]).view(
            num_rows, heads, n, n)
    tiled = mask.unsqueeze(1).repeat(samples, 1, 1, 1)  # (B·nW, 1, n, n), batch-major
    return tiled if bias is None else bias + tiled


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows.

    Args:
        dim: channels C.
        num_heads: H.
        window_size: int or (wh, ww); windows hold wh·ww tokens.
        qkv_bias: bias in ``qkv``. With ``cosine=True`` the key part of it is not used (Swin V2).
        cosine: Swin-V2 scaled cosine attention with a learned per-head ``logit_scale``
            (init ln 10, clamped at ln 100).
        rpe: optional contextual iRPE module (:class:`kpt.position.ContextualRPE` built with
            this ``window_size``); its bias from the scaled queries is added.
        attn_drop, proj_drop: dropout probabilities.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | tuple[int, int],
                 qkv_bias: bool = True, cosine: bool = False, rpe: nn.Module | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = to_pair(window_size, "window_size")
        self.cosine = cosine
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe = rpe
        if cosine:
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.qkv.bias
        if self.cosine and bias is not None:
            # Swin V2 keeps the key bias out: a constant on k shifts nothing useful in cos(q, k)
            length = self.dim
            bias = torch.cat([bias[:length], torch.zeros_like(bias[length:2 * length]),
                              bias[2 * length:]])
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: (B·nW, wh·ww, C) windows.
            bias: (B·nW | 1, H | 1, wh·ww, wh·ww) additive logits or None.
            mask: (nW, wh·ww, wh·ww) shifted-window mask or None.

        Returns:
            (B·nW, wh·ww, C).
        """
        rows, n, c = x.shape
        if n != self.window_size[0] * self.window_size[1]:
            raise ValueError(f"windows hold {n} tokens, expected {self.window_size[0]}x"
                             f"{self.window_size[1]}")
        qkv = self._qkv(x).reshape(rows, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.cosine:
            scale_h = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            q = F.normalize(q, dim=-1) * scale_h.to(q.dtype)
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            q = q * self.head_dim ** -0.5
            scale = 1.0
        if self.rpe is not None:
            extra = self.rpe(q)
            bias = extra if bias is None else bias + extra
        bias = add_window_mask(bias, mask, rows)
        out = attend(q, k, v, bias, scale=scale,
                     dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(rows, n, c)))
