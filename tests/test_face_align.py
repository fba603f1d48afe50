"""Alignment: Umeyama similarity to the ArcFace template, warp and keypoint frames."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from kpt_plugins.face.align import (
    ARCFACE_TEMPLATE_112,
    align_faces,
    arcface_template,
    invert_affine,
    keypoints_from_aligned,
    keypoints_to_aligned,
    transform_points,
    umeyama_similarity,
    warp_affine,
)

T112 = torch.tensor(ARCFACE_TEMPLATE_112)


def _similarity(scale: float, angle: float, tx: float, ty: float) -> torch.Tensor:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return torch.tensor([[c, -s, tx], [s, c, ty]], dtype=torch.float64)


def test_template_onto_itself_is_identity():
    m = umeyama_similarity(T112, T112)
    assert torch.allclose(
        m, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64), atol=1e-10
    )


def test_recovers_a_known_similarity_batched():
    truth = torch.stack([_similarity(0.6, 0.3, 12.0, -5.0), _similarity(2.1, -1.2, -40.0, 7.5)])
    inv = invert_affine(truth)
    src = transform_points(T112.expand(2, -1, -1), inv)  # template seen through the inverse
    m = umeyama_similarity(src, T112)
    assert torch.allclose(m, truth, atol=1e-9)


def test_matches_skimage_on_noisy_points():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    src = ARCFACE_TEMPLATE_112 * 2.3 + rng.normal(0, 4.0, (5, 2)) + [70, 10]
    ref = transform.SimilarityTransform.from_estimate(src, ARCFACE_TEMPLATE_112).params[:2]
    ours = umeyama_similarity(torch.tensor(src), T112).numpy()
    assert np.abs(ours - ref).max() < 1e-9


def test_no_reflection_for_mirrored_points():
    mirrored = T112.clone()
    mirrored[:, 0] = 112 - mirrored[:, 0]
    m = umeyama_similarity(mirrored, T112)
    assert torch.linalg.det(m[:, :2]) > 0  # a proper rotation, never a flip


def test_template_sizes():
    assert np.allclose(arcface_template(224), ARCFACE_TEMPLATE_112 * 2)
    t128 = arcface_template(128)
    assert np.allclose(t128[:, 0], ARCFACE_TEMPLATE_112[:, 0] + 8)
    with pytest.raises(ValueError, match="multiple"):
        arcface_template(100)


def test_warp_equals_opencv():
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (90, 70, 3)).astype(np.float32), (5, 5), 1.5)
    m = _similarity(1.3, 0.4, -10.0, 20.0)
    ref = cv2.warpAffine(img, m.numpy(), (112, 112))
    ours = warp_affine(torch.from_numpy(img).permute(2, 0, 1)[None], m[None].float(), (112, 112))
    diff = np.abs(ours[0].permute(1, 2, 0).numpy() - ref)
    assert diff[2:-2, 2:-2].max() < 0.05  # interior identical up to float rounding
    assert diff.mean() < 0.05


def test_align_faces_maps_keypoints_to_template_and_back():
    # draw five dots at a rotated/scaled template in a 160×200 image, then align
    truth = _similarity(1.4, 0.5, 30.0, -10.0)
    pts = transform_points(T112, truth)  # source pixels
    img = np.zeros((200, 160), np.float32)
    for x, y in pts.numpy():
        cv2.circle(img, (round(x), round(y)), 3, 1.0, -1)
    images = torch.from_numpy(img)[None, None]
    kp = (pts / torch.tensor([160.0, 200.0]))[None].float()
    aligned, kp_aligned, m = align_faces(images, kp)
    assert aligned.shape == (1, 1, 112, 112)
    assert torch.allclose(kp_aligned[0] * 112, T112.float(), atol=1e-3)
    for x, y in ARCFACE_TEMPLATE_112:  # each dot landed on its template point
        assert aligned[0, 0, round(y), round(x)] > 0.5
    back = keypoints_from_aligned(kp_aligned, m, (200, 160))
    assert torch.allclose(back, kp, atol=1e-5)
    again = keypoints_to_aligned(back, m, (200, 160))
    assert torch.allclose(again, kp_aligned, atol=1e-5)


def test_align_is_differentiable():
    kp = torch.tensor(ARCFACE_TEMPLATE_112 / 112 * 0.8 + 0.1, dtype=torch.float32)[None]
    kp.requires_grad_(True)
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    aligned, _, _ = align_faces(images, kp)
    aligned.sum().backward()
    assert torch.isfinite(kp.grad).all() and kp.grad.abs().sum() > 0
    assert images.grad.abs().sum() > 0
