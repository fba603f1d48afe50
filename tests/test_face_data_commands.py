"""`kpt data prepare face` / `kpt data validate face` on small data sets the tests build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kpt_plugins.face.align import ARCFACE_TEMPLATE_112, align_faces, keypoints_to_aligned
from kpt_plugins.face.data.datasets import FaceDataset, open_face_source
from kpt_plugins.face.data.landmarks_cache import cache_path, read_landmarks
from kpt_plugins.face.data.recordio import encode_image, write_insightface_rec
from kpt_plugins.face.data_commands import prepare, validate

torch.set_num_threads(1)

# astronaut landmarks (pixels) found by the bundled RetinaFace; the alignment only needs them close
ASTRONAUT_POINTS = [[204.7, 101.0], [247.3, 103.4], [223.6, 129.4], [202.6, 138.2], [244.4, 140.4]]


@pytest.fixture(scope="module")
def aligned_faces() -> tuple[np.ndarray, np.ndarray]:
    """Four 112×112 RGB crops of the astronaut (aligned, shifted, rotated, mirrored) and where
    the astronaut's landmarks land in each crop ((4, 5, 2) normalised)."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float()
    kp = torch.tensor(ASTRONAUT_POINTS)[None] / 512.0
    crops, truth = [], []
    for dx, angle in [(0.0, 0.0), (0.02, 0.0), (0.0, 0.15)]:
        c, s = np.cos(angle), np.sin(angle)
        centre = kp.mean(1, keepdim=True)
        moved = (kp - centre) @ torch.tensor([[c, s], [-s, c]], dtype=torch.float32) + centre + dx
        crop, _, m = align_faces(img, moved)
        crops.append(crop[0])
        truth.append(keypoints_to_aligned(kp, m, (512, 512))[0])
    crops.append(crops[0].flip(-1))
    mirrored = truth[0].clone()
    mirrored[:, 0] = 1 - mirrored[:, 0]
    truth.append(mirrored[[1, 0, 2, 4, 3]])  # mirror swaps left/right points
    images = torch.stack(crops).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return images, torch.stack(truth).numpy()


@pytest.fixture()
def rec_set(tmp_path, aligned_faces):
    aligned_faces = aligned_faces[0]
    blank = np.full((112, 112, 3), 90, np.uint8)
    items = [
        (0, aligned_faces[0]),
        (0, aligned_faces[1]),
        (1, aligned_faces[2]),
        (1, aligned_faces[3]),
        (2, blank),
    ]
    write_insightface_rec(tmp_path / "set", [(lab, encode_image(im)) for lab, im in items])
    return tmp_path / "set"


def test_prepare_finds_the_landmarks(rec_set, aligned_faces, capsys):
    assert prepare(["--data", str(rec_set), "--batch-size", "3", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "4/5 faces found" in out
    keypoints, scores = read_landmarks(cache_path(rec_set), expected=5)
    template = ARCFACE_TEMPLATE_112 / 112
    truth = aligned_faces[1]
    for i in range(4):  # detections agree with where the landmarks were warped to
        assert np.abs(keypoints[i] - truth[i]).max() * 112 < 6, i
        assert scores[i] > 0.5
    assert scores[4] == 0 and np.allclose(keypoints[4], template, atol=1e-4)  # blank: fallback
    # a second run keeps the cache unless forced
    assert prepare(["--data", str(rec_set)]) == 0
    assert "exists" in capsys.readouterr().out
    ds = FaceDataset(rec_set)
    item = ds[2]
    assert item["image"].shape == (3, 112, 112) and item["image"].dtype == torch.uint8
    assert torch.allclose(item["keypoints"], torch.from_numpy(keypoints[2]))
    assert item["label"].item() == 1


def test_validate_clean_and_corrupt(rec_set, capsys):
    assert validate(["--data", str(rec_set)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "images: 5" in out and "identity records: 3" in out
    # corrupt the JPEG of key 3 (keep the framing intact) and drop key 4 from the index
    rec = rec_set / "train.rec"
    idx = dict(line.split("\t") for line in (rec_set / "train.idx").read_text().splitlines())
    raw = bytearray(rec.read_bytes())
    start = int(idx["3"]) + 8 + 24  # chunk header + IRHeader → JPEG bytes
    raw[start : start + 200] = bytes(200)
    rec.write_bytes(bytes(raw))
    lines = [f"{k}\t{v}" for k, v in idx.items() if k != "4"]
    (rec_set / "train.idx").write_text("\n".join(lines) + "\n")
    assert validate(["--data", str(rec_set)]) == 1
    out = capsys.readouterr().out
    assert "key 3" in out and "do not decode" in out
    assert "missing" in out and "[4]" in out
    assert "not in" in out  # the record of key 4 is still in the .rec but not indexed


def test_validate_and_open_image_folder(tmp_path, aligned_faces, capsys):
    aligned_faces = aligned_faces[0]
    for name, imgs in {"a": aligned_faces[:2], "b": aligned_faces[2:]}.items():
        (tmp_path / name).mkdir()
        for j, im in enumerate(imgs):
            (tmp_path / name / f"{j}.jpg").write_bytes(encode_image(im))
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    kind, source = open_face_source(tmp_path)
    assert kind == "folder" and len(source) == 5
    assert validate(["--data", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "identities: 2" in out
    assert validate(["--data", str(tmp_path / "nowhere")]) == 1


def test_bin_and_tinyface_paths(tmp_path, aligned_faces, capsys):
    from kpt_plugins.face.data.bin_pairs import write_bin

    images = aligned_faces[0]
    path = tmp_path / "lfw.bin"
    write_bin(path, images, np.array([True, False]))
    assert validate(["--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pairs: 2" in out and "same pairs: 1" in out
    assert prepare(["--data", str(path)]) == 0
    assert cache_path(path).name == "lfw.bin.ldmk_5points.csv"
    keypoints, _ = read_landmarks(cache_path(path), expected=4)
    assert np.abs(keypoints - aligned_faces[1]).max() * 112 < 6
    base = tmp_path / "tinyface"
    for folder, names in {
        "Probe": ["7_1.jpg"],
        "Gallery_Match": ["7_2.jpg"],
        "Gallery_Distractor": ["x.jpg"],
    }.items():
        (base / folder).mkdir(parents=True)
        for n, im in zip(names, images):
            (base / folder / n).write_bytes(encode_image(im))
    assert validate(["--data", str(base)]) == 0
    out = capsys.readouterr().out
    assert "tinyface" in out and "probes: 1" in out and "distractors: 1" in out
