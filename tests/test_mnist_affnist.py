"""affNIST .mat reading, affnist-synth determinism and ranges, digit-box keypoints, drawn channels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from kpt_plugins.mnist import affnist
from kpt_plugins.mnist.drawn import draw_keypoints
from kpt_plugins.mnist.keypoints import BoxKeypoints, box_keypoints, tight_boxes


def write_affnist_mat(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The official layout: affNISTdata struct, image 1600×N (column = row-major 40×40 image)."""
    from scipy.io import savemat

    n = len(images)
    one_hot = np.zeros((10, n), np.uint8)
    one_hot[labels, np.arange(n)] = 1
    struct = {"affine_transform": np.zeros((6, n)), "image": images.reshape(n, -1).T,
              "label_int": labels[None].astype(np.uint8), "label_one_of_n": one_hot}
    savemat(str(path), {"affNISTdata": struct})


def test_affnist_mat_orientation_and_labels(tmp_path: Path) -> None:
    images = np.zeros((3, 40, 40), np.uint8)
    images[0, 2, 30] = 255   # row 2, column 30: must stay there (no transpose)
    images[1, 35, 1] = 128
    images[2, 10:20, 5] = 7
    labels = np.array([4, 0, 9])
    write_affnist_mat(tmp_path / "1.mat", images, labels)
    x, y = affnist.read_affnist_mat(tmp_path / "1.mat")
    np.testing.assert_array_equal(x, images)
    assert y.tolist() == [4, 0, 9] and x.dtype == np.uint8


def test_affnist_batches_found_in_numeric_order(tmp_path: Path) -> None:
    batches = tmp_path / "test_batches"
    batches.mkdir()
    for i in (1, 2, 10):
        write_affnist_mat(batches / f"{i}.mat", np.full((2, 40, 40), i, np.uint8),
                          np.array([i % 10, i % 10]))
    files = affnist.find_affnist_files(tmp_path)
    assert [p.name for p in files] == ["1.mat", "2.mat", "10.mat"]
    x, y = affnist.load_affnist(files, limit=5)
    assert x.shape == (5, 40, 40) and x[4, 0, 0] == 10 and y.tolist() == [1, 1, 2, 2, 0]


def test_affnist_mat_errors(tmp_path: Path) -> None:
    from scipy.io import savemat

    savemat(str(tmp_path / "a.mat"), {"other": np.zeros(3)})
    with pytest.raises(affnist.AffnistDataError, match="no 'affNISTdata'"):
        affnist.read_affnist_mat(tmp_path / "a.mat")
    savemat(str(tmp_path / "b.mat"), {"affNISTdata": {"image": np.zeros((100, 2)),
                                                      "label_int": np.zeros((1, 2))}})
    with pytest.raises(affnist.AffnistDataError, match=r"expected \(1600, N\)"):
        affnist.read_affnist_mat(tmp_path / "b.mat")


def square_digits(n: int = 64) -> torch.Tensor:
    """Centred 28×28 test digits: filled squares of varying size (uint8)."""
    x = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        s = 6 + i % 8
        x[i, 14 - s:14 + s, 14 - s // 2:14 + s // 2] = 255
    return x


def test_synth_is_deterministic_and_seeded() -> None:
    digits, labels = square_digits(), torch.arange(64) % 10
    a, ya = affnist.make_affnist_synth(digits, labels, versions=2, seed=5)
    b, _ = affnist.make_affnist_synth(digits, labels, versions=2, seed=5)
    c, _ = affnist.make_affnist_synth(digits, labels, versions=2, seed=6)
    assert a.shape == (128, 40, 40) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ya, labels.repeat(2))
    assert not torch.equal(a[:64], a[64:])  # versions differ


def test_synth_keeps_digits_inside_and_moves_them() -> None:
    digits, labels = square_digits(), torch.zeros(64, dtype=torch.long)
    x, _ = affnist.make_affnist_synth(digits, labels, seed=1)
    boxes, found = tight_boxes(x)
    assert found.all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 40).all()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert centres.std(0).min() > 2.0  # translated, not all centred
    # translation-only: shapes keep their size, only positions change
    t, _ = affnist.make_affnist_synth(digits, labels, seed=1,
                                      ranges=affnist.synth_variant("translation"))
    tb, _ = tight_boxes(t)
    ob, _ = tight_boxes(affnist.center_pad(digits))
    torch.testing.assert_close(tb[:, 2:] - tb[:, :2], ob[:, 2:] - ob[:, :2], atol=1.0, rtol=0)


def test_rotation_only_respects_the_range() -> None:
    # A horizontal bar rotated by θ: its box aspect gives |θ| ≤ 20° (plus a pixel of resampling).
    bar = torch.zeros(16, 40, 40)
    bar[:, 19:21, 6:34] = 1.0
    gen = torch.Generator().manual_seed(0)
    out = affnist.random_affine(bar, affnist.synth_variant("rotation"), gen)
    boxes, _ = tight_boxes(out, 0.5)
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    assert (h <= 28 * math.sin(math.radians(20)) + 2 + 2).all()
    assert (h > 3).any()  # some rotation happened
    assert (w >= 28 * math.cos(math.radians(20)) - 2).all()


def test_warp_identity_and_translation() -> None:
    x = torch.zeros(1, 40, 40)
    x[0, 10, 12] = 1.0
    eye = torch.eye(2, dtype=torch.float64)[None]
    torch.testing.assert_close(affnist.warp(x, eye, torch.zeros(1, 2, dtype=torch.float64)), x)
    moved = affnist.warp(x, eye, torch.tensor([[3.0, -2.0]], dtype=torch.float64))
    assert moved[0, 8, 15] == pytest.approx(1.0, abs=1e-5)  # x + 3, y − 2


def test_box_keypoints_of_a_known_box() -> None:
    img = torch.zeros(2, 1, 40, 40, dtype=torch.uint8)
    img[0, 0, 5:15, 8:30] = 200          # rows 5..14, columns 8..29
    kp = box_keypoints(img)
    expected = torch.tensor([[8, 5], [30, 5], [8, 15], [30, 15], [19, 10]], dtype=torch.float32) / 40
    torch.testing.assert_close(kp[0], expected)
    # a blank image gets the frame, reported as not found
    kp2, found = BoxKeypoints()(img)
    assert found.tolist() == [True, False]
    torch.testing.assert_close(kp2[1], torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [.5, .5]]))
    # faint pixels below the threshold are background
    img[0, 0, 0, 0] = 20
    torch.testing.assert_close(box_keypoints(img)[0], expected)


def test_keypoints_follow_a_translated_digit() -> None:
    digits = square_digits(8)
    padded = affnist.center_pad(digits)
    shifted = torch.roll(padded, (3, -4), dims=(1, 2))
    delta = box_keypoints(shifted) - box_keypoints(padded)
    torch.testing.assert_close(delta, torch.tensor([-4 / 40, 3 / 40]).expand_as(delta))


def test_drawn_keypoint_channels_peak_at_keypoints() -> None:
    kp = torch.tensor([[[0.5125, 0.2625], [0.0125, 0.9875]]])   # pixel centres (20, 10), (0, 39)
    maps = draw_keypoints(kp, 40, 40, sigma=2.0)
    assert maps.shape == (1, 2, 40, 40)
    assert maps[0, 0].argmax().item() == 10 * 40 + 20
    assert maps[0, 1].argmax().item() == 39 * 40 + 0
    assert maps.max().item() == pytest.approx(1.0, abs=1e-6) and maps.min() >= 0
