"""Face evaluation: flip fusion, the detection crop, the Fig. 5 alignment sweep, sweep CSV/PNG."""

from __future__ import annotations

import csv

import pytest
import torch
from kpt_plugins.face.align import ARCFACE_TEMPLATE_112
from kpt_plugins.face.evaluation.sweep import interpolate_similarity, sweep_images, write_sweep
from kpt_plugins.face.evaluation.verification import (
    PairSet,
    detection_crop_matrices,
    detection_crops,
    embed,
    evaluate_pairs,
    synthetic_pair_set,
)
from kpt_plugins.face.synthetic.dataset import synthetic_pairs
from torch import nn


class _Recorder(nn.Module):
    """Embeds an image by its mean colour per channel plus its first keypoint; records calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        self.calls.append((images.clone(), keypoints.clone()))
        return torch.cat([images.mean((2, 3)), keypoints[:, 0]], 1)


class _Pixels(nn.Module):
    """Embeds an image by its centred pixels (random images are nearly orthogonal)."""

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def test_flip_fusion_sums_raw_features_of_image_and_mirror():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    keypoints = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32).repeat(4, 1, 1)
    model = _Recorder()
    out = embed(model, images, keypoints, batch_size=4)
    (x, k), (xf, kf) = model.calls
    torch.testing.assert_close(xf, x.flip(-1))
    torch.testing.assert_close(kf[:, 0, 0], 1 - k[:, 1, 0])  # mirrored, eyes swapped
    expected = nn.functional.normalize(model(x, k) + model(xf, kf), dim=1)
    torch.testing.assert_close(out, expected)


def test_verification_of_identical_pairs_is_perfect():
    # pair i = (image i, image i) for same pairs, two different random images otherwise
    torch.manual_seed(0)
    base = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    issame = torch.arange(20) % 2 == 0
    images = base.clone()
    images[1::2][issame] = base[0::2][issame]
    pairs = PairSet("toy", images, issame, torch.full((40, 5, 2), 0.5))
    result = evaluate_pairs(_Pixels(), pairs, flip=False)
    assert result["accuracy"] == 1.0


def test_sweep_moves_faces_onto_the_template():
    pairs, gt = synthetic_pairs(4, "unaligned", seed=1)
    ps = PairSet(pairs.name, pairs.images, pairs.issame, gt)
    images0, kp0 = sweep_images(ps, 0.0)
    assert (images0.int() - pairs.images.int()).abs().float().mean() < 1.0  # t=0: the raw image
    torch.testing.assert_close(kp0, gt, atol=1e-4, rtol=0)
    _, kp1 = sweep_images(ps, 1.0)
    template = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32)
    before = (gt - template).norm(dim=-1).mean() * 112
    after = (kp1 - template).norm(dim=-1).mean() * 112
    assert after < 4.0 < before  # aligned up to the similarity fit's residual (pose, expression)


def test_interpolated_similarity_endpoints():
    m = torch.tensor([[[0.8, -0.6, 10.0], [0.6, 0.8, -5.0]]])
    centre = torch.tensor([[50.0, 60.0]])
    torch.testing.assert_close(interpolate_similarity(m, 1.0, centre), m)
    eye = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    torch.testing.assert_close(interpolate_similarity(m, 0.0, centre), eye, atol=1e-5, rtol=0)


def test_write_sweep_csv_and_png(tmp_path):
    rows = {"kprpe": [{"t": 0.0, "accuracy": 0.6, "accuracy_std": 0.01, "threshold": 1.2},
                      {"t": 1.0, "accuracy": 0.8, "accuracy_std": 0.02, "threshold": 1.1}]}
    csv_path, png_path = write_sweep(rows, tmp_path / "sweep")
    with open(csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert [r["accuracy"] for r in table] == ["0.6000", "0.8000"]
    assert png_path is not None and png_path.stat().st_size > 1000


def test_detection_crop_maps_the_box_onto_the_square_crop():
    # a 40×20 white box at x 30..70, y 50..70 of a 100×120 (H×W) image
    images = torch.zeros(2, 3, 100, 120, dtype=torch.uint8)
    images[:, :, 50:70, 30:70] = 255
    boxes = torch.tensor([[30 / 120, 50 / 100, 70 / 120, 70 / 100]] * 2)
    kp = torch.tensor([[[30 / 120, 50 / 100], [70 / 120, 70 / 100], [50 / 120, 60 / 100],
                        [30 / 120, 70 / 100], [70 / 120, 50 / 100]]] * 2)
    pairs = PairSet("toy", images, torch.tensor([True]), kp)
    crop = detection_crops(pairs, boxes, size=112)
    assert crop.images.shape == (2, 3, 112, 112) and crop.images.dtype == torch.uint8
    # square side = the longer box side (40 px) → scale 112/40; the box spans all x, and the
    # middle half of y (20 of 40 px)
    expected = torch.tensor([[0.0, 0.25], [1.0, 0.75], [0.5, 0.5], [0.0, 0.75], [1.0, 0.25]])
    torch.testing.assert_close(crop.keypoints[0], expected, atol=1e-5, rtol=0)
    rows = crop.images[0, 0].float().mean(1)
    assert rows[40:72].min() > 200 and rows[:24].max() < 30 and rows[-24:].max() < 30
    with_margin = detection_crop_matrices(boxes[:1], (100, 120), 112, margin=1.0)
    torch.testing.assert_close(with_margin[0, 0, 0], torch.tensor(112 / 80))


def test_unaligned_crop_protocol_carries_ground_truth_into_the_crop():
    raw = synthetic_pair_set("unaligned", 4, seed=2, keypoints="ground_truth")
    crop = synthetic_pair_set("unaligned_crop", 4, seed=2, keypoints="ground_truth")
    assert crop.name == "synthetic-unaligned-crop" and crop.images.shape == raw.images.shape
    # GT landmarks spread less in the crop than in the raw frame: the crop undoes scale and shift
    centre = torch.tensor([0.5, 0.5])
    assert ((crop.keypoints.mean(1) - centre).norm(dim=-1).mean()
            < (raw.keypoints.mean(1) - centre).norm(dim=-1).mean())
    assert torch.isfinite(crop.keypoints).all()
    with pytest.raises(ValueError, match="unaligned_crop"):
        synthetic_pair_set("sideways", 4)


def test_building_a_synthetic_set_leaves_the_global_generator_alone():
    """Building a set (RetinaFace's construction draws random initial weights) must not move torch's
    global generator: a face run that builds the sets must train like one that finds them cached."""
    state = torch.random.get_rng_state().clone()
    pairs = synthetic_pair_set("unaligned", 6, 3, "retinaface")  # a size no other test builds
    assert torch.equal(torch.random.get_rng_state(), state)
    assert synthetic_pair_set("unaligned", 6, 3, "retinaface") is pairs  # cached
