"""iRPE buckets against the hand-worked cases of the KP-RPE reference (§1.2-1.5)."""

import itertools

import pytest
import torch

from kpt.position.buckets import (
    bucket_ids,
    gather_buckets,
    num_buckets,
    piecewise_coefficients,
    piecewise_index,
)


def phi(values, ratio=1.9):
    return piecewise_index(torch.tensor(values), *piecewise_coefficients(ratio)).tolist()


def test_piecewise_official_ratio_on_integer_offsets():
    # |d| 0,1,2,3 -> 0,1,2,2 ; 4..13 -> 3 (beta 3.8 truncated to 3), negatives mirrored
    assert phi(list(range(14))) == [0, 1, 2, 2] + [3] * 10
    assert phi([-1, -2, -3, -4, -13]) == [-1, -2, -2, -3, -3]


@pytest.mark.parametrize("ratio,expected_max", [(1.0, 2), (2.8, 5), (3.8, 6)])
def test_piecewise_other_ratios_on_14_grid(ratio, expected_max):
    out = phi(list(range(14)), ratio)
    assert max(out) == expected_max
    assert out[:2] == [0, 1]
    assert all(b >= a for a, b in itertools.pairwise(out))  # monotone


def test_piecewise_float_rounding_is_half_to_even_near_and_truncated_far():
    out = phi([0.5, 1.5, -1.5, 2.5, 100.0])
    assert out == [0, 2, -2, 2, 3]  # 0.5->0, 1.5->2 (near: |d| <= 1.9), 2.5 -> far branch, clip
    assert piecewise_index(torch.tensor([1.9]), 1.9, 3.8, 15.2).dtype == torch.long


def test_num_buckets_per_method():
    assert num_buckets() == 49
    assert num_buckets("product", skip=1) == 50
    assert num_buckets("euclidean") == num_buckets("euc") == num_buckets("quant") == 7
    assert num_buckets("cross") == 14
    assert num_buckets("product", ratio=2.8) == 121
    with pytest.raises(ValueError, match="unknown iRPE bucket method"):
        num_buckets("manhattan")


def test_product_row_of_query_zero_on_14_grid():
    ids = bucket_ids(14, 14)
    assert ids.shape == (196, 196) and ids.dtype == torch.long
    assert ids[0, :15].tolist() == [24, 23, 22, 22] + [21] * 10 + [17]
    assert ids.diagonal().eq(24).all()  # same position
    assert ids.unique().numel() == 49  # every product bucket used on 14x14


def test_product_formula_and_antisymmetry():
    ids = bucket_ids(6, 9)  # rectangular, row-major
    n = torch.arange(54)
    rows, cols = n // 9, n % 9
    a, b, g = piecewise_coefficients(1.9)
    dr = piecewise_index(rows[:, None] - rows[None], a, b, g) + 3
    dc = piecewise_index(cols[:, None] - cols[None], a, b, g) + 3
    assert torch.equal(ids, dr * 7 + dc)
    assert torch.equal(ids + ids.T, torch.full_like(ids, 48))  # offset negation mirrors ids


def test_euclidean_and_quant_use_rounded_root_and_squared_distance():
    euc = bucket_ids(5, 5, "euclidean")[0].view(5, 5)
    quant = bucket_ids(5, 5, "quant")[0].view(5, 5)
    # query (0,0): euclidean distance of key (1,1) is round(1.414)=1 -> phi 1 -> id 4
    assert euc[1, 1] == 4 and euc[0, 2] == 5
    assert euc[2, 2] == 5 and euc[0, 4] == 6  # round(2.83)=3 -> phi 2 ; 4 -> phi 3
    assert quant[1, 1] == 5  # squared distance 2 -> phi 2 -> id 5
    assert quant[0, 1] == 4 and quant[0, 2] == 6  # 1 -> 1 ; 4 -> 3
    assert euc.min() >= 3 and quant.min() >= 3  # distances are non-negative


def test_cross_stacks_rows_and_columns_tables():
    ids = bucket_ids(4, 4, "cross")
    assert ids.shape == (2, 16, 16)
    assert ids[0].max() < 7 and ids[1].min() >= 7 and ids[1].max() < 14
    table = torch.randn(2, 16, 14)
    out = gather_buckets(table, ids)
    expected = torch.gather(table, -1, ids[0].expand(2, 16, 16)) + torch.gather(
        table, -1, ids[1].expand(2, 16, 16))
    assert torch.allclose(out, expected)


def test_skip_tokens_share_one_extra_bucket():
    ids = bucket_ids(3, 3, skip=2)
    assert ids.shape == (11, 11)
    assert ids[:2].eq(49).all() and ids[:, :2].eq(49).all()
    assert torch.equal(ids[2:, 2:], bucket_ids(3, 3))
    cross = bucket_ids(3, 3, "cross", skip=1)
    assert cross[0, 0].eq(7).all() and cross[1, :, 0].eq(15).all()
    assert cross.max() < num_buckets("cross", skip=1)


def test_cache_returns_same_object_and_respects_device_and_size():
    assert bucket_ids(7, 7) is bucket_ids(7, 7)
    assert bucket_ids(7, 8).shape == (56, 56)
    assert bucket_ids(5, 5, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError):
        bucket_ids(0, 3)


def test_gather_buckets_matches_definition():
    ids = bucket_ids(3, 4)
    table = torch.randn(2, 3, 12, 49)
    out = gather_buckets(table, ids)
    b, h, i, j = 1, 2, 5, 7
    assert out.shape == (2, 3, 12, 12)
    assert out[b, h, i, j] == table[b, h, i, ids[i, j]]
