"""Swin backbone and its reusable stage/block: shapes, KP-RPE per stage, windows, presets."""

from __future__ import annotations

import pytest
import torch

import kpt
from kpt.layers import Attention
from kpt.models.swin import PatchMerging, SwinBlock, SwinStage
from kpt.position import KeypointRPE

SMALL = {
    "img_size": (60, 40), "patch_size": 4, "embed_dim": 16, "depths": (2, 2),
    "num_heads": (2, 4), "window_size": (3, 5), "num_classes": 4,
}


def _randomise_position_params(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".kprpe." in name or ".rpe." in name or ".rel_bias." in name:
                p.normal_(0, 1.0)


@pytest.mark.parametrize("style", ["v1", "v2"])
@pytest.mark.parametrize("pos", ["none", "abs", "rpe", "irpe", "kprpe", "abs+kprpe"])
def test_swin_styles_and_positions(style, pos):
    torch.manual_seed(0)
    model = kpt.create_model("swin", style=style, pos=pos, **SMALL)
    _randomise_position_params(model)
    images, keypoints = torch.randn(2, 3, 60, 40), torch.rand(2, 5, 2)
    out = model(images, keypoints)
    assert out.shape == (2, 4)
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    # grids per stage: 15×10 stem, then 8×5 after merging (odd rows padded)
    assert [s.grid_size for s in model.stages] == [(15, 10), (8, 5)]
    has_kprpe = [s.kprpe is not None for s in model.stages]
    assert has_kprpe == [pos.endswith("kprpe")] * 2
    # the native window table is replaced by a relative encoding (official Swin-KPRPE)
    native = model.stages[0].blocks[0].window_bias is not None
    assert native == (pos in ("none", "abs"))


def test_swin_kprpe_needs_keypoints_and_uses_them():
    model = kpt.create_model("swin", pos="kprpe", **SMALL).eval()
    images, keypoints = torch.randn(2, 3, 60, 40), torch.rand(2, 5, 2)
    with pytest.raises(ValueError, match="without them"):
        model(images)
    assert torch.allclose(model(images, keypoints), model(images, keypoints.flip(1)))
    _randomise_position_params(model)
    assert not torch.allclose(model(images, keypoints), model(images, keypoints.flip(1)), atol=1e-4)


def test_one_window_stage_equals_global_attention():
    """A window covering the whole map (no shift left) is global attention with the global bias."""
    torch.manual_seed(0)
    grid, dim, heads = (4, 6), 16, 2
    stage = SwinStage(dim, 2, heads, grid, window_size=grid, relative="kprpe", style="v1")
    _randomise_position_params(stage)
    assert [b.shift_for(*grid) for b in stage.blocks] == [(0, 0), (0, 0)]
    global_rpe = KeypointRPE(5, heads, 2, grid)
    global_rpe.load_state_dict(stage.kprpe.state_dict())
    x, keypoints = torch.randn(2, *grid, dim), torch.rand(2, 5, 2)
    expected = x.flatten(1, 2)
    for block, bias in zip(stage.blocks, global_rpe(keypoints)):
        attn = Attention(dim, heads)
        attn.load_state_dict({k: v for k, v in block.attn.state_dict().items()
                              if k.startswith(("qkv.", "proj."))})
        expected = expected + attn(block.norm1(expected), bias)
        expected = expected + block.mlp(block.norm2(expected))
    got = stage(x, keypoints).flatten(1, 2)
    assert torch.allclose(got, expected, atol=1e-5)


def test_shifted_block_matches_naive_roll():
    """Shifted windows: rolling the map by whole windows' worth of shift commutes as Swin defines."""
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window_size=(3, 5), shift_size=(1, 2), native_bias=False)
    x = torch.randn(1, 6, 10, 8)
    out = block(x)
    # reference: roll, unshifted windows with the region mask, roll back
    plain = SwinBlock(8, 2, window_size=(3, 5), shift_size=0, native_bias=False)
    plain.load_state_dict(block.state_dict())
    rolled = torch.roll(block.norm1(x), shifts=(-1, -2), dims=(1, 2))
    from kpt.layers.windows import shifted_window_mask, window_partition, window_reverse

    windows = window_partition(rolled, (3, 5))
    attn = block.attn(windows, None, shifted_window_mask(6, 10, (3, 5), (1, 2)))
    y = torch.roll(window_reverse(attn, (3, 5), 6, 10), shifts=(1, 2), dims=(1, 2))
    y = x + y
    y = y + block.mlp(block.norm2(y))
    assert torch.allclose(out, y, atol=1e-6)
    assert not torch.allclose(out, plain(x), atol=1e-4)


