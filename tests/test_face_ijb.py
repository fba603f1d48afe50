"""IJB-B/C template verification (plugins/face/evaluation/ijb.py) on a tiny IJB-layout fixture.

The fixture is insightface's layout (loose_crop/ + the three meta files). Every image is split
into a left colour and a right colour; the stub recogniser reads the two colours of the crop it is
given and returns a known feature for that (left, right) pair, so the original and the mirrored
view get different, known features. The expected scores are re-derived with the reference's
procedure (face.md §2.2) written out below with plain loops.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from kpt_plugins.face.align import ARCFACE_TEMPLATE_112
from kpt_plugins.face.evaluation.features import extract_features
from kpt_plugins.face.evaluation.ijb import (
    IJBImages,
    IJBProtocol,
    evaluate_ijb,
    find_ijb_root,
    ijb_layout_problems,
)

from kpt.errors import DataError, UserError

os.environ.setdefault("OMP_NUM_THREADS", "1")

D = 6
SIDE = 70
# image i: (template, media); templates 1..5, media 7 is shared by two images of template 2
LAYOUT = [(1, 10), (1, 10), (1, 11), (2, 7), (2, 7), (2, 12), (3, 13), (4, 14), (4, 14), (5, 15),
          (5, 16), (5, 16)]
IDENTITY = {1: "a", 2: "a", 3: "b", 4: "b", 5: "c"}


def _colour(i: int, side: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(100 * i + side)
    return tuple(int(v) for v in rng.integers(20, 235, 3))


def write_ijb(root, target: str = "ijbc", n: int = len(LAYOUT)) -> dict:
    """An IJB set folder; returns the feature table and the faceness scores."""
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    rng = np.random.default_rng(0)
    table = {}
    lm_lines, tm_lines = [], []
    faceness = rng.uniform(0.3, 1.0, n).round(4)
    for i in range(n):
        left, right = _colour(i, 0), _colour(i, 1)
        img = np.zeros((SIDE, SIDE, 3), np.uint8)
        img[:, :SIDE // 2] = left
        img[:, SIDE // 2:] = right
        cv2.imwrite(str(root / "loose_crop" / f"{i + 1}.png"), img[:, :, ::-1])  # stored BGR
        table[(left, right)] = rng.normal(size=D) * rng.uniform(0.5, 3.0)
        table[(right, left)] = rng.normal(size=D) * rng.uniform(0.5, 3.0)
        # the provided points: the template at half size, shifted by 7 px (alignment = 2× zoom)
        pts = ARCFACE_TEMPLATE_112 / 2 + 7
        lm_lines.append(f"{i + 1}.png " + " ".join(f"{v:.4f}" for v in pts.reshape(-1))
                        + f" {faceness[i]}")
        t, m = LAYOUT[i]
        tm_lines.append(f"{i + 1}.png {t} {m}")
    pair_lines = [f"{a} {b} {int(IDENTITY[a] == IDENTITY[b])}"
                  for a in IDENTITY for b in IDENTITY if a < b]
    (root / "meta" / f"{target}_name_5pts_score.txt").write_text("\n".join(lm_lines) + "\n")
    (root / "meta" / f"{target}_face_tid_mid.txt").write_text("\n".join(tm_lines) + "\n")
    (root / "meta" / f"{target}_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    return {"table": table, "faceness": faceness}


class Stub:
    """Known features from the (left, right) colours of the crop; counts its calls."""

    key = "stub"

    def __init__(self, table: dict, fail_after: int | None = None) -> None:
        self.table, self.fail_after, self.calls = table, fail_after, 0

    def __call__(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        assert images.dtype == torch.uint8 and keypoints.shape[1:] == (5, 2)
        row, w = images.shape[2] // 2, images.shape[3]
        out = []
        for img in images:
            left = tuple(int(v) for v in img[:, row, w * 20 // 112])
            right = tuple(int(v) for v in img[:, row, w * 92 // 112])
            out.append(torch.as_tensor(self.table[(left, right)], dtype=torch.float32))
        return torch.stack(out)


def reference_features(fixture: dict, n: int, flip: bool = True) -> np.ndarray:
    """(n, 2, D) the features the stub must give: original (left, right), mirrored (right, left)."""
    out = np.zeros((n, 2, D))
    for i in range(n):
        left, right = _colour(i, 0), _colour(i, 1)
        out[i, 0] = fixture["table"][(left, right)]
        out[i, 1] = fixture["table"][(right, left)]
    return out


def reference_scores(raw, faceness, templates, medias, t1, t2, flip=True, norm=True, det=True):
    """The reference's procedure with plain loops (face.md §2.2)."""
    feats = raw[:, 0] + raw[:, 1] if flip else raw[:, 0].copy()
    if not norm:
        feats = feats / np.sqrt((feats ** 2).sum(-1, keepdims=True))
    if det:
        feats = feats * faceness[:, None]
    tfeat = {}
    for t in sorted(set(templates.tolist())):
        members = [i for i in range(len(templates)) if templates[i] == t]
        total = np.zeros(feats.shape[1])
        for m in sorted({medias[i] for i in members}):
            rows = [feats[i] for i in members if medias[i] == m]
            total = total + (rows[0] if len(rows) == 1 else np.mean(rows, axis=0))
        tfeat[t] = total / np.sqrt((total ** 2).sum())
    return np.array([tfeat[a] @ tfeat[b] for a, b in zip(t1, t2)])


