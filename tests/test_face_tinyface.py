"""TinyFace rank-k (plugins/face/evaluation/tinyface.py) and the board row (board.py).

A hand-made gallery: each image is one flat colour and the stub recogniser maps the colour to a
known feature, so the rank of every probe's first mate is known by construction.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from kpt_plugins.face.evaluation.board import board_row, expand_tests, write_board
from kpt_plugins.face.evaluation.tinyface import (
    evaluate_tinyface,
    tinyface_layout_problems,
    tinyface_protocol,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle), 0.0])


class ColourStub:
    """Feature = table[centre colour]; the mirrored view gives the same feature."""

    key = "colour-stub"

    def __init__(self, table: dict) -> None:
        self.table, self.calls = table, 0

    def __call__(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        c = images.shape[2] // 2
        return torch.stack([torch.as_tensor(self.table[tuple(int(v) for v in img[:, c, c])],
                                            dtype=torch.float32) for img in images])


def write_tinyface(root, with_mat: bool = False, size: int = 112) -> dict:
    """Probes of identities 1, 2, 3 (and 9, which has no mate); gallery mates and distractors at
    known angles: probe 1's mate comes first, probe 2's third, probe 3's sixth."""
    folders = {n: root / n for n in ("Probe", "Gallery_Match", "Gallery_Distractor")}
    for f in folders.values():
        f.mkdir(parents=True)
    table = {}
    counter = [0]

    def put(folder: str, name: str, feature: np.ndarray) -> None:
        counter[0] += 1
        colour = (counter[0] * 7 % 256, counter[0] * 13 % 256, 100)
        cv2.imwrite(str(folders[folder] / name),
                    np.full((size, size, 3), colour[::-1], np.uint8))  # BGR on disk
        table[colour] = feature * (1.0 + counter[0] % 3)  # norms differ: flip fusion keeps them

    put("Probe", "1_1.png", _unit(0.0))
    put("Probe", "2_1.png", _unit(1.0))
    put("Probe", "3_1.png", _unit(2.0))
    put("Probe", "9_1.png", _unit(2.5))  # no mate: not counted
    put("Gallery_Match", "1_2.png", _unit(0.05))
    put("Gallery_Match", "2_2.png", _unit(1.3))
    put("Gallery_Match", "3_2.png", _unit(2.75))
    for k, a in enumerate([1.1, 1.2, 2.05, 2.1, 2.15, 2.2, -3.0]):
        put("Gallery_Distractor", f"{k}.png", _unit(a))
    if with_mat:
        mat_dir = root / "tinyface" / "Testing_Set"
        mat_dir.mkdir(parents=True)
        probes = np.empty((2, 2), dtype=object)  # only probes 1 and 2 are in the official list
        probes[0] = ["1_1.png", 1]
        probes[1] = ["2_1.png", 2]
        scipy.io.savemat(mat_dir / "probe_img_ID_pairs.mat", {"probe_set": probes})
    return table


def test_rank_k_on_a_gallery_with_distractors(tmp_path):
    table = write_tinyface(tmp_path)
    result = evaluate_tinyface(ColourStub(table), tmp_path, batch_size=4)
    # cosine order = angle distance: probe 1 (0.0) → its mate 0.05 first (rank 1); probe 2 (1.0)
    # → distractors 1.1, 1.2, then its mate 1.3 (rank 3); probe 3 (2.0) → distractors 2.05 … 2.2,
    # probe 2's mate 1.3 (0.7), then its own mate 2.75 (rank 6); probe 9 has no mate
    assert result["num_probes"] == 3
    assert result["rank1"] == pytest.approx(100 / 3)
    assert result["rank5"] == pytest.approx(200 / 3)
    assert result["rank20"] == pytest.approx(100.0)


def test_probe_ranks_hand_computed(tmp_path):
    table = write_tinyface(tmp_path)
    result = evaluate_tinyface(ColourStub(table), tmp_path, ranks=(1, 2, 3, 5, 6), batch_size=16)
    # first mates at ranks 1, 3 and 6 (see above)
    assert [result[f"rank{k}"] for k in (1, 2, 3, 5, 6)] == pytest.approx(
        [100 / 3, 100 / 3, 200 / 3, 200 / 3, 100.0])