def test_gait_style_stage_on_rectangular_map():
    """SwinGait-2D usage: 15×10 per-frame map, 3×5 windows, 17 joints, V1 blocks."""
    stage = SwinStage(32, 4, 4, (15, 10), window_size=(3, 5), relative="kprpe",
                      num_keypoints=17, style="v1")
    frames = torch.randn(6, 15, 10, 32)
    out = stage(frames, torch.rand(6, 17, 2))
    assert out.shape == frames.shape
    with pytest.raises(ValueError, match="grid"):
        stage(torch.randn(6, 14, 10, 32), torch.rand(6, 17, 2))


def test_patch_merging_pads_odd_maps():
    for style in ("v1", "v2"):
        merge = PatchMerging(8, style)
        assert merge(torch.randn(2, 37, 19, 8)).shape == (2, 19, 10, 16)


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_patch_merging_gathers_neighbours_in_official_order(style):
    """The 4C vector at output (i, j) is [x(2i,2j), x(2i+1,2j), x(2i,2j+1), x(2i+1,2j+1)] (official
    Swin / torchvision order: row offset first), with zeros where an odd map was padded."""
    h, w, c = 5, 3, 2
    x = torch.tensor([[[1000.0 * r + 10 * col + ch + 1 for ch in range(c)] for col in range(w)]
                      for r in range(h)])[None]  # (1, H, W, C): every value names its place
    merge = PatchMerging(c, style)
    first = merge.norm if style == "v1" else merge.reduction  # the layer that sees the 4C vectors
    seen = []
    first.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    merge(x)
    gathered = seen[0]
    assert gathered.shape == (1, 3, 2, 4 * c)
    for i in range(3):
        for j in range(2):
            expected = []
            for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1)):
                r, col = 2 * i + dr, 2 * j + dc
                expected += [float(x[0, r, col, ch]) if r < h and col < w else 0.0
                             for ch in range(c)]
            assert gathered[0, i, j].tolist() == expected, (i, j)


def test_swin_v2_s_kprpe_preset():
    with torch.device("meta"):  # structure only (official parity is checked outside CI)
        model = kpt.create_model("swin_v2_s_kprpe")
    assert sum(p.numel() for p in model.parameters()) == 94_652_064
    assert [s.grid_size for s in model.stages] == [(37, 37), (19, 19), (10, 10), (5, 5)]
    linears = [tuple(s.kprpe.linear.weight.shape) for s in model.stages]
    assert linears == [(392, 10), (784, 10), (9408, 10), (3136, 10)]  # reference §4.2
    assert model.stages[3].blocks[1].shift_for(5, 5) == (0, 0)
    assert model.stages[0].blocks[0].attn.cosine and model.stages[0].blocks[0].window_bias is None
    assert tuple(model.feature[0].weight.shape) == (1024, 25 * 1024)


def test_keypoints_checked_once_per_forward(monkeypatch):
    """One check and one host sync (one ``isfinite``) per forward, not one per stage and module."""
    import kpt.data.keypoints
    import kpt.models.swin

    deep = {**SMALL, "depths": (2, 2, 2, 2), "num_heads": (2, 2, 2, 2), "window_size": 2,
            "img_size": 32}
    model = kpt.create_model("swin", pos="kprpe", **deep).eval()
    checks, finite_calls = [], []
    real_check, real_isfinite = kpt.data.keypoints.check_keypoints, torch.isfinite

    def counting_check(*args, **kwargs):
        checks.append(kwargs.get("what"))
        return real_check(*args, **kwargs)

    def counting_isfinite(x):
        finite_calls.append(tuple(x.shape))
        return real_isfinite(x)

    monkeypatch.setattr(kpt.models.swin, "check_keypoints", counting_check)
    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    keypoints = torch.rand(2, 5, 2)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), keypoints)
    assert len(model.stages) == 4
    assert checks == ["swin(pos='kprpe')"]
    assert finite_calls == [(2, 5, 2)]
    bad = keypoints.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"swin\(pos='kprpe'\): keypoints contain NaN or inf "
                                         r"\(samples \[1\]\)"):
        model(torch.randn(2, 3, 32, 32), bad)


def test_stage_without_keypoints_is_a_clear_error():
    stage = SwinStage(16, 1, 2, (4, 4), window_size=2, relative="kprpe")
    with pytest.raises(ValueError, match="without them"):
        stage(torch.randn(1, 4, 4, 16))
