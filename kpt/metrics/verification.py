"""1:1 pair verification as insightface evaluates LFW, CFP-FP, AgeDB-30, CALFW, CPLFW.

Protocol (insightface ``recognition/arcface_torch/eval/verification.py::evaluate``; AdaFace's
``evaluate_utils.evaluate`` is the same algorithm):

* both embeddings are L2-normalised and compared by the **squared** L2 distance ``d = ||a - b||²``
  (``= 2 - 2 cos``); a pair is predicted "same" when ``d < t`` (strict);
* 10 contiguous folds (``KFold(10, shuffle=False)``): for each fold the threshold maximising accuracy on the
  other nine folds (thresholds ``arange(0, 4, 0.01)``, first maximum on ties) is applied to the held-out fold;
  ``accuracy`` is the mean of the ten fold accuracies and ``accuracy_std`` their population std;
* VAL@FAR: per fold, the threshold reaching ``far`` on the training folds (thresholds ``arange(0, 4, 0.001)``,
  linear interpolation of threshold against FAR) gives the held-out validation rate and false accept rate.

Flip fusion (summing the un-normalised features of the image and its mirror) is the caller's job, before this
function, exactly as insightface's ``test`` does it.
"""

from __future__ import annotations

import numpy as np

from kpt.metrics.common import ArrayLike, as_bool, as_features, l2_normalize

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)  # insightface: 400 values 0 .. 3.99
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # insightface calculate_val: 4000 values