class MirrorStub(ColourStub):
    """Calls alternate original / mirrored per batch (extract_features' order); the mirrored view
    of the probe gets its own feature."""

    def __init__(self, table: dict, mirrored: dict) -> None:
        super().__init__(table)
        self.mirrored = mirrored

    def __call__(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        out = super().__call__(images, keypoints)
        if self.calls % 2 == 0:
            c = images.shape[2] // 2
            for i, img in enumerate(images):
                colour = tuple(int(v) for v in img[:, c, c])
                if colour in self.mirrored:
                    out[i] = torch.as_tensor(self.mirrored[colour], dtype=torch.float32)
        return out


def test_flip_fusion_sums_raw_features_before_normalising(tmp_path):
    for sub in ("Probe", "Gallery_Match", "Gallery_Distractor"):
        (tmp_path / sub).mkdir()
    colours = {"Probe/1_1.png": (10, 20, 30), "Gallery_Match/1_2.png": (40, 50, 60),
               "Gallery_Distractor/0.png": (70, 80, 90)}
    for name, colour in colours.items():
        cv2.imwrite(str(tmp_path / name), np.full((112, 112, 3), colour[::-1], np.uint8))
    # original probe view: nearer the distractor, norm 1; mirrored view: nearer the mate, norm 3
    table = {(10, 20, 30): _unit(1.4), (40, 50, 60): _unit(0.0), (70, 80, 90): _unit(1.5)}
    mirrored = {(10, 20, 30): 3 * _unit(0.1), (40, 50, 60): _unit(0.0), (70, 80, 90): _unit(1.5)}
    fused = evaluate_tinyface(MirrorStub(table, mirrored), tmp_path, ranks=(1,), batch_size=8)
    assert fused["rank1"] == 100.0  # the raw sum follows the larger-norm mirrored view
    plain = evaluate_tinyface(MirrorStub(table, mirrored), tmp_path, ranks=(1,), flip=False)
    assert plain["rank1"] == 0.0


def test_official_mat_lists_restrict_the_probes(tmp_path):
    table = write_tinyface(tmp_path, with_mat=True)
    protocol, used = tinyface_protocol(tmp_path)
    assert [p.name for p in protocol.probe_paths] == ["1_1.png", "2_1.png"]
    assert len(used) == 1 and used[0].endswith("probe_img_ID_pairs.mat")
    result = evaluate_tinyface(ColourStub(table), tmp_path, ranks=(1, 3))
    assert result["num_probes"] == 2
    assert result["rank1"] == pytest.approx(50.0) and result["rank3"] == pytest.approx(100.0)


def test_mat_naming_a_missing_image_is_reported(tmp_path):
    write_tinyface(tmp_path, with_mat=True)
    (tmp_path / "Probe" / "2_1.png").unlink()
    problems = tinyface_layout_problems(tmp_path)
    assert problems and "probe_img_ID_pairs.mat" in problems[0] and "1 of 2" in problems[0]


def test_feature_cache_is_reused(tmp_path):
    table = write_tinyface(tmp_path / "tf")
    stub = ColourStub(table)
    first = evaluate_tinyface(stub, tmp_path / "tf", cache_dir=tmp_path / "c", chunk_size=5)
    calls = stub.calls
    assert calls > 0
    second = evaluate_tinyface(stub, tmp_path / "tf", cache_dir=tmp_path / "c", chunk_size=5)
    assert stub.calls == calls and first == second


def test_board_row_and_files(tmp_path):
    metrics = {"lfw/accuracy": 99.82, "cplfw/accuracy": 95.65, "cfp_fp/accuracy": 99.3,
               "calfw/accuracy": 95.93, "agedb_30/accuracy": 98.1,
               "ijbb/tar@far=1e-4": 96.55, "ijbc/tar@far=1e-4": 97.82,
               "tinyface/rank1": 76.10, "tinyface/rank5": 78.92}
    row = board_row(metrics)
    assert list(row)[:3] == ["AVG", "LFW", "CPLFW"]
    assert row["AVG"] == pytest.approx(93.1322, abs=1e-3)  # the CVLface board's first row
    assert row["IJB-C@0.01 unaligned"] is None
    del metrics["tinyface/rank5"]
    partial = board_row(metrics)
    assert partial["AVG"] is None and partial["TinyFace R5"] is None
    md, csv_path = write_board(partial, ["tinyface", "ijbc_unaligned"], tmp_path / "row", "vit")
    text = md.read_text()
    assert "| vit | – | 99.82 |" in text and "tinyface, ijbc_unaligned" in text
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("Model,AVG,LFW") and lines[1].endswith("tinyface;ijbc_unaligned")


def test_full_names_missing_sets_and_named_sets_must_exist(tmp_path):
    from kpt_plugins.face.data.checks import MissingDataError

    write_tinyface(tmp_path / "tinyface")
    run, missing = expand_tests(["full"], [str(tmp_path)])
    assert run == ["tinyface"] and missing == ["ijbb", "ijbc", "ijbc_unaligned", "cfp_fp_unaligned"]
    with pytest.raises(MissingDataError, match="ijbc"):
        expand_tests(["ijbc"], [str(tmp_path)])


def test_the_aligned_copy_is_preferred_under_a_board_root(tmp_path):
    from kpt_plugins.face.evaluation.tinyface import find_tinyface_root

    # the release folder in the board root, the aligned copy inside it: the board root itself
    # also reaches the raw images through tinyface/Testing_Set
    write_tinyface(tmp_path / "tinyface" / "Testing_Set", size=24)
    write_tinyface(tmp_path / "tinyface" / "aligned_pad_0.1_pad_high")
    found = find_tinyface_root([tmp_path])
    assert found == tmp_path / "tinyface"
    protocol, _ = tinyface_protocol(found)
    assert protocol.root.name == "aligned_pad_0.1_pad_high"
