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
    factory = pk_batch_sampler(labels, 4, 2, batches_per_epoch=5)
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
