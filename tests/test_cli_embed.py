"""Embeddings out, search in (issue 22 item 4), and faces without landmarks named by file (item 3):
`kpt predict face QUERY --gallery DIR`, `kpt embed gait`, the landmark-cache misses by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kpt.cli import main

torch.set_num_threads(1)

FACE = ["data.num_identities=4", "data.images_per_identity=4", "train.batch_size=8",
        "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.embedding_size=16",
        "eval.synthetic_pairs=20", "eval.protocols=[aligned]", "train.max_steps=1"]
GAIT = ["data.synthetic_train_ids=4", "data.synthetic_test_ids=3", "data.synthetic_seqs=2",
        "data.synthetic_frames=12", "data.frames=8", "data.k=2", "train.batch_size=4",
        "model.drop_path_rate=0.0", "train.max_steps=1"]


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("face") / "run"
    assert main(["train", "face", *FACE, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def gait_run(tmp_path_factory):
    """(run folder, the synthetic walker tree it trained on)."""
    root = tmp_path_factory.mktemp("gait")
    assert main(["train", "gait", *GAIT, f"data.cache_dir={root / 'cache'}",
                 "--out", str(root / "run")]) == 0
    (tree,) = (root / "cache").glob("gait-synthetic-*")
    return root / "run", tree


def test_predict_face_ranks_a_gallery_folder(face_run, tmp_path, capsys):
    from kpt_plugins.face.synthetic.dataset import synthetic_pairs
    from PIL import Image

    pairs, _ = synthetic_pairs(4, "unaligned", seed=3)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i, image in enumerate(pairs.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(gallery / f"{i}.png")
    queries = [str(gallery / f"{i}.png") for i in range(len(pairs.images))]
    assert main(["predict", "face", *queries, "--weights", str(face_run),
                 "--gallery", str(gallery), "--top", "2", "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ranking  # some of the unaligned faces are found
    for query, matches in ranking.items():
        assert len(matches) == 2 and matches[0][1] >= matches[1][1]
        assert matches[0][0] == Path(query).name  # the query itself is in the gallery: first
    # without --gallery predict still compares exactly two images
    with pytest.raises(SystemExit):
        main(["predict", "face", queries[0], "--weights", str(face_run)])


def test_embed_gait_writes_keyed_embeddings_and_ranks_a_gallery(gait_run, tmp_path, capsys):
    run, tree = gait_run
    sequence = tree / "0005" / "camid1_videoid0" / "seq0"
    out = tmp_path / "emb.npz"
    assert main(["embed", "gait", str(tree / "0004"), str(sequence), "--weights", str(run),
                 "--out", str(out), "--gallery", str(tree), "--top", "3", "--json"]) == 0
    saved = np.load(out)
    keys = list(saved["keys"])
    assert keys == ["0004-camid0_videoid0-seq0", "0004-camid1_videoid0-seq0",
                    "0005-camid1_videoid0-seq0"]
    assert list(saved["labels"]) == ["0004", "0004", "0005"]
    emb = saved["embeddings"]
    assert emb.shape[0] == 3 and emb.ndim == 3 and np.isfinite(emb).all()
    ranking = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(ranking) == keys
    for key, matches in ranking.items():
        assert matches[0][0] == key and matches[0][1] == pytest.approx(0.0, abs=1e-4)
        assert matches[1][1] > 0 and len(matches) == 3
    # .npy: the same embeddings, keys beside them
    npy = tmp_path / "emb.npy"
    assert main(["embed", "gait", str(sequence), "--weights", str(run / "weights.safetensors"),
                 "--out", str(npy)]) == 0
    np.testing.assert_allclose(np.load(npy)[0], emb[2], rtol=1e-5, atol=1e-5)
    assert (tmp_path / "emb.keys.txt").read_text() == "0005-camid1_videoid0-seq0\n"


def test_embed_gait_refuses_a_folder_without_sequences_and_other_runs(gait_run, face_run,
                                                                      tmp_path, capsys):
    run, tree = gait_run
    (tmp_path / "empty").mkdir()
    assert main(["embed", "gait", str(tmp_path / "empty"), "--weights", str(run),
                 "--out", str(tmp_path / "e.npz")]) == 2
    assert "no gait sequence" in capsys.readouterr().err
    assert main(["embed", "gait", str(tree / "0004"), "--weights", str(face_run),
                 "--out", str(tmp_path / "e.npz")]) == 2
    assert "face" in capsys.readouterr().err


def test_faces_without_landmarks_are_named_by_file(tmp_path):
    from kpt_plugins.face.data.datasets import FaceDataset
    from kpt_plugins.face.data.landmarks_cache import cache_path, write_landmarks
    from PIL import Image

    root = tmp_path / "faces"
    for person in ("anna", "ben"):
        (root / person).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (112, 112), (i * 90, 40, 40)).save(root / person / f"{i}.jpg")
    keypoints = np.full((4, 5, 2), 0.5, np.float32)
    write_landmarks(cache_path(root), keypoints, np.array([0.9, 0.0, 0.8, 0.0], np.float32))
    source = FaceDataset(root).keypoint_source
    assert "face found in 2 of 4" in source
    assert "no face in 2: anna/1.jpg, ben/1.jpg" in source and "anna/0.jpg" not in source


def test_record_io_faces_without_landmarks_are_named_by_record_key(tmp_path):
    from kpt_plugins.face.data.datasets import FaceDataset
    from kpt_plugins.face.data.landmarks_cache import cache_path, write_landmarks
    from kpt_plugins.face.data.recordio import encode_image, write_insightface_rec

    root = tmp_path / "rec"
    image = np.zeros((112, 112, 3), np.uint8)
    write_insightface_rec(root, [(0, encode_image(image)), (0, encode_image(image)),
                                 (1, encode_image(image))])
    write_landmarks(cache_path(root), np.full((3, 5, 2), 0.5, np.float32),
                    np.array([0.9, 0.0, 0.8], np.float32))
    # image keys start at 1 in insightface's layout: the second image is record key 2
    assert "no face in 1: record key 2" in FaceDataset(root).keypoint_source
