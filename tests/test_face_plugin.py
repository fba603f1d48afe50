"""`kpt train face` smoke run, `kpt eval face` on a written .bin, `kpt predict face`, plugin check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kpt_plugins.face.data.bin_pairs import write_bin
from kpt_plugins.face.synthetic.dataset import synthetic_pairs

import kpt
from kpt.cli import main

TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.embedding_size=16",
        "data.num_identities=6", "data.images_per_identity=4", "train.batch_size=8",
        "train.epochs=0", "train.max_steps=10", "train.log_every=5",
        "eval.synthetic_pairs=20", "eval.unaligned_keypoints=ground_truth"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 10-step run of `kpt train face` with a tiny ViT on a tiny synthetic set."""
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    assert main(["train", "face", *TINY, "--out", str(out)]) == 0
    return out


def test_train_smoke_writes_aligned_and_unaligned_accuracy(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["step"] == 10
    for key in ("aligned_accuracy", "unaligned_accuracy", "unaligned_crop_accuracy", "accuracy"):
        assert 0.0 <= summary[key] <= 100.0  # percent
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # AdaFace loss over the first 5 vs the next 5 steps: 37.2 -> 28.4 (ratio 0.52-0.79 for seeds 0-2)
    assert losses[1] < 0.9 * losses[0]
    model = kpt.load_model(str(trained / "weights.safetensors"))
    assert model.backbone.uses_keypoints and model.backbone.pos == "abs+kprpe"


def test_load_model_accepts_a_run_directory(trained, tmp_path):
    from_file = kpt.load_model(str(trained / "weights.safetensors")).state_dict()
    from_dir = kpt.load_model(trained).state_dict()
    assert from_dir.keys() == from_file.keys()
    assert all(torch.equal(from_dir[k], from_file[k]) for k in from_file)
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        kpt.load_model(tmp_path)
    from kpt_plugins.face.predict import find_weights

    assert find_weights(str(trained)) == trained / "weights.safetensors"  # `--weights RUN_DIR`
    with pytest.raises(FileNotFoundError, match="best.pt"):
        find_weights(str(tmp_path))


def test_eval_on_written_bin(trained, tmp_path, capsys):
    pairs, _ = synthetic_pairs(10, "aligned", seed=3)
    path = tmp_path / "tiny_lfw.bin"
    write_bin(path, pairs.images.permute(0, 2, 3, 1).numpy(), pairs.issame.numpy())
    out = tmp_path / "metrics.json"
    code = main(["eval", "face", str(trained), "--test", str(path), "eval.bin_keypoints=template",
                 "eval.synthetic_pairs=0", "--json", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    # the same figure recomputed here: template keypoints, flip fusion (mirror the image, x -> 1 - x,
    # swap the eyes and the mouth corners), cosine scores, insightface folds (one pair per fold)
    from kpt_plugins.face.data.bin_pairs import load_bin

    from kpt.metrics import verification

    images = load_bin(path).images.float() / 127.5 - 1
    template = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]]) / 112
    keypoints = template.expand(len(images), 5, 2)
    mirrored = keypoints[:, [1, 0, 2, 4, 3]] * torch.tensor([-1.0, 1.0]) + torch.tensor([1.0, 0.0])
    model = kpt.load_model(trained).eval()
    with torch.no_grad():
        emb = model(images, keypoints) + model(images.flip(-1), mirrored)
    emb = torch.nn.functional.normalize(emb, dim=1)
    expected = verification(emb[0::2], emb[1::2], pairs.issame, folds=10)
    assert metrics["tiny_lfw/accuracy"] == pytest.approx(100 * expected["accuracy"], abs=1e-7)
    assert metrics["tiny_lfw/threshold"] == pytest.approx(expected["threshold"], abs=1e-6)
    assert not any(k.startswith("synthetic") for k in metrics)  # eval.synthetic_pairs=0
    assert "tiny_lfw" in capsys.readouterr().out


