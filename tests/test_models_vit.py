"""ViT backbone: every position encoding, the official face presets, keypoint checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kpt
from kpt.models.vit import VisionTransformer

POS = ["none", "abs", "rpe", "irpe", "kprpe", "abs+rpe", "abs+irpe", "abs+kprpe"]
TINY = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
}


def _inputs(batch: int = 2, size: int = 32, k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, k, 2, generator=g)


def _randomise_position_params(model: nn.Module) -> None:
    """Zero-initialised relative encodings would hide bugs: give them random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("kprpe.", "rel_bias.")) or ".rpe." in name:
                p.normal_(0, 1.0)


@pytest.mark.parametrize("pos", POS)
def test_every_pos_runs_and_trains(pos):
    torch.manual_seed(0)
    model = kpt.create_model("vit", pos=pos, num_classes=3, **TINY)
    _randomise_position_params(model)
    images, keypoints = _inputs()
    out = model(images, keypoints)
    assert out.shape == (2, 3)
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # a relative encoding alone carries no absolute embedding (DESIGN §4)
    assert (model.abs_pos is not None) == pos.startswith("abs")
    assert (model.kprpe is not None) == pos.endswith("kprpe")


@pytest.mark.parametrize("pos", ["none", "abs", "rpe", "irpe"])
def test_keypoints_optional_when_unused(pos):
    model = kpt.create_model("vit", pos=pos, **TINY).eval()
    images, keypoints = _inputs()
    assert torch.equal(model(images), model(images, keypoints))


def test_kprpe_uses_keypoints_and_starts_neutral():
    torch.manual_seed(0)
    model = kpt.create_model("vit", pos="kprpe", **TINY).eval()
    images, keypoints = _inputs()
    # zero-initialised KP-RPE adds nothing at first (as official)
    assert torch.allclose(model(images, keypoints), model(images, keypoints.flip(1)))
    _randomise_position_params(model)
    assert not torch.allclose(model(images, keypoints), model(images, keypoints.flip(1)), atol=1e-4)


def test_keypoint_errors_are_clear():
    model = kpt.create_model("vit", pos="kprpe", num_keypoints=5, **TINY)
    images, keypoints = _inputs()
    with pytest.raises(ValueError, match="without them"):
        model(images)
    with pytest.raises(ValueError, match="num_keypoints=5"):
        model(images, torch.rand(2, 4, 2))
    with pytest.raises(ValueError, match="batch"):
        model(images, torch.rand(3, 5, 2))
    with pytest.raises(ValueError, match="shape"):
        model(images, torch.rand(2, 10))
    bad = keypoints.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(images, bad)


def test_flatten_features_are_token_major_and_row_major():
    """flatten_bn features (B, N·D): token n = row·W + col occupies columns [n·D, (n+1)·D)."""
    model = kpt.create_model("vit", head="flatten_bn", num_classes=0, pos="none",
                             **{**TINY, "depth": 0}).eval()  # no attention: tokens stay apart
    blank = torch.zeros(1, 3, 32, 32)
    lit = blank.clone()
    lit[0, :, 8:16, 16:24] = 1.0  # the patch at grid row 1, column 2 of the 4×4 grid
    with torch.no_grad():
        changed = (model(lit) - model(blank)).reshape(16, 32).abs().amax(dim=1) > 1e-6
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_heads_and_features():
    images, keypoints = _inputs()
    flat = kpt.create_model("vit", head="flatten_bn", num_classes=0, **TINY)
    assert flat(images).shape == (2, 16 * 32)  # token-major flatten of 4×4 tokens
    avg = kpt.create_model("vit", head="avg", num_classes=0, **TINY)
    assert avg(images).shape == (2, 32)
    cls = kpt.create_model("vit", head="cls", num_classes=7, pos="abs+kprpe", **TINY)
    assert cls.cls_token is not None
    assert cls.forward_features(images, keypoints).shape == (2, 17, 32)
    assert cls(images, keypoints).shape == (2, 7)
    with pytest.raises(ValueError, match="class_token"):
        kpt.create_model("vit", head="flatten_bn", class_token=True, **TINY)
    with pytest.raises(TypeError, match="unknown argument"):
        kpt.create_model("vit", embed_dims=32)


def test_rectangular_input():
    model = kpt.create_model(
        "vit",
        img_size=(32, 48),
        pos="kprpe",
        num_classes=4,
        **{k: v for k, v in TINY.items() if k != "img_size"},
    )
    _randomise_position_params(model)
    assert model.grid_size == (4, 6)
    out = model(torch.randn(2, 3, 32, 48), torch.rand(2, 5, 2))
    assert out.shape == (2, 4)


@pytest.mark.parametrize(
    "name, expected",
    [("vit_small_kprpe", 96_004_128), ("vit_base_kprpe", 115_076_736)],
)
def test_official_preset_parameter_count(name, expected):
    with torch.device("meta"):  # structure only: skips initialising 100M parameters
        model = kpt.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_official_small_architecture():
    with torch.device("meta"):
        model = kpt.create_model("vit_small_kprpe")
    assert isinstance(model, VisionTransformer)
    assert model.cls_token is None and model.num_patches == 196
    block = model.blocks[0]
    assert block.attn.qkv.bias is None and block.attn.proj.bias is not None
    assert isinstance(block.mlp.act, nn.ReLU6)
    assert block.mlp.fc1.out_features == 2560
    bns = [m for m in model.feature if isinstance(m, nn.BatchNorm1d)]
    assert [bn.eps for bn in bns] == [2e-5, 2e-5]
    assert model.feature[0].in_features == 196 * 512 and model.feature[0].bias is None
    assert tuple(model.kprpe.linear.weight.shape) == (12 * 8 * 49, 10)
    # the official model keeps its learned absolute embedding
    assert model.abs_pos is not None
    keys = set(model.state_dict())
    assert {
        "patch_embed.proj.weight",
        "blocks.11.attn.qkv.weight",
        "norm.weight",
        "feature.3.running_var",
        "kprpe.linear.bias",
    } <= keys


def test_final_norm_runs_in_fp32_under_bf16():
    model = kpt.create_model("vit", pos="abs+kprpe", head="flatten_bn", num_classes=8, **TINY)
    model.eval()
    images, keypoints = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.forward_features(images, keypoints)
        out = model(images, keypoints)
    assert tokens.dtype == torch.float32
    assert torch.isfinite(out).all()
    model_bf16 = kpt.create_model("vit", pos="kprpe", num_classes=8, **TINY).to(torch.bfloat16)
    assert model_bf16(images.bfloat16(), keypoints.bfloat16()).shape == (2, 8)
