"""Shared data utilities: samplers (sharding, P×K, resume skipping) and keypoint helpers;
kpt.load_model on a bare model file."""

from __future__ import annotations

import pytest
import torch

import kpt
from kpt.data.keypoints import (
    affine_keypoints,
    check_keypoints,
    denormalize_keypoints,
    fill_missing,
    hflip_keypoints,
    normalize_keypoints,
)
from kpt.data.samplers import PKBatchSampler, ShardedBatchSampler, SkipBatches, pk_batch_sampler
from kpt.errors import UserError


def test_sharded_batches_union_equals_single_process_batch():
    single = ShardedBatchSampler(50, 8, seed=3)
    ranks = [ShardedBatchSampler(50, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(1)
    assert len(single) == len(ranks[0]) == 6  # 50 // 8, incomplete batch dropped
    for whole, a, b in zip(single, *ranks):
        assert sorted(whole) == sorted(a + b) and not set(a) & set(b)
    single.set_epoch(2)
    assert list(single) != list(ShardedBatchSampler(50, 8, seed=3))  # reshuffled per epoch
    assert [i for batch in ShardedBatchSampler(16, 4, shuffle=False) for i in batch] == list(range(16))


def test_pk_sampler_identities_and_ranks():
    labels = [i // 3 for i in range(30)] + [99]  # 10 labels with 3 samples, one with 1
    sampler = PKBatchSampler(labels, p=4, k=2, seed=0)
    assert len(sampler) == 31 // 8
    for batch in sampler:
        got = [labels[i] for i in batch]
        assert len(batch) == 8 and len(set(got)) == 4 and all(got.count(x) == 2 for x in set(got))
    ranks = [PKBatchSampler(labels, 4, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for whole, a, b in zip(sampler, *ranks):
        assert whole == a + b and not {labels[i] for i in a} & {labels[i] for i in b}
    factory = pk_batch_sampler(2, labels, batches_per_epoch=5)
    assert len(factory(None, 8, 0, 0, 1)) == 5
    with pytest.raises(ValueError, match="multiple of the world size"):
        PKBatchSampler(labels, p=3, k=2, world_size=2)
    with pytest.raises(ValueError, match="only 11 labels"):
        PKBatchSampler(labels, p=12, k=2)


def test_skip_batches_resumes_mid_epoch():
    base = ShardedBatchSampler(40, 5, seed=1)
    assert list(SkipBatches(base, 3)) == list(base)[3:] and len(SkipBatches(base, 3)) == 5


def test_keypoint_helpers():
    px = torch.tensor([[[10.0, 20.0], [30.0, 5.0]]])
    kp = normalize_keypoints(px, width=40, height=20)
    torch.testing.assert_close(kp, torch.tensor([[[0.25, 1.0], [0.75, 0.25]]]))
    torch.testing.assert_close(denormalize_keypoints(kp, 40, 20), px)
    check_keypoints(kp, num_keypoints=2)
    with pytest.raises(ValueError, match="divided by the image width"):
        check_keypoints(px, what="src")
    with pytest.raises(ValueError, match="NaN"):
        check_keypoints(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="K=3"):
        check_keypoints(kp, num_keypoints=3)
    flipped = hflip_keypoints(kp, flip_index=[1, 0])
    torch.testing.assert_close(flipped, torch.tensor([[[0.25, 0.25], [0.75, 1.0]]]))
    shift = torch.tensor([[1.0, 0.0, 4.0], [0.0, 1.0, -2.0]])  # +4 px in x, -2 px in y
    moved = affine_keypoints(kp, shift, src_size=(20, 40))
    torch.testing.assert_close(denormalize_keypoints(moved, 40, 20), px + torch.tensor([4.0, -2.0]))
    found = torch.tensor([True, False])
    both = torch.cat([kp, kp])
    canonical = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    filled = fill_missing(both, found, canonical)
    torch.testing.assert_close(filled[0], kp[0])
    torch.testing.assert_close(filled[1], canonical)


def test_load_model_delegates_bare_model_files(tmp_path):
    from kpt.models.serialization import save_model

    model = kpt.create_model("vit", img_size=16, patch_size=8, in_chans=1, embed_dim=16, depth=1,
                             num_heads=2, num_classes=3, pos="abs")
    path = save_model(model, tmp_path / "bare.safetensors")
    loaded = kpt.load_model(str(path))
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x, None), model.eval()(x, None))


class _Labelled:
    def __init__(self, labels):
        self.labels = labels


def test_pk_batch_sampler_takes_p_from_the_batch_size():
    labels = [i // 4 for i in range(48)]  # 12 identities, 4 samples each
    factory = pk_batch_sampler(2)
    single = factory(_Labelled(labels), 8, 5, 0, 1)
    # the order the gait plugin's own factory drew (P = batch // k), so resumed runs match
    assert list(single) == list(PKBatchSampler(labels, 4, 2, seed=5))
    assert all(len(b) == 8 and len({labels[i] for i in b}) == 4 for b in single)
    # under DDP each rank gets the per-process batch; together they are one global batch
    ranks = [factory(_Labelled(labels), 4, 5, r, 2) for r in range(2)]
    for whole, a, b in zip(single, *ranks):
        assert len(a) == len(b) == 4 and sorted(whole) == sorted(a + b)
    with pytest.raises(UserError, match="train.batch_size=7 must be a multiple"):
        factory(_Labelled(labels), 7, 0, 0, 1)
    with pytest.raises(TypeError, match="labels"):
        factory(object(), 8, 0, 0, 1)


def test_check_keypoints_shapes_batch_frames_and_range():
    clips = torch.rand(2, 3, 4, 2)
    assert check_keypoints(clips, 4, batch_size=2, frames=3) is clips
    with pytest.raises(ValueError, match=r"\(B=2, K=4, 2\)"):
        check_keypoints(clips, 4, batch_size=2, sequence=False, what="vit")
    with pytest.raises(ValueError, match="frames"):
        check_keypoints(clips, 4, frames=5)
    with pytest.raises(ValueError, match="batch 2 does not match the images batch 3"):
        check_keypoints(clips, batch_size=3)
    with pytest.raises(ValueError, match=r"m\(pos='kprpe'\) uses keypoints .* without them"):
        check_keypoints(None, 4, what="m(pos='kprpe')")
    with pytest.raises(TypeError, match="got list"):
        check_keypoints([[0.5, 0.5]])
    with pytest.raises(ValueError, match="dtype torch.int64"):
        check_keypoints(torch.zeros(1, 2, 2, dtype=torch.long))
    far = torch.full((1, 2, 2), 3.0)
    assert check_keypoints(far, tolerance=None) is far  # a backbone accepts points off the image
    bad = clips.clone()
    bad[1, 2, 3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf \(samples \[1\]\)"):
        check_keypoints(bad, tolerance=None)


def test_check_keypoints_reads_the_device_once(monkeypatch):
    """Finite flag and range come back in one transfer (one host sync on a GPU)."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda t, _real=real, _name=name: reads.append(_name) or _real(t))
    check_keypoints(torch.rand(4, 5, 2))
    assert len(reads) == 1
    reads.clear()
    check_keypoints(torch.rand(4, 5, 2), tolerance=None)
    assert len(reads) == 1


def _face_flip(points):
    """The face plugin's former flip: permute (1, 0, 2, 4, 3), then x -> 1 - x."""
    out = points[:, [1, 0, 2, 4, 3]].clone()
    out[..., 0] = 1.0 - out[..., 0]
    return out


def _face_transform_points(points, m):
    """The face plugin's pixel affine: (B, K, 2) @ (B, 2, 3)."""
    return points @ m[..., :2].transpose(-1, -2) + m[..., 2].unsqueeze(-2)


def test_core_keypoint_helpers_match_the_face_plugin_versions():
    torch.manual_seed(0)
    kp = torch.rand(3, 5, 2)
    flipped = hflip_keypoints(kp, (1, 0, 2, 4, 3))  # a tuple, as the face plugin declares it
    assert torch.equal(flipped, _face_flip(kp))
    assert torch.equal(hflip_keypoints(flipped, (1, 0, 2, 4, 3)), kp)
    m = torch.randn(3, 2, 3)
    h, w, size = 30, 20, 16
    src = torch.tensor([w, h], dtype=torch.float32)
    want = _face_transform_points(kp * src, m) / size
    assert torch.equal(affine_keypoints(kp, m, (h, w), (size, size)), want)
    # unbatched points and one matrix for all, as the face code also uses them
    assert torch.equal(affine_keypoints(kp[0], m[0], (h, w)), _face_transform_points(kp[0] * src, m[0]) / src)
    torch.testing.assert_close(affine_keypoints(kp, m[0], (h, w))[2], affine_keypoints(kp[2], m[0], (h, w)))
    per_sample = torch.rand(3, 5, 2)
    found = torch.tensor([True, False, True])
    torch.testing.assert_close(fill_missing(kp, found, per_sample)[1], per_sample[1])
    torch.testing.assert_close(fill_missing(kp, found, per_sample)[2], kp[2])