def test_eval_is_the_core_command_with_config_keys(trained, tmp_path, capsys):
    """One way in: `kpt eval face` is the core's eval; the Fig. 5 sweep is eval.sweep_*."""
    from kpt_plugins.face.plugin import PLUGIN

    assert "eval" not in PLUGIN.commands
    out = tmp_path / "metrics.json"
    assert main(["eval", "face", str(trained / "weights.safetensors"), "eval.sweep_steps=2",
                 f"eval.sweep_out={tmp_path / 'sweep'}", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"sweep/t=0.00", "sweep/t=1.00", "aligned_accuracy"} <= set(metrics)
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("model,t,accuracy") and len(rows) == 3
    # the old flags of the plugin's own command are gone: one error line, exit 2
    assert main(["eval", "face", str(trained), "--pairs", "10"]) == 2
    assert "--pairs" in capsys.readouterr().err
    assert main(["eval", "mnist", str(trained)]) == 2  # face weights: named, not loaded
    assert "written by plugin 'face'" in capsys.readouterr().err


def test_predict_two_images(trained, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    face = skimage_data.astronaut()
    Image.fromarray(face).save(tmp_path / "a.png")
    shifted = np.roll(face[:, ::-1], (20, -15), axis=(0, 1))  # mirrored and shifted copy
    Image.fromarray(np.ascontiguousarray(shifted)).save(tmp_path / "b.png")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(tmp_path / "blank.png")
    weights = str(trained / "weights.safetensors")
    assert main(["predict", "face", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "--weights", weights, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert -1.0 <= result["similarity"] <= 1.0 and min(result["face_scores"]) > 0.5
    assert main(["predict", "face", str(tmp_path / "a.png"), str(tmp_path / "blank.png"),
                 "--weights", weights]) == 1
    assert "no face found" in capsys.readouterr().err


def test_plugins_check_face(capsys):
    assert main(["plugins", "check", "face"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_eval_accepts_a_bare_backbone_file(tmp_path):
    """`kpt convert cvlface` writes bare backbones: eval/predict take them like run weights."""
    from kpt.models import save_model

    torch.manual_seed(0)
    backbone = kpt.create_model("vit", img_size=112, patch_size=28, embed_dim=16, depth=1,
                                num_heads=2, num_classes=8, pos="abs+kprpe", head="flatten_bn")
    path = save_model(backbone, tmp_path / "converted.safetensors")
    pairs, _ = synthetic_pairs(10, "aligned", seed=4)
    bin_path = tmp_path / "tiny.bin"
    write_bin(bin_path, pairs.images.permute(0, 2, 3, 1).numpy(), pairs.issame.numpy(),
              as_bytes=False)
    out = tmp_path / "metrics.json"
    assert main(["eval", "face", str(path), "--test", str(bin_path), "eval.bin_keypoints=template",
                 "eval.synthetic_pairs=0", "--json", str(out)]) == 0
    assert 0.0 <= json.loads(out.read_text())["tiny/accuracy"] <= 100.0  # percent


def test_render_cache_returns_identical_items():
    from kpt_plugins.face.plugin import RenderCache
    from kpt_plugins.face.synthetic.dataset import SyntheticFaces

    data = SyntheticFaces(3, 2, size=32)
    cache = RenderCache(data)
    first = cache.__getitems__([4, 1])
    assert len(cache._items) == 2
    again = cache.__getitems__([1, 4, 0])
    assert again[0] is first[1] and again[1] is first[0]
    torch.testing.assert_close(again[2]["image"], data[0]["image"])


@pytest.mark.slow
def test_train_on_recordio_path(tmp_path):
    """`--data PATH`: insightface RecordIO with its landmark cache (ground-truth points here)."""
    from kpt_plugins.face.synthetic.dataset import export_synthetic_rec

    rec = tmp_path / "rec"
    export_synthetic_rec(rec, num_identities=3, images_per_identity=4, seed=2)
    out = tmp_path / "run"
    args = ["train", "face", "--data", str(rec), "--out", str(out), "model.depth=1",
            "model.embed_dim=32", "model.num_heads=2", "model.embedding_size=16",
            "train.batch_size=4", "train.epochs=0", "train.max_steps=2", "eval.synthetic_pairs=10",
            "eval.unaligned_keypoints=ground_truth"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2
    model = kpt.load_model(str(out / "weights.safetensors"))
    assert model.head.weight.shape[0] == 3  # identities read from the RecordIO property


def test_loaded_model_takes_what_docs_face_md_says(trained):
    """docs/face.md "Using a model in Python": RGB in [-1, 1], keypoints (B, 5, 2) in [0, 1]; the
    embeddings equal those of the plugin's own evaluation path (without flip fusion)."""
    from kpt_plugins.face.evaluation.verification import embed
    from kpt_plugins.face.synthetic.dataset import SyntheticFaces

    faces = SyntheticFaces(num_identities=2, images_per_identity=1, split="unaligned", seed=3)
    images = torch.stack([faces[i]["image"] for i in range(2)])  # (2, 3, 112, 112) uint8
    keypoints = torch.stack([faces[i]["keypoints"] for i in range(2)])
    model = kpt.load_model(trained).eval()
    with torch.no_grad():
        documented = torch.nn.functional.normalize(model(images.float() / 127.5 - 1, keypoints))
        unit_range = torch.nn.functional.normalize(model(images.float() / 255, keypoints))
    reference = embed(model, images, keypoints, flip=False)
    assert documented.shape == (2, 16)
    torch.testing.assert_close(documented, reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unit_range, reference, atol=1e-3)  # the range matters
