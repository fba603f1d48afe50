"""Synthetic faces: determinism, ground-truth landmarks, splits, pairs and RecordIO export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kpt_plugins.face.align import ARCFACE_TEMPLATE_112
from kpt_plugins.face.data.datasets import FaceDataset
from kpt_plugins.face.data.recordio import InsightFaceRec
from kpt_plugins.face.synthetic.dataset import SyntheticFaces, export_synthetic_rec, synthetic_pairs
from kpt_plugins.face.synthetic.params import identity_params, image_params
from kpt_plugins.face.synthetic.render import render_faces, template_is_mean_face

torch.set_num_threads(1)
TEMPLATE = torch.tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32)


def test_same_index_same_image_whatever_the_batch():
    a = SyntheticFaces(6, 3, "unaligned", seed=3)
    b = SyntheticFaces(6, 3, "unaligned", seed=3)
    single = a[7]
    batched = b.__getitems__([2, 7, 11])[1]
    assert torch.equal(single["image"], batched["image"])
    assert torch.equal(single["keypoints"], batched["keypoints"])
    assert single["label"].item() == 2 and single["index"].item() == 7
    other_seed = SyntheticFaces(6, 3, "unaligned", seed=4)[7]
    assert not torch.equal(single["image"], other_seed["image"])


def test_parameters_are_pure_functions_of_their_keys():
    p1 = identity_params([5, 9], seed=1)
    p2 = identity_params([9], seed=1)
    assert np.array_equal(p1["eye_dist"][1:], p2["eye_dist"])
    assert np.array_equal(p1["skin"][1], p2["skin"][0])
    q = image_params([5, 5], [0, 1], seed=1, split="aligned")
    assert not np.array_equal(q["matrix"][0], q["matrix"][1])  # samples differ
    with pytest.raises(ValueError, match="split"):
        image_params([0], [0], split="sideways")


def test_aligned_split_sits_on_the_template():
    assert template_is_mean_face(n=128) < 1.5  # canonical mean face = ArcFace template (px)
    ds = SyntheticFaces(32, 2, "aligned")
    kp = torch.stack([it["keypoints"] for it in ds.__getitems__(list(range(len(ds))))])
    assert (kp.mean(0) - TEMPLATE).abs().max() * 112 < 2.5
    assert (kp - TEMPLATE).abs().max() * 112 < 14  # identity geometry + expression + jitter
    assert kp[:, 0, 0].lt(kp[:, 1, 0]).all() and kp[:, 3, 0].lt(kp[:, 4, 0]).all()


def test_unaligned_split_moves_faces_around():
    ds = SyntheticFaces(32, 2, "unaligned")
    kp = torch.stack([it["keypoints"] for it in ds.__getitems__(list(range(len(ds))))])
    spread = kp.mean(1).std(0) * 112  # face centre position over images
    assert (spread > 8).all()
    eye_dist = (kp[:, 1] - kp[:, 0]).norm(dim=-1) * 112
    assert eye_dist.max() / eye_dist.min() > 1.5  # scale varies
    assert torch.isfinite(kp).all()


def test_landmarks_are_on_the_rendered_features():
    # eyes are drawn at the eye landmarks: a dark iris/pupil between light sclera pixels
    images, kp = render_faces(list(range(16)), [0] * 16, seed=0)
    lum = images.float().mean(1)  # (B, S, S)

    def contrast(dy: int) -> torch.Tensor:
        out = []
        for b in range(16):
            for k in (0, 1):
                x, y = (kp[b, k] * 112).round().long().tolist()
                y += dy
                centre = lum[b, y - 1 : y + 2, x - 1 : x + 2].mean()
                ring = torch.cat([lum[b, y, x - 6 : x - 4], lum[b, y, x + 5 : x + 7]]).mean()
                out.append(ring - centre)
        return torch.stack(out)

    assert (contrast(0) > 20).all()  # every eye landmark sits on an iris
    assert (contrast(4) > 20).float().mean() < 0.5  # 4 px lower there is no such pattern


def test_identities_are_learnable_but_not_trivial():
    ds = SyntheticFaces(40, 6, "aligned")
    items = ds.__getitems__(list(range(len(ds))))
    x = torch.stack([it["image"] for it in items]).float()
    y = torch.stack([it["label"] for it in items])
    feats = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
    feats = (feats - feats.mean(1, keepdim=True)) / feats.std(1, keepdim=True)
    d = torch.cdist(feats, feats)
    d.fill_diagonal_(float("inf"))
    nn_acc = (y[d.argmin(1)] == y).float().mean().item()
    assert 1 / 40 < nn_acc < 0.7  # above chance, far from solved by raw pixels


def test_pairs_alternate_and_are_deterministic():
    pairs, kp = synthetic_pairs(8, "aligned", seed=1)
    again, _ = synthetic_pairs(8, "aligned", seed=1)
    assert pairs.images.shape == (16, 3, 112, 112) and kp.shape == (16, 5, 2)
    assert pairs.issame.tolist() == [True, False] * 4
    assert torch.equal(pairs.images, again.images)
    assert not torch.equal(pairs.images[0], pairs.images[1])  # same identity, other sample
    assert pairs.name == "synthetic-aligned"


def test_export_to_recordio_with_landmarks(tmp_path):
    n = export_synthetic_rec(tmp_path, num_identities=3, images_per_identity=2, batch=4)
    assert n == 6
    rec = InsightFaceRec(tmp_path)
    assert len(rec) == 6 and rec.property == (3, 112, 112)
    ds = FaceDataset(tmp_path)
    direct = SyntheticFaces(3, 2)
    for i in (0, 5):
        item, ref = ds[i], direct[i]
        assert item["label"] == ref["label"]
        assert torch.allclose(item["keypoints"], ref["keypoints"], atol=1e-5)
        assert (item["image"].float() - ref["image"].float()).abs().mean() < 4  # JPEG q95


def test_info_is_labelled_synthetic():
    ds = SyntheticFaces(5, 2, "unaligned")
    assert ds.info["synthetic"] is True and ds.name == "synthetic-unaligned"
    assert ds.info["num_classes"] == 5
    with pytest.raises(IndexError):
        ds.__getitems__([10])


@pytest.mark.gpu
def test_renders_on_gpu_like_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ids = list(range(8))
    cpu, kp_cpu = render_faces(ids, ids, split="unaligned")
    gpu, kp_gpu = render_faces(ids, ids, split="unaligned", device="cuda")
    assert torch.allclose(kp_cpu, kp_gpu.cpu(), atol=1e-5)
    assert (cpu.float() - gpu.cpu().float()).abs().mean() < 1.0


def test_one_factor_splits_take_one_unaligned_factor_and_keep_the_rest_aligned():
    ids, samples = np.arange(200) % 20, np.arange(200)
    centre = np.array([56.0, 66.0])

    def parts(split):
        m = image_params(ids, samples, seed=3, split=split)["matrix"].astype(np.float64)
        lin, t = m[:, :, :2], m[:, :, 2]
        shift = t - centre + lin @ centre
        return np.arctan2(lin[:, 1, 0], lin[:, 0, 0]), np.linalg.norm(lin[:, :, 0], axis=1), shift

    angle_u, _, shift_u = parts("unaligned")
    angle, scale, shift = parts("unaligned_rotate")
    assert np.allclose(angle, angle_u, atol=1e-5) and np.abs(angle).max() > 0.5
    assert np.all(np.abs(scale - 1) <= 0.03 + 1e-6) and np.abs(shift).max() <= 2 + 1e-3
    angle, scale, shift = parts("unaligned_shift")
    assert np.allclose(shift, shift_u, atol=1e-3) and np.abs(shift).max() > 20
    assert np.abs(angle).max() <= 0.05 + 1e-6 and np.all(np.abs(scale - 1) <= 0.03 + 1e-6)
    angle, scale, shift = parts("unaligned_scale")
    assert scale.min() < 0.6 and scale.max() > 1.1 and np.abs(angle).max() <= 0.05 + 1e-6
    with pytest.raises(ValueError, match="split"):
        image_params(ids, samples, split="unaligned_shear")
