"""ONNX export of a small ViT-KPRPE, run with onnxruntime (the official code cannot export)."""

from __future__ import annotations

import warnings

import pytest
import torch

import kpt

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("pos", ["abs+kprpe", "kprpe"])
def test_vit_kprpe_onnx_matches_pytorch(tmp_path, pos):
    torch.manual_seed(0)
    model = kpt.create_model(
        "vit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, pos=pos,
        num_classes=8, head="flatten_bn", act_layer="relu6", qkv_bias=False,
    ).eval()
    with torch.no_grad():
        model.kprpe.linear.weight.normal_(0, 1.0)
        model.kprpe.linear.bias.normal_(0, 1.0)
    images, keypoints = torch.randn(3, 3, 32, 32), torch.rand(3, 5, 2)
    path = tmp_path / "vit_kprpe.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (images, keypoints), str(path), input_names=["images", "keypoints"],
            output_names=["embedding"], dynamic_axes={"images": {0: "batch"},
                                                      "keypoints": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # a different batch size than the export batch: the graph must not bake B in
    images, keypoints = torch.randn(5, 3, 32, 32), torch.rand(5, 5, 2)
    (got,) = session.run(None, {"images": images.numpy(), "keypoints": keypoints.numpy()})
    with torch.no_grad():
        expected = model(images, keypoints)
        moved = model(images, keypoints.flip(1))
    assert got.shape == (5, 8)
    assert abs(torch.from_numpy(got) - expected).max() < 1e-4
    assert (moved - expected).abs().max() > 1e-3  # keypoints really flow through the graph
