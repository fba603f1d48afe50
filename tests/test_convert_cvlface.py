"""CVLface ViT-KPRPE converter on a synthetic official-layout state dict (no official code in CI).

The state dict has exactly the keys and shapes of reference kprpe.md §5 (tiny sizes). The expected
output comes from an independent functional forward written here from the reference (§2-3), so the
test checks key mapping, KP-RPE row/column layout, buckets and the head, not only shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import kpt
from kpt.convert import ConversionError, convert_cvlface, infer_vit_config, strip_prefix
from kpt.models.serialization import load_model

DIM, DEPTH, HEADS, PATCH, IMG, HIDDEN, K, OUT, NB = 32, 2, 2, 8, 48, 96, 5, 12, 49
SIDE = IMG // PATCH
N = SIDE * SIDE


def official_state_dict(seed: int = 0, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """Random tensors with the official ViT-KPRPE keys/shapes (reference §5), in order."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "pos_embed": r(1, N, DIM),
        "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(DIM),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": 1 + r(DIM),
                b + "norm1.bias": r(DIM),
                b + "norm2.weight": 1 + r(DIM),
                b + "norm2.bias": r(DIM),
                b + "attn.qkv.weight": r(3 * DIM, DIM, scale=0.3),
                b + "attn.proj.weight": r(DIM, DIM),
                b + "attn.proj.bias": r(DIM),
                b + "mlp.fc1.weight": r(HIDDEN, DIM),
                b + "mlp.fc1.bias": r(HIDDEN),
                b + "mlp.fc2.weight": r(DIM, HIDDEN),
                b + "mlp.fc2.bias": r(DIM),
            }
        )
    sd.update(
        {
            "norm.weight": 1 + r(DIM),
            "norm.bias": r(DIM),
            "feature.0.weight": r(DIM, N * DIM, scale=0.02),
        }
    )
    for idx, width in ((1, DIM), (3, OUT)):
        if idx == 3:
            sd["feature.2.weight"] = r(OUT, DIM)
        sd.update(
            {
                f"feature.{idx}.weight": 1 + r(width),
                f"feature.{idx}.bias": r(width),
                f"feature.{idx}.running_mean": r(width),
                f"feature.{idx}.running_var": 1 + r(width).abs(),
                f"feature.{idx}.num_batches_tracked": torch.tensor(7),
            }
        )
    sd["keypoint_linear.weight"] = r(DEPTH * HEADS * NB, 2 * K, scale=1.0)
    sd["keypoint_linear.bias"] = r(DEPTH * HEADS * NB, scale=1.0)
    return {prefix + k: v for k, v in sd.items()}


def _phi(d: torch.Tensor) -> torch.Tensor:
    """Piecewise index for r = 1.9 on integer offsets (reference §1.2 table): 0,1,2,2,3,3,…"""
    mag = d.abs()
    idx = torch.where(mag <= 1, mag, torch.where(mag <= 3, torch.full_like(mag, 2), 3))
    return idx * d.sign()


