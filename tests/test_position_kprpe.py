"""KeypointRPE: table layout, geometry properties, windows, variants, gradients, validation."""

import pytest
import torch

from kpt.position import KeypointRPE, bucket_ids
from kpt.position.kprpe import VARIANTS, patch_centres

torch.manual_seed(0)


def randomise(module: KeypointRPE, seed: int = 0) -> KeypointRPE:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.linear.weight.copy_(torch.randn(module.linear.weight.shape, generator=gen))
        module.linear.bias.copy_(torch.randn(module.linear.bias.shape, generator=gen))
    return module


@pytest.mark.parametrize("variant,out", [("rel", 49), ("rel_splithead", 3 * 49),
                                         ("rel_unshared", 4 * 49),
                                         ("rel_splithead_unshared", 4 * 3 * 49)])
def test_linear_size_zero_init_and_zero_bias(variant, out):
    rpe = KeypointRPE(5, 3, 4, 6, variant=variant)
    assert rpe.linear.in_features == 10 and rpe.linear.out_features == out
    assert rpe.linear.weight.abs().sum() == 0 and rpe.linear.bias.abs().sum() == 0
    biases = rpe(torch.rand(2, 5, 2))
    assert len(biases) == 4 and all(b.abs().sum() == 0 for b in biases)
    assert set(rpe.state_dict()) == {"linear.weight", "linear.bias"}  # grid is not saved


def test_table_rows_ordered_layer_head_bucket():
    depth, heads, nb = 3, 2, 49
    rpe = KeypointRPE(2, heads, depth, (4, 5))
    code = torch.tensor([[layer * 1000 + h * 100 + m for h in range(heads) for m in range(nb)]
                         for layer in range(depth)], dtype=torch.float32).flatten()
    with torch.no_grad():
        rpe.linear.bias.copy_(code)
    ids = bucket_ids(4, 5).float()
    for layer, bias in enumerate(rpe(torch.rand(2, 2, 2))):
        assert bias.shape == (2, heads, 20, 20)
        for h in range(heads):
            assert torch.equal(bias[1, h], layer * 1000 + h * 100 + ids)


def test_relative_features_are_patch_minus_keypoint_keypoint_major():
    rpe = KeypointRPE(2, 1, 1, (2, 3))
    kp = torch.tensor([[[0.1, 0.2], [0.7, 0.9]]])
    rel = rpe.relative_keypoints(kp)
    assert rel.shape == (1, 6, 4)
    grid = patch_centres(2, 3)
    assert torch.allclose(grid[1], torch.tensor([1.5 / 3, 0.5 / 2]))  # token 1 = row 0, col 1
    assert torch.allclose(grid[3], torch.tensor([0.5 / 3, 1.5 / 2]))  # token 3 = row 1, col 0
    expected = torch.cat([grid - kp[0, 0], grid - kp[0, 1]], dim=-1)  # [dx0, dy0, dx1, dy1]
    assert torch.allclose(rel[0], expected)


def test_bias_row_from_query_table_and_product_bucket():
    rpe = randomise(KeypointRPE(3, 2, 2, (5, 4)))
    kp = torch.rand(2, 3, 2)
    tables = rpe.tables(kp).view(2, 20, 2, 2, 49)  # (B, N, layer, head, bucket)
    ids = bucket_ids(5, 4)
    bias = rpe(kp)[1]
    for i, j in [(0, 0), (3, 17), (19, 2), (7, 8)]:
        assert torch.allclose(bias[:, :, i, j], tables[:, i, 1, :, ids[i, j]])


def test_moving_content_and_keypoints_by_whole_patches_keeps_interior_biases():
    gh, gw, dy, dx = 6, 7, 1, 2
    rpe = randomise(KeypointRPE(4, 2, 2, (gh, gw), variant="rel_splithead_unshared"), seed=3)
    kp = torch.rand(3, 4, 2) * 0.5 + 0.1
    moved = kp + torch.tensor([dx / gw, dy / gh])
    before, after = rpe(kp), rpe(moved)
    src = torch.tensor([r * gw + c for r in range(gh - dy) for c in range(gw - dx)])
    dst = torch.tensor([(r + dy) * gw + c + dx for r in range(gh - dy) for c in range(gw - dx)])
    for b0, b1 in zip(before, after):
        assert torch.allclose(b0[:, :, src][..., src], b1[:, :, dst][..., dst], atol=1e-5)
        assert not torch.allclose(b0, b1, atol=1e-3)  # the biases do depend on position


