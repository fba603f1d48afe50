"""Multi-head self-attention with an additive logit bias (KP-RPE, RPE, iRPE, masks).

    out = softmax(q·kᵀ·scale + bias) · v        bias broadcastable to (B, H, N, N)

The bias is added after the 1/√d scaling and is not scaled (the official KP-RPE convention).

Which kernel computes it is picked per call by :func:`attend`:

* CUDA: ``F.scaled_dot_product_attention`` with the bias as a float ``attn_mask`` (fused
  kernels; the bias is one extra read). A FlexAttention ``score_mod`` that gathers the KP-RPE
  table inside the kernel would avoid materialising (B, H, N, N), but needs the table/bucket
  interface instead of a bias tensor and a GPU to test it; it is not implemented.
* CPU: measured on this project's 2-core CPU, 1 thread, interleaved, median of 15
  (ratio = manual / SDPA time, < 1: the manual softmax is faster; train = forward+backward with
  q, k, v and the bias requiring grad; bf16 = autocast, from a 7-iteration run):

  ==========================  =============  =============  =============  ==========
  shape (B, H, N, d)          fp32 eval      fp32 train     fp32 train     bf16 eval
                              with bias      with bias      no bias        with bias
  ==========================  =============  =============  =============  ==========
  ViT-S (32, 6, 196, 64)      1.29           0.78           1.19           12.7
  shallow (128, 4, 100, 16)   1.34           0.67           1.16           9.95
  Swin win (2048, 4, 25, 32)  1.05           0.75           0.90           6.66
  ==========================  =============  =============  =============  ==========

  So on CPU: SDPA for inference and for bf16/fp16 (bf16 matmuls outside SDPA are very slow on
  this CPU; bf16 training is 1.04-1.55x slower manual); in fp32 training the manual softmax when
  there is a bias (SDPA's CPU backward with a float mask is the slow part), SDPA without a bias
  except for short windows (N ≤ 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "attend", "attention_path"]

_PATHS = ("auto", "sdpa", "manual")


def attention_path(q: torch.Tensor, grad: bool | None = None, has_bias: bool = True) -> str:
    """The kernel :func:`attend` uses for ``q`` ("sdpa" or "manual"); see the module docstring."""
    if q.device.type != "cpu" or q.dtype != torch.float32:
        return "sdpa"
    grad = (torch.is_grad_enabled() and q.requires_grad) if grad is None else grad
    if not grad:
        return "sdpa"
    return "manual" if has_bias or q.shape[-2] <= 64 else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | None = None, dropout_p: float = 0.0, path: str = "auto") -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v on the fastest correct path.

    Args:
        q, k, v: (B, H, N, d) (any leading batch shape shared by the three).
        bias: additive logits, broadcastable to (B, H, N, N), or None. Cast to q's dtype.
        scale: logit scale; default d^−0.5. Pass 1.0 when q is already scaled.
        dropout_p: attention dropout probability (give 0 in eval).
        path: "auto" (see :func:`attention_path`), "sdpa" or "manual".

    Returns:
        (B, H, N, d) tensor.
    """
    if path not in _PATHS:
        raise ValueError(f"attention path must be one of {_PATHS}, got {path!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if path == "auto":
        needs_grad = q.requires_grad or (bias is not None and bias.requires_grad)
        path = attention_path(q, grad=torch.is_grad_enabled() and needs_grad,
                              has_bias=bias is not None)
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                              scale=scale)
    lead = q.shape[:-2]
    if bias is None or bias.shape[:-2] != lead:
        # no bias, or a broadcast one (plain RPE (1, H, N, N)): add without materialising copies
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
    else:
        # bias + scale·q·kᵀ in one BLAS call (no separate add pass): 0.92-0.97x the time of
        # matmul-then-add for fp32 training on this CPU (ViT-S / shallow shapes).
        n, d, nk = q.shape[-2], q.shape[-1], k.shape[-2]
        logits = torch.baddbmm(bias.reshape(-1, n, nk), q.reshape(-1, n, d),
                               k.reshape(-1, nk, d).transpose(1, 2), alpha=scale)
        logits = logits.view(*lead, n, nk)
    attn = logits.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


class Attention(nn.Module):
    """Global multi-head self-attention taking an additive bias (timm/CVLface layout).

    Args:
        dim: model width C.
        num_heads: H (head_dim = C / H).
        qkv_bias: bias in ``qkv`` (the official KP-RPE ViT has none).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after ``proj``.
        rpe: optional :class:`kpt.position.ContextualRPE` (contextual iRPE on keys): its bias,
            computed from the scaled queries, is added to ``bias``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, rpe: nn.Module | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe = rpe

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: (B, N, C) tokens.
            bias: additive logits broadcastable to (B, H, N, N) (e.g. a KP-RPE layer bias), or None.

        Returns:
            (B, N, C).
        """
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scale = self.scale
        if self.rpe is not None:
            q = q * self.scale  # iRPE reads the scaled queries, as official
            scale = 1.0
            extra = self.rpe(q)
            bias = extra if bias is None else bias + extra
        out = attend(q, k, v, bias, scale=scale,
                     dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