def reference_tar(scores, labels, targets=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)):
    """ROC with sklearn's rules (one point per distinct score, collinear points dropped), flipped,
    nearest FPR (first on ties)."""
    thresholds = sorted(set(scores.tolist()), reverse=True)
    pos, neg = labels.sum(), (~labels).sum()
    tps = [float(((scores >= t) & labels).sum()) for t in thresholds]
    fps = [float(((scores >= t) & ~labels).sum()) for t in thresholds]
    if len(fps) > 2:
        keep = [0] + [k for k in range(1, len(fps) - 1)
                      if fps[k + 1] - 2 * fps[k] + fps[k - 1] != 0
                      or tps[k + 1] - 2 * tps[k] + tps[k - 1] != 0] + [len(fps) - 1]
        tps, fps = [tps[k] for k in keep], [fps[k] for k in keep]
    fpr = [0.0] + [f / neg for f in fps]
    tpr = [0.0] + [t / pos for t in tps]
    fpr, tpr = fpr[::-1], tpr[::-1]
    out = {}
    for target in targets:
        best = min(range(len(fpr)), key=lambda k: (abs(fpr[k] - target), k))
        out[target] = tpr[best] * 100
    return out


@pytest.fixture
def ijb(tmp_path):
    root = tmp_path / "IJB_release" / "IJBC"
    fixture = write_ijb(root)
    return tmp_path, root, fixture


def test_meta_files_are_read_in_order(ijb):
    _, root, _ = ijb
    p = IJBProtocol.from_folder(root, "ijbc")
    assert p.names[:2] == ["1.png", "2.png"]
    assert p.templates.tolist() == [t for t, _ in LAYOUT]
    assert p.medias.tolist() == [m for _, m in LAYOUT]
    assert p.landmarks.shape == (len(LAYOUT), 5, 2)
    assert len(p.pair_labels) == 10 and p.pair_labels.sum() == 2


def test_root_is_found_under_a_board_root(ijb):
    board, root, _ = ijb
    assert find_ijb_root([board], "ijbc") == root
    assert find_ijb_root([board], "ijbb") is None


