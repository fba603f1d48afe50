"""Face evaluation: flip fusion, the Fig. 5 alignment sweep, sweep CSV/PNG."""

from __future__ import annotations

import csv

import torch
from kpt_plugins.face.align import ARCFACE_TEMPLATE_112
from kpt_plugins.face.evaluation import (
    PairSet,
    embed,
    evaluate_pairs,
    interpolate_similarity,
    sweep_images,
    write_sweep,
)
from kpt_plugins.face.synthetic_dataset import synthetic_pairs
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
