"""A researcher's day (issue 22): every command takes a run folder or a weights file, face evaluation
says what it measures, one unit (percent), `kpt data validate DOMAIN --data PATH` everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kpt.cli import main

torch.set_num_threads(1)

# tiny runs of every built-in plugin (the plugins' own check sizes, one or two steps)
TINY = {
    "mnist": ["data.name=synthetic", "data.synthetic_train=64", "data.synthetic_test=32",
              "eval.test=[affnist-synth]", "eval.subsets=false", "model.depth=1",
              "model.embed_dim=16", "train.batch_size=16", "train.max_steps=1"],
    "gait": ["data.synthetic_train_ids=4", "data.synthetic_test_ids=3", "data.synthetic_seqs=2",
             "data.synthetic_frames=12", "data.frames=8", "data.k=2", "train.batch_size=4",
             "model.drop_path_rate=0.0", "train.max_steps=1"],
    "face": ["data.num_identities=4", "data.images_per_identity=4", "train.batch_size=8",
             "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.embedding_size=16",
             "eval.synthetic_pairs=20", "eval.protocols=[aligned]", "train.max_steps=1"],
}
PRIMARY = {"mnist": "mnist_acc", "gait": "rank1", "face": "accuracy"}


def _strict(text):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for domain, overrides in TINY.items():
        assert main(["train", domain, *overrides, "--out", str(root / domain)]) == 0
    return root


@pytest.mark.parametrize("domain", list(TINY))
def test_eval_takes_weights_file_and_run_folder(runs, domain, tmp_path, monkeypatch, capsys):
    run = runs / domain
    summary = _strict((run / "summary.json").read_text())
    assert summary["units"].startswith("percent")
    monkeypatch.chdir(run.parent)  # a relative path too
    for target in (run / "weights.safetensors", run.resolve(), run / "last.pt", run.name):
        out = tmp_path / "m.json"
        assert main(["eval", domain, str(target), "--json", str(out)]) == 0, capsys.readouterr()
        metrics = _strict(out.read_text())
        # the same weights and data as the end of training: the same numbers
        assert metrics[PRIMARY[domain]] == pytest.approx(summary[PRIMARY[domain]])


def test_accuracy_is_percent_in_every_plugin(runs):
    for domain in TINY:
        summary = _strict((runs / domain / "summary.json").read_text())
        key = PRIMARY[domain]
        assert 0.0 <= summary[key] <= 100.0
    face = _strict((runs / "face" / "summary.json").read_text())
    # 20 pairs: 10 impostors, no FAR of 1e-3 to measure VAL at -> null, not a number or NaN
    assert face["synthetic-aligned/val"] is None
    assert face["accuracy"] == face["aligned_accuracy"]


def test_predict_face_takes_run_folder(runs, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(tmp_path / name)
    for weights in (runs / "face", runs / "face" / "weights.safetensors"):
        # noise has no face: exit 1 with that reason, after the weights were found and loaded
        code = main(["predict", "face", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                     "--weights", str(weights)])
        err = capsys.readouterr().err
        assert code == 1 and "no face found" in err, err


def _image_folders(root, identities=4, per=4):
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(identities):
        (root / f"id{i}").mkdir(parents=True)
        for j in range(per):
            pixels = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"id{i}" / f"{j}.png")
    return root


def test_face_on_real_data_skips_synthetic_sets_and_finds_bin_in_cwd(tmp_path, monkeypatch):
    from kpt_plugins.face.data.bin_pairs import write_bin
    from kpt_plugins.face.synthetic.dataset import synthetic_pairs

    data = _image_folders(tmp_path / "faces")
    pairs, _ = synthetic_pairs(10, "aligned", seed=3)
    monkeypatch.chdir(tmp_path)
    write_bin(tmp_path / "lfw.bin", pairs.images.permute(0, 2, 3, 1).numpy(),
              pairs.issame.numpy())
    out = tmp_path / "run"
    overrides = [o for o in TINY["face"] if not o.startswith("data.")]
    assert main(["train", "face", "--data", str(data), "--test", "lfw",
                 "eval.bin_keypoints=template", *overrides, "--out", str(out)]) == 0
    summary = _strict((out / "summary.json").read_text())
    assert not any(k.startswith(("synthetic", "aligned")) for k in summary)
    assert summary["accuracy"] == summary["lfw/accuracy"]
    assert summary["lfw/val"] is None  # too few impostor pairs for VAL@FAR=1e-3
    log = (out / "run.log").read_text()
    assert "keypoints: template" in log and "synthetic verification sets are skipped" in log
    assert "eval set lfw: 10 pairs" in log


def test_face_real_data_without_test_sets_selects_no_best(tmp_path):
    data = _image_folders(tmp_path / "faces")
    out = tmp_path / "run"
    overrides = [o for o in TINY["face"] if not o.startswith("data.")]
    assert main(["train", "face", "--data", str(data), *overrides, "--out", str(out)]) == 0
    assert not (out / "best.pt").exists() and (out / "last.pt").exists()
    assert "accuracy" not in _strict((out / "summary.json").read_text())


def test_data_validate_takes_data_in_every_plugin(tmp_path, capsys):
    from kpt_plugins.mnist.data import synthetic_mnist

    np.savez(tmp_path / "mnist.npz", **synthetic_mnist(32, 16))
    assert main(["data", "validate", "mnist", "--data", str(tmp_path)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["data", "validate", "mnist", "--data", str(tmp_path / "none")]) == 1
    from kpt_plugins.gait.synthetic import SyntheticSpec, generate

    generate(tmp_path / "gait", SyntheticSpec(num_train=2, num_test=2, seqs_per_id=2, frames=4))
    assert main(["data", "validate", "gait", "--data", str(tmp_path / "gait")]) == 0
    assert "ok" in capsys.readouterr().out
    faces = _image_folders(tmp_path / "faces", 2, 2)
    assert main(["data", "validate", "face", "--data", str(faces)]) == 0


def test_scaffold_trains_on_image_folders_and_offers_commands(tmp_path, monkeypatch, capsys):
    """`kpt new-plugin xray`: `--data DIR` trains on DIR's images (not the synthetic shapes), and
    the package's `data validate` and `predict` commands work on a run folder."""
    from PIL import Image

    from kpt.plugin import discovery as plugin_mod
    from kpt.plugin.scaffold import write_plugin_package

    folder = write_plugin_package("xray", tmp_path)
    monkeypatch.syspath_prepend(str(folder))
    found = dict(plugin_mod.discover_plugins(refresh=True))
    found["xray"] = plugin_mod.PluginEntry("xray", "kpt_plugin_xray.plugin:PLUGIN", builtin=False,
                                           package="kpt-plugin-xray")
    monkeypatch.setattr(plugin_mod, "_DISCOVERED", found)
    rng = np.random.default_rng(2)
    data = tmp_path / "xrays"
    for split in ("train", "val"):
        for cls in ("healthy", "sick", "unsure"):
            (data / split / cls).mkdir(parents=True)
            for j in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(
                    data / split / cls / f"{j}.png")
    assert main(["data", "validate", "xray", "--data", str(data)]) == 0
    assert "healthy 4" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["train", "xray", "--data", str(data), "--out", str(out), "train.max_steps=1",
                 "train.batch_size=4", "model.depth=1"]) == 0
    summary = _strict((out / "summary.json").read_text())
    assert "val/accuracy" in summary and "synthetic/accuracy" not in summary
    log = (out / "run.log").read_text()
    assert "12 images, classes healthy, sick, unsure" in log
    assert main(["predict", "xray", str(data / "val" / "sick" / "0.png"), "--weights", str(out)]) == 0
    assert capsys.readouterr().out.strip().split(": ")[-1] in ("healthy", "sick", "unsure")
    (data / "val" / "sick" / "0.png").write_bytes(b"not an image")
    assert main(["data", "validate", "xray", "--data", str(data)]) == 2
    assert "0.png" in capsys.readouterr().err