def kfold_splits(n: int, folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous (train, test) index splits, identical to ``sklearn.model_selection.KFold(folds)``.

    sklearn is not a kpt dependency and this is ten lines: the first ``n % folds`` test blocks hold
    ``n // folds + 1`` items, the others ``n // folds``, in order, without shuffling. Because the blocks are
    contiguous, each fold is one official protocol split when the pair file keeps the protocol order.

    Args:
        n: number of items (pairs).
        folds: number of folds (folds <= n); 1 trains and tests on all pairs, as insightface's ``LFold``.

    Returns:
        ``folds`` tuples ``(train_indices, test_indices)`` of int64 arrays.
    """
    indices = np.arange(n)
    if folds == 1:  # insightface's LFold: one "fold" that trains and tests on everything
        return [(indices, indices)]
    if folds < 1:
        raise ValueError(f"folds: need at least 1 fold, got {folds}")
    if n < folds:
        raise ValueError(f"folds: cannot split {n} pairs into {folds} folds")
    sizes = np.full(folds, n // folds, dtype=np.int64)
    sizes[: n % folds] += 1
    splits = []
    start = 0
    for size in sizes:
        test = indices[start:start + size]
        train = np.concatenate([indices[:start], indices[start + size:]])
        splits.append((train, test))
        start += size
    return splits


def _counts_below(sorted_dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of distances strictly below each threshold (``dist < t``), for sorted ``dist``."""
    return np.searchsorted(sorted_dist, thresholds, side="left")


def _accept_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """True and false accepts at every threshold: ``(tp (T,), fp (T,), n_same, n_diff)``."""
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    return _counts_below(same, thresholds), _counts_below(diff, thresholds), same.size, diff.size


def _accuracy_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, TPR and FPR at each threshold (insightface ``calculate_accuracy``, vectorised).

    Returns:
        ``(accuracy (T,), tpr (T,), fpr (T,))``; a rate whose denominator is zero is 0, as insightface.
    """
    tp, fp, n_same, n_diff = _accept_counts(dist, issame, thresholds)
    tn = n_diff - fp
    accuracy = (tp + tn) / dist.size
    tpr = tp / n_same if n_same else np.zeros(thresholds.size)
    fpr = fp / n_diff if n_diff else np.zeros(thresholds.size)
    return accuracy, tpr, fpr


def _val_far(dist: np.ndarray, issame: np.ndarray, threshold: float) -> tuple[float, float]:
    """Validation rate ``TA / n_same`` and false accept rate ``FA / n_diff`` at one threshold.

    insightface divides by zero when a fold has no positive (or no negative) pair; NaN is returned then.
    """
    accept = dist < threshold
    n_same = int(issame.sum())
    n_diff = int(issame.size - n_same)
    val = float(np.sum(accept & issame)) / n_same if n_same else float("nan")
    far = float(np.sum(accept & ~issame)) / n_diff if n_diff else float("nan")
    return val, far


def _threshold_at_far(far_train: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold at which the training FAR reaches ``far_target`` (insightface ``calculate_val``).

    insightface uses ``scipy.interpolate.interp1d(far_train, thresholds, kind='slinear')``, which fails on
    SciPy >= 1.9 because ``far_train`` repeats values. On non-decreasing x (FAR only grows with the
    threshold) the old SciPy result is the degree-1 spline through the points, which is exactly
    ``np.interp`` (last duplicate on the left, first on the right). When the FAR target is never reached the
    threshold is 0 (nothing accepted), as in insightface.
    """
    if np.max(far_train) >= far_target:
        return float(np.interp(far_target, far_train, thresholds))
    return 0.0


def pair_distances(emb_a: ArrayLike, emb_b: ArrayLike) -> np.ndarray:
    """Squared L2 distance of the L2-normalised pair embeddings.

    Args:
        emb_a, emb_b: ``(n, D)`` embeddings of the two sides of each pair (not necessarily normalised).

    Returns:
        ``(n,)`` float64 distances in [0, 4].
    """
    a = l2_normalize(as_features(emb_a, "emb_a"))
    b = l2_normalize(as_features(emb_b, "emb_b"))
    if a.shape != b.shape:
        raise ValueError(f"emb_a and emb_b: shapes differ, {a.shape} vs {b.shape}")
    return np.sum(np.square(a - b), axis=1)


def fold_splits(fold_ids: ArrayLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index splits of an explicit fold assignment, folds in ascending id order.

    For protocols whose folds are listed by the data set (CFP's ``Protocol/Split/FP/01..10``)
    rather than implied by contiguous blocks of the pair list.

    Args:
        fold_ids: ``(n,)`` integer fold id of every pair; at least two distinct ids.

    Returns:
        one ``(train_indices, test_indices)`` tuple of int64 arrays per distinct id.
    """
    ids = np.asarray(fold_ids).reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"fold_ids: expected integer fold ids, got dtype {ids.dtype}")
    unique = np.unique(ids)
    if unique.size < 2:
        raise ValueError(f"fold_ids: need at least 2 distinct folds, got {unique.tolist()}")
    return [(np.flatnonzero(ids != k), np.flatnonzero(ids == k)) for k in unique]


def verification(emb_a: ArrayLike, emb_b: ArrayLike, issame: ArrayLike, folds: int = 10,
                 far: float = 1e-3, fold_ids: ArrayLike | None = None) -> dict[str, float]:
    """insightface 10-fold pair verification: accuracy, best threshold and VAL@FAR.

    Args:
        emb_a: ``(n, D)`` embeddings of the first image of every pair (flip-fused by the caller).
        emb_b: ``(n, D)`` embeddings of the second image.
        issame: ``(n,)`` bool, True for genuine pairs.
        folds: number of contiguous folds (10 in every standard protocol).
        far: target false accept rate of the VAL@FAR figure (1e-3 in insightface).
        fold_ids: ``(n,)`` integer fold of every pair (an official split list); replaces the
            ``folds`` contiguous blocks when given.

    Returns:
        ``accuracy`` and ``accuracy_std`` (fractions in [0, 1]; mean and population std over folds),
        ``threshold`` (mean over folds of the selected squared-distance threshold, as AdaFace logs it),
        ``val``, ``val_std`` (validation rate at the FAR target, mean/std over folds) and ``far`` (the
        held-out false accept rate actually reached, mean over folds).
    """
    dist = pair_distances(emb_a, emb_b)
    same = as_bool(issame, "issame", dist.size)

    if fold_ids is not None:
        if np.asarray(fold_ids).size != dist.size:
            raise ValueError(f"fold_ids: {np.asarray(fold_ids).size} entries for {dist.size} pairs")
        splits = fold_splits(fold_ids)
    else:
        splits = kfold_splits(dist.size, folds)
    fold_accuracy, fold_threshold, fold_val, fold_far = [], [], [], []
    for train, test in splits:
        train_accuracy, _, _ = _accuracy_curve(dist[train], same[train], ACCURACY_THRESHOLDS)
        best = int(np.argmax(train_accuracy))  # first maximum = smallest threshold on ties
        threshold = ACCURACY_THRESHOLDS[best]
        test_accuracy, _, _ = _accuracy_curve(dist[test], same[test], np.array([threshold]))
        fold_accuracy.append(float(test_accuracy[0]))
        fold_threshold.append(float(threshold))

        _, fa, _, n_diff = _accept_counts(dist[train], same[train], VAL_THRESHOLDS)
        far_train = fa / n_diff if n_diff else np.zeros(VAL_THRESHOLDS.size)
        val_threshold = _threshold_at_far(far_train, VAL_THRESHOLDS, far)
        val, far_test = _val_far(dist[test], same[test], val_threshold)
        fold_val.append(val)
        fold_far.append(far_test)

    return {
        "accuracy": float(np.mean(fold_accuracy)),
        "accuracy_std": float(np.std(fold_accuracy)),
        "threshold": float(np.mean(fold_threshold)),
        "val": float(np.mean(fold_val)),
        "val_std": float(np.std(fold_val)),
        "far": float(np.mean(fold_far)),
    }
