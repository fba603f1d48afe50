"""Face data that cannot be right is refused before training and reported by validate.

Every data set here is a few tiny records or files the tests write themselves.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from kpt_plugins.face.data.landmarks_cache import cache_path, write_landmarks
from kpt_plugins.face.data.recordio import (
    IRHeader,
    RecordIOWriter,
    encode_image,
    pack_record,
    write_insightface_rec,
)
from kpt_plugins.face.data_commands import validate
from kpt_plugins.face.plugin import PLUGIN, build_train_set

from kpt.config import build_config
from kpt.errors import DataError


def _jpeg(seed: int) -> bytes:
    return encode_image(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), np.uint8))


def _rec(root: Path, labels: list[float]) -> Path:
    """``train.rec``/``.idx`` with one image record per label (keys 1..N), no property file."""
    root.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key, label in enumerate(labels, 1):
            w.write(key, pack_record(IRHeader(0, label, key, 0), _jpeg(key)))
    return root


def _train_set(root: Path, *overrides: str):
    return build_train_set(build_config(PLUGIN, data=str(root), overrides=list(overrides)))


def _landmark_rows(n: int) -> np.ndarray:
    return np.tile(np.array([[0.34, 0.46], [0.66, 0.46], [0.5, 0.64], [0.37, 0.82],
                             [0.63, 0.82]]), (n, 1, 1))


def test_stray_label_is_refused_by_training_and_reported_by_validate(tmp_path, capsys):
    root = _rec(tmp_path / "set", [0, 0, 1, 1, 2, 2, 1_000_000])
    with pytest.raises(DataError, match="4 distinct labels but 1000001 classes") as info:
        _train_set(root)
    message = str(info.value)
    assert "1000000" in message and "train.rec record key 7" in message
    assert "data.allow_sparse_labels=true" in message and "Remap the labels to 0..3" in message
    _, info_ok = _train_set(root, "data.allow_sparse_labels=true")  # the user asked for it
    assert info_ok["num_classes"] == 1_000_001
    assert validate(["--data", str(root), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert "unused label values: 999997" in out and "largest: 1000000" in out
    assert "4 distinct labels but 1000001 classes" in out


def test_labels_outside_property_are_refused(tmp_path, capsys):
    root = tmp_path / "set"
    write_insightface_rec(root, [(0, _jpeg(0)), (1, _jpeg(1)), (2, _jpeg(2))])
    (root / "property").write_text("2,112,112\n")  # one class fewer than the labels use
    with pytest.raises(DataError, match=r"record key 3: label 2 \(at or above the class count 2"):
        _train_set(root)
    assert validate(["--data", str(root), "--no-decode"]) == 1
    assert "outside property's 2 classes" in capsys.readouterr().out


def test_one_class_is_refused(tmp_path):
    root = tmp_path / "one"
    write_insightface_rec(root, [(0, _jpeg(i)) for i in range(4)])
    with pytest.raises(DataError, match="one identity only, so the margin loss is 0"):
        _train_set(root)
    folder = tmp_path / "folders"
    (folder / "alice").mkdir(parents=True)
    for i in range(3):
        (folder / "alice" / f"{i}.jpg").write_bytes(_jpeg(i))
    with pytest.raises(DataError, match="one identity only"):
        _train_set(folder)


def test_nan_and_negative_labels_name_file_and_record(tmp_path, capsys):
    from kpt_plugins.face.data.datasets import FaceDataset

    root = _rec(tmp_path / "set", [0, math.nan, 1, -3, 1])
    with pytest.raises(DataError) as info:
        _train_set(root)
    message = str(info.value)
    assert f"{root / 'train.rec'} record key 2: label nan" in message
    assert "record key 4: label -3" in message
    dataset = FaceDataset(root, keypoints=None)
    with pytest.raises(DataError, match="train.rec record key 2: label nan"):
        dataset[1]
    assert validate(["--data", str(root), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert "record key 2: label nan" in out and "record key 4: label -3" in out


def test_landmark_cache_bad_rows_are_reported_and_refused(tmp_path, capsys):
    root = _rec(tmp_path / "set", [0, 0, 1, 1, 2, 2])
    write_landmarks(cache_path(root), _landmark_rows(6), np.ones(6))
    lines = cache_path(root).read_text().splitlines()
    fields = [line.split(",") for line in lines]
    fields[2][1] = "7.5"  # row 1: far right of the image
    fields[3][4] = "-3"  # row 2
    fields[4][5] = "1e30"  # row 3
    fields[5][6] = "nan"  # row 4
    fields[6] = fields[6][:8]  # row 5: too short
    cache_path(root).write_text("\n".join(",".join(f) for f in fields) + "\n")
    with pytest.raises(DataError, match=r"ldmk_5points\.csv: row 1 \(line 3\): coordinate 7\.5"):
        _train_set(root)
    assert validate(["--data", str(root), "--no-decode"]) == 1
    out = capsys.readouterr().out
    for row, text in ((1, "coordinate 7.5"), (2, "coordinate -3"), (3, "coordinate 1e+30"),
                      (4, "NaN"), (5, "8 fields, expected 12")):
        assert f"row {row} (line {row + 2}): {text}" in out, out


def test_validate_lists_every_problem_and_training_names_the_file(tmp_path, capsys):
    from kpt_plugins.face.data.datasets import FaceDataset

    root = tmp_path / "folders"
    for name in ("alice", "bob"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.jpg").write_bytes(_jpeg(i))
    zero = root / "alice" / "zero.jpg"
    zero.write_bytes(b"")
    text = root / "bob" / "notes.jpg"
    text.write_text("this is not an image")
    keypoints = _landmark_rows(6)
    keypoints[2, 0, 0] = 9.0
    write_landmarks(cache_path(root), keypoints, np.ones(6))
    assert validate(["--data", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{zero}: the image bytes do not decode (0 bytes)" in out
    assert f"{text}: the image bytes do not decode" in out
    assert "row 2 (line 4): coordinate 9" in out
    assert "3 problem(s) found" in out
    dataset = FaceDataset(root, keypoints=None)
    with pytest.raises(DataError, match="zero.jpg: the image bytes do not decode"):
        dataset[2]


def test_data_name_that_is_a_test_set_or_a_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no file or folder .*lfw.* exists.*--test"):
        build_train_set(build_config(PLUGIN, data="lfw"))
    with pytest.raises(DataError, match="does not exist"):
        build_train_set(build_config(PLUGIN, data=str(tmp_path / "typo" / "faces")))
