"""Baselines: pos option parser, absolute embedding, plain RPE, contextual iRPE."""

import pytest
import torch

from kpt.layers import Attention, WindowAttention
from kpt.position import (
    POS_CHOICES,
    AbsolutePositionEmbedding,
    ContextualRPE,
    RelativePositionBias,
    bucket_ids,
    parse_pos,
)

torch.manual_seed(0)


def test_parse_pos_every_choice_and_errors():
    expected = {"none": (False, None), "abs": (True, None), "rpe": (False, "rpe"),
                "irpe": (False, "irpe"), "kprpe": (False, "kprpe"), "abs+rpe": (True, "rpe"),
                "abs+irpe": (True, "irpe"), "abs+kprpe": (True, "kprpe")}
    assert set(expected) == set(POS_CHOICES)
    for name, parsed in expected.items():
        assert parse_pos(name) == parsed
    assert parse_pos(" ABS+KPRPE ") == (True, "kprpe")
    with pytest.raises(ValueError, match="expected one of"):
        parse_pos("kprpe+abs")


def test_absolute_embedding_init_and_add():
    pe = AbsolutePositionEmbedding(1000, 64)
    assert pe.pos_embed.shape == (1, 1000, 64)
    assert 0.015 < pe.pos_embed.std().item() < 0.025  # timm trunc_normal_(std=0.02)
    x = torch.randn(2, 1000, 64)
    assert torch.equal(pe(x), x + pe.pos_embed)
    with pytest.raises(ValueError, match="covers"):
        pe(torch.randn(2, 999, 64))


def test_relative_position_bias_lookup_global_window_and_skip():
    rpe = RelativePositionBias(3, (4, 5))
    assert rpe.lookup_table_bias.shape == (3, 49) and rpe().abs().sum() == 0
    with torch.no_grad():
        rpe.lookup_table_bias.normal_()
    bias = rpe()
    ids = bucket_ids(4, 5)
    assert bias.shape == (1, 3, 20, 20)
    assert torch.equal(bias[0, 2], rpe.lookup_table_bias[2][ids])
    bias.sum().backward()
    assert rpe.lookup_table_bias.grad.sum() == 3 * 400  # every pair counted once per head
    win = RelativePositionBias(2, 37, window_size=5)
    assert win().shape == (1, 2, 25, 25)
    cls = RelativePositionBias(2, 3, skip=1)
    with torch.no_grad():
        cls.lookup_table_bias.copy_(torch.arange(100.0).view(2, 50))
    out = cls()
    assert out.shape == (1, 2, 10, 10)
    assert out[0, 1, 0].eq(99).all() and out[0, 0, :, 0].eq(49).all()


def test_contextual_rpe_matches_the_formula_and_is_zero_at_init():
    heads, d = 2, 8
    irpe = ContextualRPE(heads, d, (3, 4))
    q = torch.randn(5, heads, 12, d)
    assert irpe(q).abs().sum() == 0
    with torch.no_grad():
        irpe.lookup_table_weight.normal_()
    bias = irpe(q)
    ids = bucket_ids(3, 4)
    b, h, i, j = 4, 1, 7, 2
    expected = q[b, h, i] @ irpe.lookup_table_weight[h, :, ids[i, j]]
    assert bias.shape == (5, heads, 12, 12) and torch.allclose(bias[b, h, i, j], expected)
    with pytest.raises(ValueError, match="expects queries"):
        irpe(torch.randn(5, heads, 13, d))


def test_contextual_rpe_inside_attention_learns_and_uses_scaled_queries():
    irpe = ContextualRPE(2, 8, 3)
    attn = Attention(16, 2, rpe=irpe)
    x = torch.randn(2, 9, 16)
    base = attn(x)
    with torch.no_grad():
        irpe.lookup_table_weight.normal_()
    out = attn(x)
    assert not torch.allclose(base, out)
    out.sum().backward()
    assert irpe.lookup_table_weight.grad.abs().sum() > 0
    win = WindowAttention(16, 2, 3, rpe=ContextualRPE(2, 8, 9, window_size=3))
    assert win(torch.randn(4, 9, 16)).shape == (4, 9, 16)
