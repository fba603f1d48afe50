"""CFP-FP on the raw CFP tree (plugins/face/evaluation/cfp.py): the board's unaligned column.

The fixture is the CFP release's layout (Data/Images/<id>/{frontal,profile}/<nn>.jpg, the two pair
lists with paths relative to Protocol/, Protocol/Split/FP/<nn>/{same,diff}.txt) with four
identities and three splits of unequal size. Every image is filled with its identity's colour, so a
stub recogniser that returns the mean colour verifies perfectly; a "confused" stub maps two
identities onto one feature, which makes the expected accuracy of every split known.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from kpt_plugins.face.align import ARCFACE_TEMPLATE_112
from kpt_plugins.face.evaluation import cfp as cfp_mod
from kpt_plugins.face.evaluation.board import board_row, expand_tests, run_board_sets
from kpt_plugins.face.evaluation.cfp import (
    CFPImages,
    CFPProtocol,
    cfp_layout_problems,
    evaluate_cfp,
    find_cfp_root,
    square_pad,
)

from kpt.errors import DataError
from kpt.metrics.verification import fold_splits, verification

os.environ.setdefault("OMP_NUM_THREADS", "1")

IDS = ["001", "002", "003", "004"]
COLOURS = {"001": (200, 30, 30), "002": (30, 200, 30), "003": (30, 30, 200),
           "004": (200, 200, 30)}
FRONTAL_PER_ID, PROFILE_PER_ID = 2, 1
# split -> (same lines, diff lines) as "frontal index,profile index"; frontal k of id n is
# 2(n-1)+k, profile of id n is n
SPLITS = {"01": (["1,1", "3,2"], ["1,2", "5,4"]),
          "02": (["6,3"], ["2,3", "7,1"]),
          "03": (["8,4", "4,2", "2,1"], ["3,4"])}


def write_cfp(base):
    """The CFP tree under ``base/cfp-dataset``; returns its root."""
    root = base / "cfp-dataset"
    f_lines, p_lines = [], []
    for n, ident in enumerate(IDS):
        for kind, count, lines in (("frontal", FRONTAL_PER_ID, f_lines),
                                   ("profile", PROFILE_PER_ID, p_lines)):
            folder = root / "Data" / "Images" / ident / kind
            folder.mkdir(parents=True)
            for k in range(1, count + 1):
                h, w = (60, 44) if kind == "profile" else (50 + 4 * n, 40)  # not square
                img = np.zeros((h, w, 3), np.uint8)
                img[:] = COLOURS[ident][::-1]  # stored BGR
                cv2.imwrite(str(folder / f"{k:02d}.jpg"), img)
                lines.append(f"{len(lines) + 1} ../Data/Images/{ident}/{kind}/{k:02d}.jpg")
    (root / "Protocol").mkdir()
    (root / "Protocol" / "Pair_list_F.txt").write_text("\n".join(f_lines) + "\n")
    (root / "Protocol" / "Pair_list_P.txt").write_text("\n".join(p_lines) + "\n")
    for name, (same, diff) in SPLITS.items():
        d = root / "Protocol" / "Split" / "FP" / name
        d.mkdir(parents=True)
        (d / "same.txt").write_text("\n".join(same) + "\n")
        (d / "diff.txt").write_text("\n".join(diff) + "\n")
    return root


@pytest.fixture
def cfp(tmp_path):
    return write_cfp(tmp_path)


class ColourStub:
    """Raw feature = the mean RGB of the image (identity colour); ``merge`` maps identity colours
    onto one feature (confusions with known outcomes)."""

    key = "colour-stub"

    def __init__(self, merge: dict | None = None) -> None:
        self.merge = merge or {}
        self.seen: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        self.seen.append(keypoints.clone())
        mean = images.float().mean(dim=(2, 3))
        out = []
        for m in mean:
            ident = min(IDS, key=lambda i: float(((m - torch.tensor(COLOURS[i])) ** 2).sum()))
            ident = self.merge.get(ident, ident)
            vec = torch.zeros(len(IDS))
            vec[IDS.index(ident)] = 1.0
            out.append(vec)
        return torch.stack(out)


def stub_detector(miss_every: int = 0):
    """Template keypoints shifted by 0.01; every ``miss_every``-th image reported as not found."""
    calls = {"n": 0}

    def detect(images: torch.Tensor):
        n = len(images)
        kp = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32) + 0.01
        found = torch.ones(n, dtype=torch.bool)
        if miss_every:
            idx = torch.arange(calls["n"], calls["n"] + n)
            found = idx % miss_every != 0
        calls["n"] += n
        return kp.expand(n, -1, -1).clone(), found

    return detect


def test_pairs_follow_the_official_lists(cfp):
    p = CFPProtocol.from_folder(cfp)
    assert len(p) == 11
    # split 01, same.txt line 2 "3,2": frontal 3 = 002/frontal/01, profile 2 = 002/profile/01
    a, b = p.paths[p.first[1]], p.paths[p.second[1]]
    assert a == cfp / "Data/Images/002/frontal/01.jpg" and b == cfp / "Data/Images/002/profile/01.jpg"
    # split 01, diff.txt line 2 "5,4": 003/frontal/01 against 004/profile/01
    assert p.paths[p.first[3]].parts[-3:] == ("003", "frontal", "01.jpg")
    assert p.paths[p.second[3]].parts[-3:] == ("004", "profile", "01.jpg")
    # same first, then diff, split by split; labels from the file names
    assert p.issame.tolist() == [True, True, False, False, True, False, False, True, True, True,
                                 False]
    assert p.fold.tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    for i, j, same in zip(p.first, p.second, p.issame):  # the lists' identities agree with labels
        assert (p.paths[i].parts[-3] == p.paths[j].parts[-3]) == same
    assert len(set(p.paths)) == len(p.paths)  # each image once


def test_root_is_found_under_a_board_root(cfp):
    assert find_cfp_root([cfp.parent]) == cfp
    assert find_cfp_root([cfp]) == cfp
    assert find_cfp_root([cfp / "Data"]) is None


def test_explicit_folds_are_the_split_lists():
    assert [t.tolist() for _, t in fold_splits([2, 1, 2, 1, 3])] == [[1, 3], [0, 2], [4]]
    with pytest.raises(ValueError):
        fold_splits([1, 1])
    # equal blocks in order: the explicit folds are insightface's contiguous KFold
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    same = rng.random(40) < 0.5
    assert verification(a, b, same, folds=4) == verification(
        a, b, same, fold_ids=np.repeat([1, 2, 3, 4], 10))
    # interleaved folds give another split, hence (here) other thresholds
    shuffled = verification(a, b, same, fold_ids=np.tile([1, 2, 3, 4], 10))
    assert shuffled != verification(a, b, same, folds=4)


def test_unaligned_evaluation_end_to_end(cfp):
    stub = ColourStub()
    res = evaluate_cfp(stub, cfp, size=32, detector=stub_detector(miss_every=3))
    assert res["accuracy"] == pytest.approx(100.0) and res["accuracy_std"] == 0.0
    assert res["pairs"] == 11 and res["images"] == 12  # frontal 1..8 and profile 1..4 used
    # the detector runs once per resized image: images 0, 3, 6, 9 are "not found"
    assert res["faces_not_found"] == 4
    # the recogniser got the detector's keypoints (and their mirror for the flip view)
    assert torch.allclose(stub.seen[0][0, 0], torch.as_tensor(
        ARCFACE_TEMPLATE_112[0] / 112, dtype=torch.float32) + 0.01)


def test_confusions_give_the_expected_fold_accuracy(cfp):
    """Identities 003 and 004 share a feature: split 01's diff pair "5,4" (003 vs 004) and split
    03's "3,4" (002 vs 004, unaffected) - so only one impostor pair scores as genuine. Its split
    holds 4 pairs, and at any threshold one of them is wrong: split 01 = 75 %, the others 100 %."""
    res = evaluate_cfp(ColourStub({"004": "003"}), cfp, size=32, detector=stub_detector())
    assert res["accuracy"] == pytest.approx((75.0 + 100.0 + 100.0) / 3)
    assert res["accuracy_std"] == pytest.approx(np.std([75.0, 100.0, 100.0]))


def test_resize_rules(cfp):
    p = CFPProtocol.from_folder(cfp)
    stretch = CFPImages(p, 32, "stretch")[0]["image"]
    pad = CFPImages(p, 32, "pad")[0]["image"]
    assert stretch.shape == pad.shape == (3, 32, 32)
    assert stretch.float().min() > 20  # the whole frame is the image
    assert pad[:, :, 0].float().max() < 5  # 50x40 centred on a 50x50 black square
    assert pad[:, 16, 16].tolist() == pytest.approx(list(COLOURS["001"]), abs=6)
    assert square_pad(np.ones((3, 6, 1), np.uint8))[:, :, 0].tolist()[0] == [0] * 6
    with pytest.raises(ValueError):
        CFPImages(p, 32, "crop")


def test_aligned_protocol_maps_detections_onto_the_template(cfp):
    """The aligned protocol detects on the raw image squared and resized; the detected points go
    back to raw pixels and onto the ArcFace template."""
    p = CFPProtocol.from_folder(cfp)
    plain = CFPImages(p, 32)
    lm, found = cfp_mod.detect_landmarks(plain, stub_detector(), detect_size=64, batch_size=4)
    assert found.all()
    # image 0 is 50 high, 40 wide: square side 50, x offset 5
    expected = (ARCFACE_TEMPLATE_112 / 112 + 0.01) * 50 - np.array([5.0, 0.0])
    assert np.allclose(lm[0], expected, atol=1e-4)
    res = evaluate_cfp(ColourStub(), cfp, size=112, aligned=True, detector=stub_detector())
    assert res["accuracy"] == pytest.approx(100.0)


def test_missing_files_are_named(cfp):
    (cfp / "Protocol" / "Pair_list_P.txt").unlink()
    with pytest.raises(DataError, match="Pair_list_P.txt"):
        CFPProtocol.from_folder(cfp)
    assert any("Pair_list_P.txt" in line for line in cfp_layout_problems(cfp))


def test_missing_split_file_and_image_are_named(cfp):
    (cfp / "Data/Images/002/profile/01.jpg").unlink()
    with pytest.raises(DataError, match="002/profile/01.jpg"):
        evaluate_cfp(ColourStub(), cfp, size=32, detector=stub_detector())
    assert any("missing" in line and "002/profile/01.jpg" in line
               for line in cfp_layout_problems(cfp))
    (cfp / "Protocol/Split/FP/02/diff.txt").unlink()
    with pytest.raises(DataError, match="02/diff.txt"):
        CFPProtocol.from_folder(cfp)


def test_bad_lines_are_data_errors(cfp):
    (cfp / "Protocol/Split/FP/03/same.txt").write_text("8,4\n4 2\n")
    with pytest.raises(DataError, match="03/same.txt, line 2"):
        CFPProtocol.from_folder(cfp)
    (cfp / "Protocol/Split/FP/03/same.txt").write_text("8,9\n")
    with pytest.raises(DataError, match="index 9 is not in"):
        CFPProtocol.from_folder(cfp)


def test_board_column_and_missing_set(cfp, tmp_path):
    metrics = run_board_sets(ColourStub(), ["cfp_fp_unaligned"], [str(cfp.parent)], size=32,
                             cfp_detector=stub_detector())
    assert metrics["cfp_fp_unaligned/accuracy"] == pytest.approx(100.0)
    assert board_row(metrics)["CFP-FP unaligned"] == pytest.approx(100.0)
    run, missing = expand_tests(["full"], [str(cfp.parent)])
    assert run == ["cfp_fp_unaligned"] and "tinyface" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    run, missing = expand_tests(["full"], [str(empty)])
    assert "cfp_fp_unaligned" in missing
    with pytest.raises(DataError, match="raw CFP tree"):
        expand_tests(["cfp_fp_unaligned"], [str(empty)])


def test_data_validate_checks_the_layout(cfp, capsys):
    from kpt_plugins.face.data_commands import validate

    assert validate(["--data", str(cfp.parent)]) == 0
    out = capsys.readouterr().out
    assert "raw CFP tree" in out and "11 pairs" in out and "3 splits (the release has 10)" in out
    (cfp / "Data/Images/001/frontal/02.jpg").unlink()
    assert validate(["--data", str(cfp)]) == 1
    assert "001/frontal/02.jpg" in capsys.readouterr().out


def test_plugin_evaluate_runs_cfp_fp_unaligned(cfp, monkeypatch, tmp_path):
    """``--test cfp_fp_unaligned`` through the face plugin with a tiny KP-RPE ViT (the detector
    stubbed: RetinaFace itself is tested elsewhere)."""
    from kpt_plugins.face.plugin import build_eval_sets, build_model

    from kpt.config import build_config
    from kpt.plugin import TaskData, load_plugin

    monkeypatch.setattr(cfp_mod, "_default_detector", lambda batch_size: stub_detector())
    plugin = load_plugin("face")
    cfg = build_config(plugin, test=["cfp_fp_unaligned"], overrides=[
        f"eval.bin_root={cfp.parent}", "eval.synthetic_pairs=0", "model.depth=1",
        "model.embed_dim=32", "model.num_heads=2", "model.embedding_size=16",
        "eval.cfp_resize=pad", f"eval.board_out={tmp_path / 'row'}"])
    model = build_model(cfg, {"num_classes": 4})
    data = TaskData(train=None, evals=build_eval_sets(cfg), info={})
    metrics = plugin.evaluate(model, data, cfg, torch.device("cpu"))
    assert 0.0 <= metrics["cfp_fp_unaligned/accuracy"] <= 100.0
    assert metrics["cfp_fp_unaligned/faces_not_found"] == 0
    assert "CFP-FP unaligned" in (tmp_path / "row.md").read_text()


@pytest.mark.parametrize("flip_keypoints", ["detect", "mirror"])
def test_flip_view_keypoints_are_detected_on_the_mirror_or_mirrored(cfp, flip_keypoints):
    from kpt_plugins.face.data.augment import FLIP_PERMUTATION

    from kpt.data.keypoints import hflip_keypoints

    seen_by_detector: list[torch.Tensor] = []
    base = stub_detector()

    def detector(images):
        seen_by_detector.append(images.clone())
        return base(images)

    stub = ColourStub()
    res = evaluate_cfp(stub, cfp, size=32, detector=detector, flip_keypoints=flip_keypoints)
    assert res["faces_not_found"] == 0
    detected = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112, dtype=torch.float32) + 0.01
    original, flipped = stub.seen[0], stub.seen[1]  # first batch: original view, then the flip
    assert torch.allclose(original[0], detected)
    if flip_keypoints == "detect":
        # the detector ran on the mirrored batch too, and its answer went to the flip view
        assert len(seen_by_detector) == 2
        assert torch.equal(seen_by_detector[1], seen_by_detector[0].flip(-1))
        assert torch.allclose(flipped[0], detected)
    else:
        assert len(seen_by_detector) == 1
        assert torch.allclose(flipped[0], hflip_keypoints(detected[None], FLIP_PERMUTATION)[0])
    with pytest.raises(ValueError, match="detect or mirror"):
        evaluate_cfp(ColourStub(), cfp, size=32, detector=detector, flip_keypoints="rerun")