def test_embed_face_writes_names_and_ranks_a_gallery(runs, tmp_path, capsys):
    from kpt_plugins.face.synthetic.dataset import synthetic_pairs
    from PIL import Image

    pairs, _ = synthetic_pairs(4, "unaligned", seed=3)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(pairs.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(photos / f"{i}.png")
    out = tmp_path / "emb.npz"
    assert main(["embed", "face", str(photos), "--weights", str(runs / "face"), "--out", str(out),
                 "--gallery", str(photos), "--top", "1", "--json"]) == 0
    captured = capsys.readouterr()
    saved = np.load(out)
    names = list(saved["names"])
    skipped = [line.split(": ")[1] for line in captured.err.splitlines() if "no face" in line
               and "gallery" not in line]
    assert sorted(names + skipped) == sorted(f"{i}.png" for i in range(8)) and names
    np.testing.assert_allclose(np.linalg.norm(saved["embeddings"], axis=1), 1.0, atol=1e-5)
    ranking = json.loads(captured.out.strip().splitlines()[-1])
    assert all(matches[0][0] == query for query, matches in ranking.items())  # itself first
    npy = tmp_path / "emb.npy"
    assert main(["embed", "face", str(photos / names[0]), "--weights", str(runs / "face"),
                 "--out", str(npy)]) == 0
    assert np.load(npy).shape == (1, saved["embeddings"].shape[1])
    assert (tmp_path / "emb.names.txt").read_text() == f"{photos / names[0]}\n"