def reference_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, kp: torch.Tensor
) -> torch.Tensor:
    """Official ViT-KPRPE forward written from reference §2-3 (eval mode)."""
    sd = strip_prefix(sd)
    batch = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    t = t.flatten(2).transpose(1, 2) + sd["pos_embed"]
    centre = (torch.arange(SIDE) + 0.5) / SIDE
    rows, cols = torch.arange(N) // SIDE, torch.arange(N) % SIDE
    grid = torch.stack([centre[cols], centre[rows]], dim=-1)  # (N, 2) = (x, y)
    rel = (grid[None, :, None, :] - kp[:, None]).flatten(2)  # (B, N, 2K): patch − keypoint
    table = rel @ sd["keypoint_linear.weight"].T + sd["keypoint_linear.bias"]
    table = table.view(batch, N, DEPTH, HEADS, NB)  # rows (layer, head, bucket)
    bucket = 7 * (_phi(rows[:, None] - rows[None]) + 3) + (_phi(cols[:, None] - cols[None]) + 3)
    hd = DIM // HEADS
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = F.layer_norm(t, (DIM,), sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        q, k, v = (
            (h @ sd[b + "attn.qkv.weight"].T).view(batch, N, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        )
        logits = (q / math.sqrt(hd)) @ k.transpose(-1, -2)
        tab = table[:, :, i].permute(0, 2, 1, 3)  # (B, H, N, nb), row = query patch
        logits = logits + tab.gather(-1, bucket.expand(batch, HEADS, N, N))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, N, DIM)
        t = t + out @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        h = F.layer_norm(t, (DIM,), sd[b + "norm2.weight"], sd[b + "norm2.bias"])
        h = F.relu6(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        t = t + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    t = F.layer_norm(t, (DIM,), sd["norm.weight"], sd["norm.bias"]).flatten(1)

    def bn(z, j):
        return F.batch_norm(
            z,
            sd[f"feature.{j}.running_mean"],
            sd[f"feature.{j}.running_var"],
            sd[f"feature.{j}.weight"],
            sd[f"feature.{j}.bias"],
            False,
            0.0,
            2e-5,
        )

    z = bn(t @ sd["feature.0.weight"].T, 1)
    return bn(z @ sd["feature.2.weight"].T, 3)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, IMG, IMG, generator=g), torch.rand(3, K, 2, generator=g)


def test_architecture_is_inferred_from_shapes():
    cfg = infer_vit_config(strip_prefix(official_state_dict()))
    assert cfg["img_size"] == IMG and cfg["patch_size"] == PATCH and cfg["embed_dim"] == DIM
    assert cfg["depth"] == DEPTH and cfg["num_heads"] == HEADS and cfg["num_keypoints"] == K
    assert cfg["mlp_ratio"] == HIDDEN / DIM and cfg["num_classes"] == OUT
    assert cfg["pos"] == "abs+kprpe" and cfg["qkv_bias"] is False and cfg["act_layer"] == "relu6"


@pytest.mark.parametrize("fmt, prefix", [("pt", "net."), ("safetensors", "model.net.")])
def test_converted_model_matches_reference_forward(tmp_path, fmt, prefix):
    sd = official_state_dict(prefix=prefix)
    src = tmp_path / f"model.{fmt}"
    if fmt == "pt":
        torch.save(sd, src)
    else:
        save_file(sd, str(src))
    dst = convert_cvlface(src, tmp_path / "converted")
    assert dst.suffix == ".safetensors"
    model = load_model(dst)
    images, keypoints = _inputs()
    with torch.no_grad():
        expected = reference_forward(sd, images, keypoints)
        got = model(images, keypoints)
        moved = model(images, keypoints.flip(1))
    assert (got - expected).abs().max() < 1e-5
    assert (moved - expected).abs().max() > 1e-3  # the keypoints matter in this check


def test_converted_equals_direct_mapping(tmp_path):
    sd = official_state_dict(seed=5)
    torch.save(sd, tmp_path / "m.pt")
    converted = load_model(convert_cvlface(tmp_path / "m.pt", tmp_path / "m.safetensors"))
    direct = kpt.create_model(
        "vit",
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=HIDDEN / DIM,
        num_classes=OUT,
        pos="abs+kprpe",
        num_keypoints=K,
        head="flatten_bn",
        act_layer="relu6",
        qkv_bias=False,
    ).eval()
    inner = strip_prefix(sd)
    (abs_key,) = [k for k in direct.state_dict() if k.startswith("abs_pos.")]
    renamed = {
        abs_key if k == "pos_embed" else k.replace("keypoint_linear.", "kprpe.linear."): v
        for k, v in inner.items()
    }
    direct.load_state_dict(renamed, strict=True)
    images, keypoints = _inputs()
    with torch.no_grad():
        assert torch.equal(converted(images, keypoints), direct(images, keypoints))


def test_bad_sources_are_rejected(tmp_path):
    swin = {"net.features.0.0.weight": torch.zeros(1)}
    torch.save(swin, tmp_path / "swin.pt")
    with pytest.raises(ConversionError, match="features.0.0.weight"):
        convert_cvlface(tmp_path / "swin.pt", tmp_path / "out.safetensors")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="patch_embed.proj.weight"):
        convert_cvlface(tmp_path / "other.pt", tmp_path / "out.safetensors")
    sd = official_state_dict()
    sd["net.keypoint_linear.weight"] = sd["net.keypoint_linear.weight"][:-1]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(ConversionError, match="keypoint_linear"):
        convert_cvlface(tmp_path / "broken.pt", tmp_path / "out.safetensors")
    with pytest.raises(ConversionError, match="no such file"):
        convert_cvlface(tmp_path / "missing.pt", tmp_path / "out.safetensors")


