"""Attention and WindowAttention against straightforward reference formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from kpt.layers import Attention, WindowAttention, attend, attention_path, shifted_window_mask

torch.manual_seed(0)


def reference(x, qkv_w, qkv_b, proj, heads, bias):
    b, n, c = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = q @ k.transpose(-1, -2) / math.sqrt(c // heads)
    if bias is not None:
        logits = logits + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return proj(out)


@pytest.mark.parametrize("bias_shape", [None, (2, 4, 9, 9), (1, 4, 9, 9), (2, 1, 9, 9)])
def test_attention_adds_unscaled_bias_after_scaling(bias_shape):
    attn = Attention(32, 4, qkv_bias=False)
    x = torch.randn(2, 9, 32)
    bias = None if bias_shape is None else torch.randn(bias_shape) * 3
    out = attn(x, bias)
    ref = reference(x, attn.qkv.weight, None, attn.proj, 4, bias)
    assert out.shape == (2, 9, 32) and torch.allclose(out, ref, atol=1e-5)
    assert attn.qkv.bias is None and attn.qkv.out_features == 96


@pytest.mark.parametrize("grad", [False, True])
def test_sdpa_and_manual_paths_agree_in_value_and_gradient(grad):
    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=grad) for _ in range(3))
    bias = torch.randn(2, 3, 7, 7, requires_grad=grad)
    a = attend(q, k, v, bias, path="sdpa")
    b = attend(q, k, v, bias, path="manual")
    assert torch.allclose(a, b, atol=1e-5)
    if grad:
        ga = torch.autograd.grad(a.sum(), [q, bias])
        gb = torch.autograd.grad(b.sum(), [q, bias])
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))
    with pytest.raises(ValueError, match="attention path"):
        attend(q, k, v, path="flash")


def test_path_rule_on_cpu():
    q = torch.randn(1, 1, 2, 4)
    assert attention_path(q, grad=False) == "sdpa"
    assert attention_path(q, grad=True) == "manual"
    assert attention_path(q.bfloat16(), grad=True) == "sdpa"
    long = torch.randn(1, 1, 100, 4)
    assert attention_path(long, grad=True, has_bias=False) == "sdpa"
    assert attention_path(q, grad=True, has_bias=False) == "manual"  # short windows


def test_attention_bf16_autocast_runs_with_fp32_bias():
    attn = Attention(16, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(torch.randn(2, 5, 16), torch.randn(2, 2, 5, 5))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def window_reference(attn, x, bias, mask, cosine):
    rows, n, c = x.shape
    h = attn.num_heads
    qkv_b = attn.qkv.bias.clone()
    if cosine:
        qkv_b[c:2 * c] = 0
    q, k, v = F.linear(x, attn.qkv.weight, qkv_b).view(rows, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    if cosine:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = logits * attn.logit_scale.clamp(max=math.log(100)).exp()
    else:
        logits = (q * (c // h) ** -0.5) @ k.transpose(-1, -2)
    logits = logits + bias
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(rows // nw, nw, h, n, n) + mask[None, :, None]).view(rows, h, n, n)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(rows, n, c)
    return attn.proj(out)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("bias_heads", [1, 2])
def test_window_attention_with_bias_and_shift_mask(cosine, bias_heads):
    attn = WindowAttention(16, 2, (2, 3), cosine=cosine)
    with torch.no_grad():
        attn.qkv.bias.normal_()
        if cosine:
            attn.logit_scale.copy_(torch.tensor([[[1.0]], [[5.0]]]))  # 5 > ln 100: clamped
    mask = shifted_window_mask(4, 6, (2, 3), (1, 1))  # 4 windows per sample
    x = torch.randn(3 * 4, 6, 16)
    bias = torch.randn(12, bias_heads, 6, 6)
    out = attn(x, bias, mask)
    assert out.shape == x.shape
    assert torch.allclose(out, window_reference(attn, x, bias, mask, cosine), atol=1e-5)
    shared = torch.randn(1, 2, 6, 6)  # one bias for all windows (plain RPE)
    assert torch.allclose(attn(x, shared, mask), window_reference(attn, x, shared, mask, cosine),
                          atol=1e-5)
    with pytest.raises(ValueError, match="windows hold"):
        attn(torch.randn(4, 5, 16))
