"""Face training augmentation: keypoints follow the pixels, flips swap left/right, RA sampler."""

from __future__ import annotations

import numpy as np
import torch
from kpt_plugins.face.align import ARCFACE_TEMPLATE_112
from kpt_plugins.face.data.augment import (
    FLIP_PERMUTATION,
    FaceAugment,
    FaceCollate,
    RepeatedAugmentSampler,
)

from kpt.data.keypoints import hflip_keypoints


def _blob_images(keypoints: torch.Tensor, size: int = 112) -> torch.Tensor:
    """One image per (batch, keypoint) with a Gaussian blob at that keypoint: (B·K, 1, S, S)."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(),
                            indexing="ij")
    px = keypoints.reshape(-1, 2) * size
    d2 = (xs[None] - px[:, 0, None, None]) ** 2 + (ys[None] - px[:, 1, None, None]) ** 2
    return (255 * torch.exp(-d2 / (2 * 2.0**2))).unsqueeze(1)


def _centroids(images: torch.Tensor) -> torch.Tensor:
    """Intensity centroid (x, y) in pixels of (N, 1, S, S) images."""
    size = images.shape[-1]
    grid = torch.arange(size).float()
    w = images[:, 0].clamp_min(0)
    total = w.sum((1, 2))
    return torch.stack([(w.sum(1) * grid).sum(1) / total, (w.sum(2) * grid).sum(1) / total], -1)


def test_keypoints_follow_the_pixels():
    torch.manual_seed(0)
    b = 12
    template = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32)
    keypoints = template.expand(b, -1, -1) + 0.02 * torch.randn(b, 5, 2)
    images = _blob_images(keypoints)  # (b·5, 1, S, S): image j shows keypoint j % 5 of face j // 5
    # the same random transform for the 5 blob images of one face: sample per face, repeat
    aug = FaceAugment(rot_prob=0.5, hflip_prob=0.5)
    gen = torch.Generator().manual_seed(3)
    theta, hflip = aug.sample_theta(b, gen)
    from kpt_plugins.face.data.augment import transform_keypoints

    grid = torch.nn.functional.affine_grid(theta.repeat_interleave(5, 0), list(images.shape),
                                           align_corners=True)
    warped = torch.nn.functional.grid_sample(images, grid, align_corners=True)
    moved = transform_keypoints(keypoints, theta, hflip, (112, 112))
    # undo the left/right swap to compare point k with blob k
    perm = torch.tensor([1, 0, 2, 4, 3])
    unswapped = torch.where(hflip[:, None, None], moved[:, perm], moved)
    centroids = _centroids(warped).reshape(b, 5, 2)
    err = (centroids - unswapped * 112).norm(dim=-1)
    assert hflip.any() and (~hflip).any()
    assert float(err.max()) < 0.6, err


def test_flip_keeps_eye_order_and_mirrors_x():
    template = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32)[None]
    flipped = hflip_keypoints(template, FLIP_PERMUTATION)
    assert flipped[0, 0, 0] < flipped[0, 1, 0]  # index 0 stays the eye with the smaller x
    assert flipped[0, 3, 0] < flipped[0, 4, 0]
    torch.testing.assert_close(flipped[0, 0, 0], 1 - template[0, 1, 0])
    torch.testing.assert_close(hflip_keypoints(flipped, FLIP_PERMUTATION), template)
    # a pure mirror through the augmentation gives the same keypoints as hflip_keypoints
    aug = FaceAugment(scale_min=1.0, scale_max=1.0, rot_prob=0.0, hflip_prob=1.0, extra_offset=0.0)
    _, moved = aug(torch.zeros(1, 3, 112, 112), template)
    torch.testing.assert_close(moved, flipped, atol=1.01 / 112, rtol=0)  # exact mirror: W − 1 − x


def test_collate_normalises_and_keeps_keypoints_in_range():
    items = [{"image": torch.full((3, 112, 112), 255, dtype=torch.uint8),
              "keypoints": torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32),
              "label": torch.tensor(i)} for i in range(4)]
    batch = FaceCollate(None)(items)
    assert batch["image"].dtype == torch.float32 and float(batch["image"].max()) == 1.0
    batch = FaceCollate(FaceAugment(scale_min=0.5, scale_max=0.5))(items)
    assert float(batch["image"].min()) == -1.0  # black border after zooming out
    assert 0.0 <= float(batch["keypoints"].min()) and float(batch["keypoints"].max()) <= 1.0


def test_repeated_augmentation_replaces_with_same_identity():
    labels = np.repeat(np.arange(50), 4)
    sampler = RepeatedAugmentSampler(labels, batch_size=20, seed=1, prob=1.0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10
    for batch in batches:
        assert len(batch) == 20
        # with prob 1 every other sample is replaced (never twice in a row): pairs of one identity
        assert all(labels[batch[i]] == labels[batch[i - 1]] for i in range(1, 20, 2))
    plain = RepeatedAugmentSampler(labels, batch_size=20, seed=1, prob=0.0)
    assert sorted(i for b in plain for i in b) == list(range(200))
    again = RepeatedAugmentSampler(labels, batch_size=20, seed=1, prob=0.3)
    assert list(again) == list(RepeatedAugmentSampler(labels, 20, seed=1, prob=0.3))


def test_keypoint_jitter_moves_each_point_within_bound_and_leaves_image():
    template = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32)
    items = [{"image": torch.full((3, 112, 112), 128, dtype=torch.uint8), "keypoints": template,
              "label": torch.tensor(i)} for i in range(64)]
    no_geometry = FaceAugment(scale_min=1.0, scale_max=1.0, rot_prob=0.0, hflip_prob=0.0,
                              extra_offset=0.0)
    torch.manual_seed(0)
    plain = FaceCollate(no_geometry)(items)
    torch.manual_seed(0)
    jittered = FaceCollate(no_geometry, keypoint_jitter=4.0)(items)
    torch.testing.assert_close(jittered["image"], plain["image"])
    moved = (jittered["keypoints"] - plain["keypoints"]) * 112  # pixels
    assert float(moved.abs().max()) <= 4.0 + 1e-4
    assert float(moved.abs().max()) > 3.0  # uses the range (64×5×2 draws)
    # every point draws its own offset: the five points of one face do not move together
    assert float((moved - moved.mean(dim=1, keepdim=True)).abs().max()) > 1.0
    # evaluation (no augmentation) never jitters
    evaluation = FaceCollate(None, keypoint_jitter=4.0)(items)
    torch.testing.assert_close(evaluation["keypoints"], template.expand(64, 5, 2))


def test_negative_keypoint_jitter_is_refused():
    import pytest

    with pytest.raises(ValueError, match="keypoint_jitter"):
        FaceCollate(None, keypoint_jitter=-1.0)


def test_keypoint_blind_gives_the_template_whatever_the_augmentation():
    template = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32)
    items = [{"image": torch.full((3, 112, 112), 128, dtype=torch.uint8),
              "keypoints": template + 0.05 * i, "label": torch.tensor(i)} for i in range(8)]
    torch.manual_seed(0)
    seeing = FaceCollate(FaceAugment(rot_prob=1.0))(items)
    torch.manual_seed(0)
    blind = FaceCollate(FaceAugment(rot_prob=1.0), keypoint_blind=True)(items)
    torch.testing.assert_close(blind["image"], seeing["image"])  # the same augmented pixels
    torch.testing.assert_close(blind["keypoints"], template.expand(8, 5, 2))
    assert float((seeing["keypoints"] - template).abs().max()) > 0.05  # what blind hides