def test_aligned_keypoints_are_the_provided_points_in_the_crop(ijb):
    _, root, _ = ijb
    item = IJBImages(IJBProtocol.from_folder(root, "ijbc"), 112)[0]
    assert item["image"].shape == (3, 112, 112) and item["image"].dtype == torch.uint8
    # the provided points are the template at half size: aligned, they land on the template
    torch.testing.assert_close(item["keypoints"].double(),
                               torch.as_tensor(ARCFACE_TEMPLATE_112 / 112), atol=1e-4, rtol=0)
    raw = IJBImages(IJBProtocol.from_folder(root, "ijbc"), 112, aligned=False)[0]
    expected = (ARCFACE_TEMPLATE_112 / 2 + 7) / SIDE
    torch.testing.assert_close(raw["keypoints"].double(), torch.as_tensor(expected), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("flip,norm,det", [(True, True, True), (True, False, True),
                                           (False, True, False), (True, True, False)])
def test_pooling_faceness_and_tar_match_the_reference(ijb, flip, norm, det):
    _, root, fixture = ijb
    p = IJBProtocol.from_folder(root, "ijbc")
    result = evaluate_ijb(Stub(fixture["table"]), root, "ijbc", flip=flip, keep_norm=norm,
                          faceness=det, batch_size=5)
    raw = reference_features(fixture, len(LAYOUT))
    scores = reference_scores(raw, fixture["faceness"], p.templates, p.medias, p.pair_t1,
                              p.pair_t2, flip, norm, det)
    expected = reference_tar(scores, p.pair_labels > 0)
    for target, value in expected.items():
        key = "tar@far=" + np.format_float_scientific(target, trim="-", exp_digits=1)
        assert result[key] == pytest.approx(value)
    assert result["templates"] == 5 and result["pairs"] == 10


def test_scores_match_the_reference(ijb):
    from kpt_plugins.face.evaluation.ijb import image_features, pair_scores, template_features

    _, root, fixture = ijb
    p = IJBProtocol.from_folder(root, "ijbc")
    raw = reference_features(fixture, len(LAYOUT))
    feats = image_features(raw, p.faceness)
    unique_t, tfeats = template_features(feats, p.templates, p.medias)
    got = pair_scores(tfeats, unique_t, p.pair_t1, p.pair_t2)
    want = reference_scores(raw, fixture["faceness"], p.templates, p.medias, p.pair_t1, p.pair_t2)
    np.testing.assert_allclose(got, want, atol=1e-12)
    # the faceness weight matters: same data without it scores differently
    plain = image_features(raw, p.faceness, faceness_weight=False)
    unique_plain, tfeats_plain = template_features(plain, p.templates, p.medias)
    assert not np.allclose(pair_scores(tfeats_plain, unique_plain, p.pair_t1, p.pair_t2), got)


def test_feature_cache_resumes_after_a_kill(ijb, tmp_path):
    _, root, fixture = ijb
    dataset = IJBImages(IJBProtocol.from_folder(root, "ijbc"), 112)
    cache = tmp_path / "cache"
    # chunks of 3 images, batches of 3: two calls (original, mirrored) per chunk; die in chunk 3
    with pytest.raises(KeyboardInterrupt):
        extract_features(Stub(fixture["table"], fail_after=5), dataset, cache, chunk_size=3,
                         batch_size=3)
    assert sorted(p.name for p in cache.glob("chunk_*.npy")) == ["chunk_00000.npy",
                                                                 "chunk_00001.npy"]
    again = Stub(fixture["table"])
    feats = extract_features(again, dataset, cache, chunk_size=3, batch_size=3)
    assert again.calls == 2 * 2  # only the two missing chunks
    np.testing.assert_allclose(feats, reference_features(fixture, len(LAYOUT)), rtol=1e-6)
    # a finished cache is read without any forward
    third = Stub(fixture["table"])
    extract_features(third, dataset, cache, chunk_size=3, batch_size=3)
    assert third.calls == 0
    # other settings never read these features
    with pytest.raises(UserError, match="other features"):
        extract_features(third, dataset, cache, chunk_size=4, batch_size=3)


def test_unaligned_protocol_runs_on_resized_loose_crops(ijb):
    _, root, fixture = ijb
    result = evaluate_ijb(Stub(fixture["table"]), root, "ijbc", aligned=False, batch_size=4)
    p = IJBProtocol.from_folder(root, "ijbc")
    scores = reference_scores(reference_features(fixture, len(LAYOUT)), fixture["faceness"],
                              p.templates, p.medias, p.pair_t1, p.pair_t2)
    assert result["tar@far=1e-1"] == pytest.approx(reference_tar(scores, p.pair_labels > 0)[0.1])


def test_layout_problems_name_what_is_missing(ijb):
    _, root, _ = ijb
    assert ijb_layout_problems(root, "ijbc") == []
    (root / "loose_crop" / "3.png").unlink()
    (root / "meta" / "ijbc_template_pair_label.txt").unlink()
    problems = ijb_layout_problems(root, "ijbc")
    assert any("ijbc_template_pair_label.txt: missing" in p for p in problems)
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 0\n")
    assert any("1 of 12 images" in p for p in ijb_layout_problems(root, "ijbc"))


def test_inconsistent_meta_files_are_data_errors(ijb):
    _, root, _ = ijb
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 99 0\n")
    with pytest.raises(DataError, match="99"):
        IJBProtocol.from_folder(root, "ijbc")
    lines = (root / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="11 lines"):
        IJBProtocol.from_folder(root, "ijbc")


def test_data_validate_reports_the_ijb_layout(ijb, capsys):
    from kpt_plugins.face.data_commands import validate

    board, root, _ = ijb
    assert validate(["--data", str(board / "IJB_release")]) == 0
    assert "ijbc" in capsys.readouterr().out
    (root / "loose_crop" / "2.png").unlink()
    assert validate(["--data", str(root)]) == 1
    assert "missing" in capsys.readouterr().out


def test_plugin_evaluate_runs_the_board_with_a_kpt_model(ijb, tmp_path):
    """``--test full`` through the face plugin: a tiny KP-RPE ViT, the IJB fixture as the only
    set of the board root, the others named as missing; the row lands in eval.board_out."""
    from kpt_plugins.face.plugin import build_eval_sets, build_model

    from kpt.config import build_config
    from kpt.plugin import TaskData, load_plugin

    board, _, _ = ijb
    plugin = load_plugin("face")
    out = tmp_path / "row"
    cfg = build_config(plugin, test=["full"], overrides=[
        f"eval.bin_root={board}", "eval.synthetic_pairs=0", "model.depth=1", "model.embed_dim=32",
        "model.num_heads=2", "model.embedding_size=16", f"eval.cache_dir={tmp_path / 'cache'}",
        f"eval.board_out={out}", "eval.board_name=tiny"])
    model = build_model(cfg, {"num_classes": 4})
    data = TaskData(train=None, evals=build_eval_sets(cfg), info={})
    metrics = plugin.evaluate(model, data, cfg, torch.device("cpu"))
    assert {"ijbc/tar@far=1e-4", "ijbc_unaligned/tar@far=1e-4"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    text = out.with_suffix(".md").read_text()
    assert "| tiny |" in text and "lfw" in text and "ijbb" in text and "tinyface" in text
    assert len(list((tmp_path / "cache").rglob("chunk_*.npy"))) == 2  # aligned + unaligned


def test_unaligned_retinaface_detects_on_the_mirror_and_keeps_caches_apart(ijb, tmp_path):
    _, root, fixture = ijb
    calls: list[torch.Tensor] = []

    def detector(images):
        calls.append(images.clone())
        return torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32).expand(
            len(images), -1, -1).clone()

    common = {"aligned": False, "batch_size": len(LAYOUT), "keypoints": "retinaface",
              "detector": detector}
    evaluate_ijb(Stub(fixture["table"]), root, "ijbc", flip_keypoints="mirror", **common)
    assert len(calls) == 1
    calls.clear()
    cache = tmp_path / "cache"
    evaluate_ijb(Stub(fixture["table"]), root, "ijbc", cache_dir=cache, **common)  # detect
    assert len(calls) == 2 and torch.equal(calls[1], calls[0].flip(-1))
    assert '"flip_keypoints": "detect"' in (cache / "meta.json").read_text()
    with pytest.raises(UserError, match="other features"):  # mirrored flips never mix in
        evaluate_ijb(Stub(fixture["table"]), root, "ijbc", cache_dir=cache,
                     flip_keypoints="mirror", **common)
