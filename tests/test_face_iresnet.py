"""IResNet backbones: registry names, shapes, insightface layout, keypoints ignored."""

from __future__ import annotations

import pytest
import torch
from kpt_plugins.face.iresnet import LAYERS, IResNet

import kpt


@pytest.mark.parametrize("name", ["iresnet18", "iresnet50", "iresnet100"])
def test_registered_with_insightface_depths(name):
    assert name in kpt.list_models("iresnet*")
    counts = LAYERS[name]
    model = IResNet(counts, num_classes=8, img_size=32, widths=(4, 4, 8, 8))
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == list(counts)


def test_forward_shape_and_keypoints_ignored():
    torch.manual_seed(0)
    model = kpt.create_model("iresnet18", num_classes=16, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.rand(2, 5, 2))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out, model(x))
    assert not model.features.weight.requires_grad  # insightface freezes the last BN scale
    # insightface key names (state dicts load key by key)
    keys = set(model.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight",
                "layer1.0.conv2.weight", "layer1.0.downsample.0.weight", "bn2.weight",
                "fc.weight", "features.running_var"):
        assert key in keys


def test_iresnet50_parameter_count():
    # insightface IResNet-50 at 112×112 with a 512-d embedding, counted from its layer table
    # (stem, 3-4-14-3 blocks, BN, fc 25088→512, BN1d); built on the meta device (no memory)
    with torch.device("meta"):
        model = IResNet(LAYERS["iresnet50"], num_classes=512, img_size=112)
    assert sum(p.numel() for p in model.parameters()) == _expected_iresnet50()


def _expected_iresnet50() -> int:
    def bn(c):
        return 2 * c

    total = 3 * 64 * 9 + bn(64) + 64  # stem conv, BN, PReLU
    inplanes = 64
    for blocks, planes in zip((3, 4, 14, 3), (64, 128, 256, 512)):
        for b in range(blocks):
            cin = inplanes if b == 0 else planes
            total += bn(cin) + cin * planes * 9 + bn(planes) + planes + planes * planes * 9 + bn(planes)
            if b == 0:
                total += cin * planes + bn(planes)
        inplanes = planes
    total += bn(512) + 512 * 7 * 7 * 512 + 512 + bn(512)
    return total
