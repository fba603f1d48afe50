"""Pieces shared by the kpt backbones: feature heads, weight init.

Every backbone in :mod:`kpt.models` is called as ``model(images, keypoints)``. The helpers here keep
the behaviour around that call identical across ViT and Swin:

* keypoints are checked once per forward by :func:`kpt.data.keypoints.check_keypoints`;
* :class:`FlattenBNHead` is the official CVLface face-embedding head (flatten all tokens, then
  Linear-BN-Linear-BN), submodules numbered ``0..3`` so official ``feature.{0..3}`` keys map 1:1;
* :func:`init_linear_layernorm` is the official/timm ViT init, skipping position encodings that
  carry their own (zero) init.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

logger = logging.getLogger(__name__)

HEAD_TYPES = ("flatten_bn", "avg", "cls")


class FlattenBNHead(nn.Sequential):
    """Official CVLface face head: token-major flatten → Linear → BN → Linear → BN.

    Input (B, N, D) tokens (after the final norm); output (B, out_dim), un-normalised embedding.
    Submodules ``0`` Linear(N·D, D, no bias), ``1`` BatchNorm1d(D, eps 2e-5), ``2`` Linear(D,
    out_dim, no bias), ``3`` BatchNorm1d(out_dim, eps 2e-5) — the official ``feature.{0..3}`` keys.
    """

    def __init__(self, num_tokens: int, dim: int, out_dim: int, hidden_dim: int | None = None):
        hidden_dim = hidden_dim or dim
        super().__init__(
            nn.Linear(num_tokens * dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim, eps=2e-5),
            nn.Linear(hidden_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim, eps=2e-5),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return super().forward(tokens.flatten(1))


def final_norm(norm: nn.LayerNorm, x: Tensor, fp32: bool) -> Tensor:
    """Apply the final LayerNorm, in float32 when ``fp32`` (the official ``self.norm(x.float())``).

    Written with ``F.layer_norm`` on float32 copies of the affine parameters so it also works for a
    model cast to bf16/fp16 (the official code would fail there). Output stays float32, as official.

    Args:
        norm: the LayerNorm module. x: (..., D) tokens. fp32: compute in float32.
    Returns:
        (..., D) normalised tokens.
    """
    if not fp32:
        return norm(x)
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


def head_input_dtype(x: Tensor, head: nn.Module) -> Tensor:
    """Cast float32 features to the head's parameter dtype when the model is half precision."""
    param = next(head.parameters(), None)
    if param is not None and param.dtype != x.dtype and not torch.is_autocast_enabled():
        return x.to(param.dtype)
    return x


def init_linear_layernorm(module: nn.Module, skip: tuple[type, ...] = ()) -> None:
    """Official ViT init: Linear weights trunc-normal(std 0.02) with bias 0, LayerNorm 1/0.

    Modules that are instances of ``skip`` (position encodings with their own init, e.g. the
    zero-initialised KP-RPE linear) and everything inside them are left untouched. Conv and
    BatchNorm keep PyTorch defaults, as in the official code.
    """
    skipped: set[int] = set()
    for sub in module.modules():
        if skip and isinstance(sub, skip):
            skipped.update(id(m) for m in sub.modules())
    for sub in module.modules():
        if id(sub) in skipped:
            continue
        if isinstance(sub, nn.Linear):
            trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm) and sub.elementwise_affine:
            nn.init.ones_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def stochastic_depth(rate: float, depth: int) -> list[float]:
    """Per-block drop-path rates, linearly increasing from 0 to ``rate`` (official/timm rule)."""
    if depth <= 1:
        return [0.0] * depth
    # plain Python (not torch.linspace) so models can be built under torch.device("meta")
    return [rate * i / (depth - 1) for i in range(depth)]