@pytest.mark.parametrize("variant", VARIANTS)
def test_windowed_equals_global_when_one_window_covers_the_grid(variant):
    kw = {"num_keypoints": 5, "num_heads": 2, "depth": 2, "grid_size": (6, 4), "variant": variant}
    glob = randomise(KeypointRPE(**kw))
    win = KeypointRPE(**kw, window_size=(6, 4), shift_sizes=[0, (3, 2)])  # shift cancelled
    win.load_state_dict(glob.state_dict())
    kp = torch.rand(3, 5, 2)
    for a, b in zip(glob(kp), win(kp)):
        assert a.shape == b.shape and torch.allclose(a, b)


def reference_windowed_bias(table, gh, gw, wh, ww, sh, sw):
    """Slow loop version: table (B, N, nb) of one head -> (B·nW, w², w²)."""
    hp, wp = -(-gh // wh) * wh, -(-gw // ww) * ww
    ids = bucket_ids(wh, ww)
    out = []
    for b in range(table.shape[0]):
        for wr in range(hp // wh):
            for wc in range(wp // ww):
                win = torch.zeros(wh * ww, wh * ww)
                for p in range(wh * ww):
                    # position in the rolled padded map -> position in the original map
                    r = (wr * wh + p // ww + sh) % hp
                    c = (wc * ww + p % ww + sw) % wp
                    if r < gh and c < gw:  # padded tokens have a zero table
                        win[p] = table[b, r * gw + c][ids[p]]
                out.append(win)
    return torch.stack(out)


@pytest.mark.parametrize("grid,window,shift", [((7, 5), (3, 2), (1, 1)), ((15, 10), (3, 5), (1, 2)),
                                               ((5, 5), 5, 2), ((8, 8), 4, 2)])
def test_windowed_bias_follows_pad_roll_partition(grid, window, shift):
    rpe = randomise(KeypointRPE(2, 1, 2, grid, window_size=window, shift_sizes=[0, shift]), 1)
    kp = torch.rand(2, 2, 2)
    tables = rpe.tables(kp).view(2, grid[0] * grid[1], 2, 49)
    wh, ww = (window, window) if isinstance(window, int) else window
    biases = rpe(kp)
    for layer, (sh, sw) in enumerate([(0, 0), shift if isinstance(shift, tuple) else (shift,) * 2]):
        hp, wp = -(-grid[0] // wh) * wh, -(-grid[1] // ww) * ww
        sh, sw = (0 if wh >= hp else sh), (0 if ww >= wp else sw)
        ref = reference_windowed_bias(tables[:, :, layer], *grid, wh, ww, sh, sw)
        assert biases[layer].shape == (ref.shape[0], 1, wh * ww, wh * ww)
        assert torch.allclose(biases[layer][:, 0], ref, atol=1e-6)


def test_gait_rectangular_map_and_per_layer_heads():
    rpe = randomise(KeypointRPE(17, [2, 2, 4], 3, (15, 10), window_size=(3, 5),
                                shift_sizes=[0, (1, 2), 0]))
    assert rpe.linear.out_features == 49 * 8 and rpe.num_windows == 10
    biases = rpe(torch.rand(4, 17, 2))
    assert [tuple(b.shape) for b in biases] == [(40, 2, 15, 15), (40, 2, 15, 15),
                                                (40, 4, 15, 15)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window", [None, 3])
def test_shapes_and_gradients_every_variant(variant, window):
    shifts = [0, 1] if window else None
    rpe = randomise(KeypointRPE(3, 2, 2, 5, window_size=window, shift_sizes=shifts,
                                variant=variant))
    kp = torch.rand(2, 3, 2, requires_grad=True)
    biases = rpe(kp)
    heads = 2 if "splithead" in variant else 1
    n = 9 if window else 25
    windows = 2 * 4 if window else 2
    assert all(b.shape == (windows, heads, n, n) for b in biases)
    sum(b.square().sum() for b in biases).backward()
    assert rpe.linear.weight.grad.abs().sum() > 0 and rpe.linear.bias.grad.abs().sum() > 0
    assert kp.grad is None  # no gradient to the keypoints by default (official)
    if "unshared" not in variant and window is None:
        assert biases[0] is biases[1]  # shared tables are computed once


def test_keypoint_grad_on_reaches_keypoints():
    rpe = randomise(KeypointRPE(3, 2, 2, 4, keypoint_grad=True))
    kp = torch.rand(2, 3, 2, requires_grad=True)
    sum(b.sum() for b in rpe(kp)).backward()
    assert kp.grad is not None and kp.grad.abs().sum() > 0


def test_extra_keypoints_ignored_and_values_trusted():
    rpe = randomise(KeypointRPE(3, 1, 1, 4))
    kp = torch.rand(2, 5, 2)
    assert torch.equal(rpe(kp)[0], rpe(kp[:, :3])[0])
    # the backbone checks keypoints once per forward; the position module trusts its caller and
    # reads no value back from the device (a NaN flows through instead of raising here)
    bad = kp.clone()
    bad[1, 0, 0] = float("nan")
    bias = rpe(bad)[0]
    assert torch.isnan(bias[1]).any() and torch.isfinite(bias[0]).all()


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown KP-RPE variant"):
        KeypointRPE(5, 2, 2, 4, variant="keypoint")
    with pytest.raises(ValueError, match="num_heads lists 3 layers"):
        KeypointRPE(5, [2, 2, 2], 2, 4)
    with pytest.raises(ValueError, match="same number of heads"):
        KeypointRPE(5, [2, 4], 2, 4, variant="rel_splithead")
    with pytest.raises(ValueError, match="need window_size"):
        KeypointRPE(5, 2, 2, 4, shift_sizes=[0, 1])


def test_bf16_autocast_gives_bf16_biases():
    rpe = randomise(KeypointRPE(3, 2, 2, 4))
    kp = torch.rand(2, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        biases = rpe(kp)
    assert biases[0].dtype == torch.bfloat16
    assert torch.allclose(biases[0].float(), rpe(kp)[0], atol=0.1, rtol=0.02)


def test_iter_biases_is_lazy_and_equals_forward():
    rpe = randomise(KeypointRPE(3, 2, 3, 4, window_size=2, shift_sizes=[0, 1, 0]))
    kp = torch.rand(2, 3, 2)
    lazy = rpe.iter_biases(kp)
    first = next(lazy)
    assert torch.equal(first, rpe(kp)[0])
    assert all(torch.equal(a, b) for a, b in zip(lazy, rpe(kp)[1:]))


@pytest.mark.parametrize("method,nb", [("euclidean", 7), ("cross", 14)])
def test_other_bucket_methods(method, nb):
    rpe = randomise(KeypointRPE(2, 2, 1, (3, 4), method=method))
    assert rpe.linear.out_features == 2 * nb
    kp = torch.rand(2, 2, 2)
    table = rpe.tables(kp).view(2, 12, 2, nb)
    bias = rpe(kp)[0]
    ids = bucket_ids(3, 4, method)
    i, j = 5, 10
    expected = table[:, i, :, ids[..., i, j]]
    expected = expected.sum(-1) if method == "cross" else expected
    assert torch.allclose(bias[:, :, i, j], expected, atol=1e-6)


def test_linear_tables_change_by_one_query_independent_offset_hidden_ones_do_not():
    """A linear table is grid part + keypoint part, so moving the keypoints shifts every query's
    table by the same vector; the non-linear encoder (``hidden``) makes the change depend on
    where the query sits relative to the keypoints."""
    kp1, kp2 = torch.rand(1, 5, 2), torch.rand(1, 5, 2)
    linear = randomise(KeypointRPE(5, 2, 2, 6))
    change = linear.tables(kp2) - linear.tables(kp1)  # (1, N, F)
    assert torch.allclose(change, change[:, :1].expand_as(change), atol=1e-5)
    encoded = randomise(KeypointRPE(5, 2, 2, 6, hidden=32))
    change = encoded.tables(kp2) - encoded.tables(kp1)
    assert (change - change[:, :1]).abs().amax() > 1e-2


@pytest.mark.parametrize("window", [None, (4, 4)])
def test_hidden_encoder_biases_gather_its_tables_and_train(window):
    shift = None if window is None else [0, 2]
    rpe = randomise(KeypointRPE(5, 2, 2, (6, 6), window_size=window, shift_sizes=shift, hidden=16))
    assert rpe.linear.in_features == 16
    kp = torch.rand(3, 5, 2)
    tables = rpe.tables(kp).view(3, 36, 2, 2, 49)  # (B, N, layer, head, nb)
    biases = rpe(kp)
    if window is None:
        ids = bucket_ids(6, 6)
        ref = torch.gather(tables[:, :, 0].permute(0, 2, 1, 3), 3,
                           ids.expand(3, 2, 36, 36))
        assert torch.allclose(biases[0], ref, atol=1e-5)
    else:
        ref = reference_windowed_bias(tables[:, :, 1, 0], 6, 6, 4, 4, 2, 2)
        assert torch.allclose(biases[1][:, 0], ref, atol=1e-5)
    sum(b.sum() for b in biases).backward()
    assert rpe.encoder[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hidden"):
        KeypointRPE(5, 2, 2, 6, hidden=-1)
