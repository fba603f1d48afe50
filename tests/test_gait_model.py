"""SwinGait-2D (+ KP-RPE): parameter count against the reference, shapes, KP-RPE wiring."""

from __future__ import annotations

import pytest
import torch
from kpt_plugins.gait.model import SwinGait2D, param_groups
from kpt_plugins.gait.plugin import PRESETS

from kpt.position import num_buckets

CPU = PRESETS["cpu"]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_preset_parameter_count_matches_reference():
    """reference gait.md 1.2: 25,318,464 params, 13,030,464 without the 3000-way classifier."""
    model = SwinGait2D(pos="none", **PRESETS["paper"])
    assert _count(model) == 25_318_464
    assert _count(model) - model.bnneck.fc_bin.numel() == 13_030_464
    # per-module figures of the reference's 3D table where the 2D variant coincides
    assert _count(model.layer0) == 704 and _count(model.layer1) == 73_984
    assert _count(model.fcs) == 2_097_152 and _count(model.bnneck) == 12_296_192


def test_kprpe_adds_one_keypoint_linear_per_stage():
    base = SwinGait2D(pos="none", num_classes=10, **CPU)
    kp = SwinGait2D(pos="kprpe", num_classes=10, **CPU)
    nb = num_buckets("product", ratio=1.9)
    expected = sum((2 * 17 + 1) * depth * heads * nb
                   for depth, heads in zip(CPU["depths"], CPU["num_heads"]))
    assert _count(kp) - _count(base) == expected


def test_shapes_and_kprpe_starts_as_the_baseline():
    torch.manual_seed(0)
    base = SwinGait2D(pos="none", num_classes=7, **CPU).eval()
    kp = SwinGait2D(pos="kprpe", num_classes=7, **CPU).eval()
    missing, unexpected = kp.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("kprpe" in k for k in missing)
    images = torch.rand(2, 5, 32, 22)
    keypoints = torch.rand(2, 5, 17, 2)
    out = base(images)
    assert out["embeddings"].shape == (2, CPU["embedding_dim"], 15)
    assert out["bn_embeddings"].shape == (2, CPU["embedding_dim"], 15)
    assert out["logits"].shape == (2, 7, 15)
    # zero-initialised KP-RPE: exactly the baseline at initialisation
    torch.testing.assert_close(kp(images, keypoints)["embeddings"], out["embeddings"])
    # once trained (non-zero weights), each frame's joints change the output
    with torch.no_grad():
        for stage in kp.stages:
            stage.kprpe.linear.weight.normal_(0, 0.5)
    a = kp(images, keypoints)["embeddings"]
    moved = keypoints.clone()
    moved[:, 2] = torch.rand(2, 17, 2)  # only frame 2's joints change
    assert not torch.allclose(a, kp(images, moved)["embeddings"])


def test_kprpe_needs_keypoints():
    model = SwinGait2D(pos="kprpe", num_classes=3, **CPU)
    with pytest.raises(ValueError, match=r"without them.*\(B=1, T=4, K=17, 2\)"):
        model(torch.rand(1, 4, 32, 22))
    with pytest.raises(ValueError, match="frames"):
        model(torch.rand(1, 4, 32, 22), torch.rand(1, 3, 17, 2))
    bad = torch.rand(1, 4, 17, 2)
    bad[0, 2, 5, 1] = float("nan")
    with pytest.raises(ValueError, match="SwinGait2D.*NaN"):
        model(torch.rand(1, 4, 32, 22), bad)
    with pytest.raises(ValueError, match="pos must be"):
        SwinGait2D(pos="rpe")


def test_sixteen_parts_drop_the_detached_copy():
    model = SwinGait2D(pos="none", num_classes=4, **{**CPU, "parts": 16}).eval()
    images = torch.rand(2, 3, 32, 22)
    out = model(images)
    assert out["embeddings"].shape[-1] == 15 and model.fcs.fc_bin.shape[0] == 16
    # the 16th part only carries weights (to load 16-bin heads): changing them changes no output,
    # and no loss on the outputs sends it a gradient
    with torch.no_grad():
        model.fcs.fc_bin[15].normal_()
        model.bnneck.fc_bin[15].normal_()
    again = model(images)
    for key in ("embeddings", "bn_embeddings", "logits"):
        assert torch.equal(out[key], again[key]), key
    sum(v.sum() for v in again.values()).backward()
    assert model.fcs.fc_bin.grad[15].abs().max() == 0 and model.fcs.fc_bin.grad[:15].abs().max() > 0


def test_param_groups_follow_opengait():
    model = SwinGait2D(pos="kprpe", num_classes=4, **CPU)
    groups = {g["name"]: g for g in param_groups(model, 3e-4, 0.02)}
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))
    assert groups["stem_head"]["lr"] == pytest.approx(3e-5)
    assert groups["transformer_nd"]["weight_decay"] == 0.0
    ids = {id(p) for p in groups["transformer_nd"]["params"]}
    assert id(model.patch_embed.weight) in ids and id(model.stages[0].blocks[0].norm1.weight) in ids
    assert id(model.expand[0].weight) not in ids  # OpenGait decays `downsample.0`


@pytest.mark.slow
def test_paper_preset_output_shape_for_30x64x44():
    model = SwinGait2D(pos="kprpe", **PRESETS["paper"]).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 30, 64, 44), torch.rand(1, 30, 17, 2))
    assert out["embeddings"].shape == (1, 256, 15) and out["logits"].shape == (1, 3000, 15)
