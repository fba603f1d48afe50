"""kpt.metrics.identification (TinyFace) and retrieval (OpenGait Gait3D) on hand-made cases."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from kpt.metrics import identification, pairwise_distance, retrieval


def _deg(angle: float) -> list[float]:
    return [np.cos(np.radians(angle)), np.sin(np.radians(angle))]


# Gallery for identification: label -100 marks TinyFace distractors.
GALLERY = np.array([_deg(10), _deg(5), [-0.6, 0.8], [0.6, 0.8], [-1.0, 0.0]])
GALLERY_LABELS = np.array([1, -100, 2, -100, 7])
PROBES = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
PROBE_LABELS = np.array([1, 2, 3, 7])  # label 3 has no mate: skipped


def test_identification_hand_computed():
    out = identification(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS, ranks=(1, 2, 5))
    # probe 0: the distractor at 5° beats its mate at 10° -> first hit at rank 2.
    # probe 1: mate (index 2) and distractor (index 3) tie at 0.8; argsort(score)[::-1] puts the larger
    #          gallery index first -> rank 2.   probe 3: exact mate -> rank 1.   probe 2: no mate, skipped.
    assert out["rank1"] == pytest.approx(100 / 3)
    assert out["rank2"] == pytest.approx(100.0)
    assert out["rank5"] == pytest.approx(100.0)
    assert out["num_probes"] == 3
    # Swapping the tied pair moves the mate to the larger index: it now wins the tie.
    swapped = GALLERY[[0, 1, 3, 2, 4]]
    out = identification(PROBES, PROBE_LABELS, swapped, GALLERY_LABELS[[0, 1, 3, 2, 4]], ranks=(1,))
    assert out["rank1"] == pytest.approx(200 / 3)


def test_identification_is_cosine_and_accepts_tensors():
    out = identification(torch.tensor(PROBES * 7.0), torch.tensor(PROBE_LABELS),
                         torch.tensor(GALLERY * 0.5), torch.tensor(GALLERY_LABELS), ranks=(1, 2))
    assert out["rank1"] == pytest.approx(100 / 3) and out["rank2"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no probe has a mate"):
        identification(PROBES[2:3], PROBE_LABELS[2:3], GALLERY, GALLERY_LABELS)
    with pytest.raises(ValueError, match="gallery_labels"):
        identification(PROBES, PROBE_LABELS, GALLERY, GALLERY_LABELS[:3])


def test_identification_chunks_agree_with_brute_force(monkeypatch):
    # kpt.metrics.identification is the function (the package re-exports it); fetch the module itself.
    ident = importlib.import_module("kpt.metrics.identification")

    rng = np.random.default_rng(0)
    probe, gallery = rng.normal(size=(40, 6)), rng.normal(size=(60, 6))
    p_labels, g_labels = rng.integers(0, 15, 40), rng.integers(0, 20, 60)
    full = identification(probe, p_labels, gallery, g_labels, ranks=(1, 3, 10))
    monkeypatch.setattr(ident, "_CHUNK", 7)
    assert identification(probe, p_labels, gallery, g_labels, ranks=(1, 3, 10)) == full
    # brute force: rank of the best-scoring mate counted directly
    p = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    s = p @ g.T
    hits = {1: [], 3: [], 10: []}
    for i in range(40):
        mates = g_labels == p_labels[i]
        if mates.any():
            better = np.sum(s[i] > s[i][mates].max())
            for k, hit in hits.items():
                hit.append(better < k)
    for k, hit in hits.items():
        assert full[f"rank{k}"] == pytest.approx(100 * np.mean(hit))


def test_identification_tie_order_matches_reversed_stable_sort():
    # Integer features give many exactly equal scores; the closed-form first-mate position must equal
    # the position in argsort(score, stable)[::-1], the official order on ties.
    rng = np.random.default_rng(4)
    probe = rng.integers(-1, 2, size=(50, 3)).astype(float) + np.array([0.0, 0.0, 3.0])
    gallery = rng.integers(-1, 2, size=(40, 3)).astype(float) + np.array([0.0, 0.0, 3.0])
    p_labels, g_labels = rng.integers(0, 6, 50), rng.integers(0, 8, 40)
    out = identification(probe, p_labels, gallery, g_labels, ranks=(1, 2, 3, 5))
    p = probe / np.linalg.norm(probe, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    firsts = []
    for i in range(50):
        order = np.argsort(p[i] @ g.T, kind="stable")[::-1]
        hits = g_labels[order] == p_labels[i]
        if hits.any():
            firsts.append(int(np.argmax(hits)))
    for k in (1, 2, 3, 5):
        assert out[f"rank{k}"] == pytest.approx(100 * np.mean(np.array(firsts) < k))


# Retrieval: 1-D features so the distances are easy to read.
R_GALLERY = np.array([[1.0], [0.5], [3.0], [-2.0], [2.5]])
R_GALLERY_LABELS = np.array(["A", "B", "A", "B", "C"])
R_QUERY = np.array([[0.0], [0.75], [9.0], [2.5]])
R_QUERY_LABELS = np.array(["A", "B", "D", "C"])


def test_retrieval_hand_computed_with_tie_and_unmatched_probe():
    out = retrieval(R_QUERY, R_QUERY_LABELS, R_GALLERY, R_GALLERY_LABELS, ranks=(1, 2, 5))
    # query A at 0: order B(.5) A(1) B(2) C(2.5) A(3) -> matches 01001: AP (1/2 + 2/5)/2, INP 2/5.
    # query B at .75: g0 (A) and g1 (B) tie at .25; stable order keeps g0 first -> matches 01001 again.
    # query D: no match, skipped.  query C at 2.5: exact match first -> AP 1, INP 1.
    assert out["num_queries"] == 3
    assert out["rank1"] == pytest.approx(100 / 3, rel=1e-6)
    assert out["rank2"] == pytest.approx(100.0)
    assert out["rank5"] == pytest.approx(100.0)
    assert out["mAP"] == pytest.approx(100 * (0.45 + 0.45 + 1) / 3)
    assert out["mINP"] == pytest.approx(100 * (0.4 + 0.4 + 1) / 3)
    # The tie decides: with g0 and g1 swapped the B query hits at rank 1.
    swap = [1, 0, 2, 3, 4]
    out = retrieval(R_QUERY, R_QUERY_LABELS, R_GALLERY[swap], R_GALLERY_LABELS[swap], ranks=(1,))
    assert out["rank1"] == pytest.approx(200 / 3, rel=1e-6)
    assert out["mAP"] == pytest.approx(100 * (0.45 + 0.7 + 1) / 3)  # B: matches 10001


def test_retrieval_default_keys_and_rank_beyond_gallery():
    out = retrieval(torch.tensor(R_QUERY), R_QUERY_LABELS, torch.tensor(R_GALLERY), R_GALLERY_LABELS)
    assert set(out) == {"rank1", "rank5", "rank10", "mAP", "mINP", "num_queries"}
    assert out["rank10"] == pytest.approx(100.0)  # 5 gallery items: the CMC at the last position
    with pytest.raises(ValueError, match="no query has a match"):
        retrieval(R_QUERY[2:3], R_QUERY_LABELS[2:3], R_GALLERY, R_GALLERY_LABELS)
    with pytest.raises(ValueError, match="metric"):
        retrieval(R_QUERY, R_QUERY_LABELS, R_GALLERY, R_GALLERY_LABELS, metric="manhattan")


def test_part_distance_is_mean_of_per_part_distances():
    query = np.zeros((1, 2, 1))
    gallery = np.array([[[3.0], [3.0]], [[0.0], [4.4]]])  # (g, P=2, D=1)
    dist = pairwise_distance(query, gallery)
    np.testing.assert_allclose(dist, [[3.0, 2.2]])  # concatenated L2 would be [4.24, 4.4]
    out = retrieval(query, [0], gallery, [1, 0], ranks=(1,))
    assert out["rank1"] == 100.0  # the mean-of-parts order puts gallery item 1 first
    # cosine: 1 - mean over parts of the per-part cosine (each part normalised over its channels)
    q = np.array([[[1.0, 0.0], [0.0, 2.0]]])
    g = np.array([[[5.0, 0.0], [3.0, 0.0]]])
    np.testing.assert_allclose(pairwise_distance(q, g, "cosine"), [[1 - (1 + 0) / 2]])
    np.testing.assert_array_equal(pairwise_distance(q, g, "cos"), pairwise_distance(q, g, "cosine"))
    with pytest.raises(ValueError, match="part/feature shapes"):
        pairwise_distance(q, g[:, :1])


def _gait3d_reference(dist: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray) -> dict:
    """A loop-per-probe restatement of Gait3D-Benchmark evaluate_rank (stable sort), for comparison."""
    cmcs, aps, inps = [], [], []
    for i in range(dist.shape[0]):
        raw = (g_labels[np.argsort(dist[i], kind="stable")] == q_labels[i]).astype(int)
        if not raw.any():
            continue
        cmc = raw.cumsum()
        last = np.where(raw == 1)[0].max()
        inps.append(cmc[last] / (last + 1.0))
        cmc[cmc > 1] = 1
        cmcs.append(cmc[:50])
        aps.append(np.sum(raw.cumsum() / np.arange(1.0, raw.size + 1) * raw) / raw.sum())
    cmc = np.asarray(cmcs).astype(np.float32).sum(0) / len(cmcs)
    return {"rank1": cmc[0] * 100, "rank5": cmc[4] * 100, "rank10": cmc[9] * 100,
            "mAP": np.mean(aps) * 100, "mINP": np.mean(inps) * 100}


def test_retrieval_matches_per_probe_loop_on_random_parts_with_ties():
    rng = np.random.default_rng(5)
    query = rng.integers(0, 3, size=(30, 4, 3)).astype(np.float64)  # small integers: many exact ties
    gallery = rng.integers(0, 3, size=(80, 4, 3)).astype(np.float64)
    q_labels, g_labels = rng.integers(0, 12, 30), rng.integers(0, 10, 80)
    out = retrieval(query, q_labels, gallery, g_labels)
    ref = _gait3d_reference(pairwise_distance(query, gallery), q_labels, g_labels)
    for key, value in ref.items():
        assert out[key] == pytest.approx(float(value), rel=1e-9, abs=1e-9)
