"""kpt.metrics.verification and tar_at_far on hand-computed cases (insightface protocols)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kpt.metrics import kfold_splits, roc_curve, tar_at_far, verification
from kpt.metrics.verification import _threshold_at_far


def _pairs_at_distances(distances: list[float], scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Unit 2-D pairs whose squared L2 distance is exactly each given value (d = 2 - 2 cos φ)."""
    cos = 1.0 - np.asarray(distances) / 2.0
    a = np.tile([[1.0, 0.0]], (len(distances), 1))
    b = np.stack([cos, np.sqrt(1.0 - cos**2)], axis=1)
    return a * scale, b * 3.0 * scale  # norms are irrelevant: verification normalises


def test_kfold_splits_are_sklearn_kfold_blocks():
    splits = kfold_splits(23, 10)
    tests = [test.tolist() for _, test in splits]
    # sklearn KFold(10) on 23 items: the first 23 % 10 = 3 folds take 3 items, the rest 2, contiguous.
    assert tests[:4] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert tests[-1] == [21, 22]
    for train, test in splits:
        assert sorted(train.tolist() + test.tolist()) == list(range(23))
        assert not set(train.tolist()) & set(test.tolist())
    # 6000 LFW pairs -> ten blocks of 600: each fold is one official 300+300 split.
    assert [t[0] for _, t in kfold_splits(6000)] == list(range(0, 6000, 600))
    with pytest.raises(ValueError, match="folds"):
        kfold_splits(5, 10)
    ((train, test),) = kfold_splits(4, 1)  # insightface's LFold(1): train and test on everything
    assert train.tolist() == test.tolist() == [0, 1, 2, 3]


def test_verification_hand_computed_folds():
    # 10 folds of 2 pairs (same, different). Fold 0 is hard: its impostor (0.2055) is closer than its
    # genuine pair (0.305); elsewhere genuine 0.505, impostor 2.005.
    dist, same = [], []
    for fold in range(10):
        dist += [0.305, 0.2055] if fold == 0 else [0.505, 2.005]
        same += [True, False]
    a, b = _pairs_at_distances(dist)
    out = verification(a, b, same)
    # Every training set peaks first at t = 0.51 (17/18 or 18/18 correct); fold 0 then accepts its
    # impostor (test accuracy 0.5), the other folds are perfect.
    assert out["accuracy"] == pytest.approx(0.95)
    assert out["accuracy_std"] == pytest.approx(0.15)  # population std of [0.5, 1 x 9]
    assert out["threshold"] == pytest.approx(0.51)
    # VAL@FAR 1e-3: folds 1..9 train FAR jumps 0 -> 1/9 between t = 0.205 and 0.206, so the
    # interpolated threshold is 0.205009 and nothing of the test fold is accepted (val 0, far 0).
    # Fold 0 trains on impostors at 2.005 only: threshold ~2.005 accepts both its pairs (val 1, far 1).
    assert out["val"] == pytest.approx(0.1)
    assert out["val_std"] == pytest.approx(0.3)
    assert out["far"] == pytest.approx(0.1)


def test_verification_accepts_tensors_and_ignores_norms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    b = np.where(np.arange(200)[:, None] % 2 == 0, a + 0.7 * rng.normal(size=(200, 16)),
                 rng.normal(size=(200, 16)))
    same = np.arange(200) % 2 == 0
    ref = verification(a, b, same)
    out = verification(torch.from_numpy(a * 5.0), torch.from_numpy(b * 0.1), torch.from_numpy(same))
    assert out == pytest.approx(ref)
    assert set(ref) == {"accuracy", "accuracy_std", "threshold", "val", "val_std", "far"}
    assert 0.5 < ref["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="issame"):
        verification(a, b, same[:-1])
    with pytest.raises(ValueError, match="emb_b"):
        verification(a, b[:, :8], same)


def test_threshold_at_far_equals_old_scipy_slinear():
    # insightface calls interp1d(kind="slinear") on a FAR curve full of duplicates; old SciPy evaluated the
    # degree-1 B-spline with knots r_[x0, x, x_last]. Check the np.interp restatement against that spline.
    from scipy.interpolate import BSpline

    rng = np.random.default_rng(1)
    thresholds = np.arange(0, 4, 0.001)
    for _ in range(5):
        dist = np.sort(rng.uniform(0, 4, size=300))
        far_train = np.searchsorted(dist, thresholds, side="left") / dist.size
        far_train = np.round(far_train, 2)  # many repeated values, like a real FAR curve
        for target in (1e-3, 0.01, 0.05, far_train[1000], 0.5):
            spline = BSpline(np.r_[far_train[0], far_train, far_train[-1]], thresholds, 1)
            assert _threshold_at_far(far_train, thresholds, target) == pytest.approx(
                float(spline(target)), abs=1e-12)
    assert _threshold_at_far(np.zeros(4), np.arange(4.0), 1e-3) == 0.0  # target never reached


def test_roc_curve_drops_collinear_points_like_sklearn():
    labels = [1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.9, 0.8, 0.8, 0.7, 0.7]  # each threshold adds one TP and one FP: a straight line
    fpr, tpr, thr = roc_curve(labels, scores)
    assert fpr.tolist() == pytest.approx([0, 1 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 1])
    assert thr[0] == np.inf and thr[1:].tolist() == [0.9, 0.7]
    fpr_all, _, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert fpr_all.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_tar_at_far_hand_computed():
    labels = [1, 1, 0, 1, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    # ROC after dropping the collinear (2/3, 1) point: fpr [0,0,0,1/3,1/3,1], tpr [0,1/3,2/3,2/3,1,1].
    out = tar_at_far(scores, labels, fars=(1e-6, 0.1, 0.3, 0.6))
    assert list(out) == ["tar@far=1e-6", "tar@far=1e-1", "tar@far=3e-1", "tar@far=6e-1"]
    # FAR 1e-6 and 0.1: nearest FPR is 0; among the three points at FPR 0 the flipped search takes the
    # first, i.e. the largest TPR (2/3).
    assert out["tar@far=1e-6"] == pytest.approx(200 / 3)
    assert out["tar@far=1e-1"] == pytest.approx(200 / 3)
    assert out["tar@far=3e-1"] == pytest.approx(100.0)  # FPR 1/3: largest TPR there is 1
    assert out["tar@far=6e-1"] == pytest.approx(100.0)
    # The dropped collinear point matters: with the diagonal ROC above, FAR 0.6 is nearest to 1/3.
    diag = tar_at_far([0.9, 0.9, 0.8, 0.8, 0.7, 0.7], [1, 0, 1, 0, 1, 0], fars=(0.6,))
    assert diag["tar@far=6e-1"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="genuine"):
        tar_at_far([0.1, 0.2], [1, 1])


def test_tar_at_far_matches_sklearn_when_available():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    labels = rng.random(2000) < 0.3
    scores = np.round(rng.normal(size=2000) + labels, 1)  # rounding creates many ties
    fpr, tpr, thr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = metrics.roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
