"""Bare-model checkpoints: save_model / load_model round trips and clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import kpt
from kpt.engine.weights import CheckpointError
from kpt.models.serialization import is_model_file, load_model, read_header, save_model

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name, kwargs", [
    ("vit", {**TINY, "pos": "abs+kprpe", "num_classes": 6, "head": "flatten_bn"}),
    ("swin", {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depths": (2, 2),
              "num_heads": (2, 4), "window_size": 4, "style": "v2", "pos": "kprpe"}),
])
def test_round_trip(tmp_path, suffix, name, kwargs):
    torch.manual_seed(0)
    model = kpt.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # KP-RPE weights nonzero too
    path = save_model(model, tmp_path / f"m{suffix}")
    header = read_header(path)
    assert header["model"] == name and header["kwargs"]["pos"] == kwargs["pos"]
    loaded = load_model(path)
    images, keypoints = torch.randn(2, 3, 32, 32), torch.rand(2, 5, 2)
    with torch.no_grad():
        assert torch.equal(model(images, keypoints), loaded(images, keypoints))
    assert is_model_file(path)


def test_preset_records_full_kwargs(tmp_path):
    model = kpt.create_model("vit", **TINY, pos="kprpe")
    assert model.kpt_spec["name"] == "vit"
    assert model.kpt_spec["kwargs"]["mlp_ratio"] == 4.0  # defaults recorded, not only overrides


def test_errors_name_the_file_and_field(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match=r"plain.safetensors has no kpt header \(no 'format'"):
        read_header(plain)
    assert not is_model_file(plain)
    with pytest.raises(ValueError, match="suffix"):
        save_model(kpt.create_model("vit", **TINY), tmp_path / "m.bin")
    bare = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="kpt_spec"):
        save_model(bare, tmp_path / "m.pt")
    model = kpt.create_model("vit", **TINY, pos="abs")
    path = save_model(model, tmp_path / "m.pt", name="vit", kwargs={**TINY, "pos": "none"})
    with pytest.raises(CheckpointError, match=r"m.pt does not fit this model \(unexpected.*pos_embed"):
        load_model(path)