def official_swin_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A kpt Swin-V2-KPRPE state dict rewritten into the official flat-``features`` layout
    (reference kprpe.md §5): stem ``features.0.{0,2}``, blocks and merges numbered in order,
    ``mlp.{0,3}``, unused window buffers, and top-level ``keypoint_linear.{stage}``."""
    sd = model.state_dict()
    out = {}
    for src, dst in (("patch_embed.proj.", "net.features.0.0."), ("patch_embed.norm.",
                                                                  "net.features.0.2.")):
        out.update({dst + k[len(src):]: v for k, v in sd.items() if k.startswith(src)})
    index = 1
    for s, stage in enumerate(model.stages):
        for b in range(len(stage.blocks)):
            src = f"stages.{s}.blocks.{b}."
            for key, value in sd.items():
                if key.startswith(src):
                    rest = key[len(src):].replace("mlp.fc1.", "mlp.0.")
                    rest = rest.replace("mlp.fc2.", "mlp.3.")
                    out[f"net.features.{index}.{rest}"] = value
            out[f"net.features.{index}.attn.relative_coords_table"] = torch.zeros(1, 9, 9, 2)
            out[f"net.features.{index}.attn.relative_position_index"] = torch.zeros(625).long()
            index += 1
        if s < len(model.merges):
            for key, value in sd.items():
                if key.startswith(f"merges.{s}."):
                    out[f"net.features.{index}.{key[len(f'merges.{s}.'):]}"] = value
            index += 1
    out.update({"net." + k: v for k, v in sd.items() if k.startswith(("norm.", "feature."))})
    out.update({f"keypoint_linear.{s}.{k[len(f'stages.{s}.kprpe.linear.'):]}": v
                for s in range(len(model.stages)) for k, v in sd.items()
                if k.startswith(f"stages.{s}.kprpe.linear.")})
    return out


def test_swin_kprpe_conversion(tmp_path):
    torch.manual_seed(0)
    model = kpt.create_model(
        "swin", img_size=112, patch_size=8, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
        window_size=5, style="v2", pos="kprpe", num_classes=12, head="flatten_bn",
    ).eval()
    with torch.no_grad():
        for s in model.stages:
            s.kprpe.linear.weight.normal_(0, 1.0)
            s.kprpe.linear.bias.normal_(0, 1.0)
    sd = official_swin_state_dict(model)
    src = tmp_path / "s.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in sd.items()}, str(src))
    converted = load_model(convert_cvlface(src, tmp_path / "k.safetensors"))
    kwargs = converted.kpt_spec["kwargs"]
    assert kwargs["depths"] == [2, 2] and kwargs["num_heads"] == [2, 4]
    assert kwargs["window_size"] == 5 and kwargs["patch_size"] == 8 and kwargs["embed_dim"] == 16
    assert kwargs["style"] == "v2" and kwargs["pos"] == "kprpe" and kwargs["num_classes"] == 12
    images, keypoints = torch.randn(2, 3, 112, 112), torch.rand(2, 5, 2)
    with torch.no_grad():
        assert torch.equal(converted(images, keypoints), model(images, keypoints))
