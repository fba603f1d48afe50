"""Gait data that cannot be right is refused before training, and validate lists every problem.

Trees are written by the tests (a few tiny pkl files); nothing is generated unless asked for.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from kpt_plugins.gait.data import GaitDataError, read_array_pkl, write_array_pkl
from kpt_plugins.gait.gait3d_prepare import validate_main
from kpt_plugins.gait.plugin import PLUGIN, build_data

from kpt.config import build_config
from kpt.errors import DataError


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _sequence(root: Path, sid: str, frames: int = 5) -> Path:
    """One sequence ``<root>/<sid>/camid0_videoid0/seq0`` with matching silhouettes and poses."""
    folder = root / sid / "camid0_videoid0" / "seq0"
    write_array_pkl(folder / "seq0.pkl", np.full((frames, 64, 64), 255, np.uint8))
    poses = np.concatenate([np.full((frames, 17, 2), 30.0), np.ones((frames, 17, 1))], -1)
    write_array_pkl(folder / "seq0-pose.pkl", poses.astype(np.float32))
    return folder


def _split(root: Path, train: list[str], test: list[str], probes: list[str]) -> Path:
    path = root / "Gait3D.json"
    path.write_text(json.dumps({"TRAIN_SET": train, "TEST_SET": test, "PROBE_SET": probes}))
    return path


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_data_dir_without_split_file_is_refused_and_left_untouched(tmp_path):
    data = tmp_path / "my_gait_data"
    data.mkdir()
    (data / "notes.txt").write_text("not a prepared tree")
    before = _listing(data)
    cfg = build_config(PLUGIN, data=str(data), overrides=[f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataError, match=r"Gait3D\.json: split file missing") as info:
        build_data(cfg)
    assert str(data) in str(info.value) and "kpt data get gait --dst" in str(info.value)
    assert _listing(data) == before  # no synthetic walkers written into the user's folder
    assert not (tmp_path / "cache").exists()  # nor anywhere else


def test_missing_data_dir_and_gait3d_without_root_say_what_to_set(tmp_path):
    cfg = build_config(PLUGIN, data=str(tmp_path / "typo"))
    with pytest.raises(DataError, match="typo: data folder not found"):
        build_data(cfg)
    with pytest.raises(DataError, match=r"--data-root DIR \(config key data\.root\)"):
        build_data(build_config(PLUGIN, data="gait3d"))


@pytest.mark.parametrize("domain", ["gait", "mnist"])
def test_data_name_that_is_no_dataset_and_no_path(domain, tmp_path, monkeypatch):
    from kpt.plugin import load_plugin

    monkeypatch.chdir(tmp_path)
    plugin = load_plugin(domain)
    with pytest.raises(DataError, match="no file or folder .*lfw.* exists") as info:
        build_config(plugin, data="lfw")
    assert ", ".join(plugin.datasets) in str(info.value)


def test_empty_split_is_refused_naming_file_and_split(tmp_path):
    _sequence(tmp_path, "0001")
    _sequence(tmp_path, "0002")
    split = _split(tmp_path, [], ["0002"], ["0002-camid0_videoid0-seq0"])
    cfg = build_config(PLUGIN, data=str(tmp_path))
    with pytest.raises(DataError, match=f"{split}: split TRAIN_SET is empty"):
        build_data(cfg)
    # ids named by the split but without a sequence folder: an empty split in effect
    _split(tmp_path, ["0001"], ["0009"], ["0009-camid0_videoid0-seq0"])
    with pytest.raises(DataError, match=r"Gait3D\.json: split TEST_SET names 1 ids but none"):
        build_data(cfg)


def test_user_pkl_read_errors_are_data_errors(tmp_path):
    evil, empty = tmp_path / "evil.pkl", tmp_path / "empty.pkl"
    evil.write_bytes(pickle.dumps(_Evil()))
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="evil.pkl.*builtins.print"):
        read_array_pkl(evil)
    with pytest.raises(GaitDataError, match="empty.pkl: corrupt pkl"):
        read_array_pkl(empty)
    assert issubclass(GaitDataError, DataError) and issubclass(GaitDataError, ValueError)


def test_validate_lists_every_problem_and_fails(tmp_path, capsys):
    for sid in ("0001", "0002", "0003", "0004"):
        _sequence(tmp_path, sid)
    zero = tmp_path / "0001" / "camid0_videoid0" / "seq0" / "seq0.pkl"
    zero.write_bytes(b"")  # zero-byte silhouettes
    evil = tmp_path / "0002" / "camid0_videoid0" / "seq0" / "seq0.pkl"
    evil.write_bytes(pickle.dumps(_Evil()))  # a pickle that would run code
    torn = tmp_path / "0003" / "camid0_videoid0" / "seq0" / "seq0-pose.pkl"
    torn.write_bytes(torn.read_bytes()[:30])  # truncated poses
    split = _split(tmp_path, ["0001", "0002"], ["0003", "0004"], [])  # no probe
    assert validate_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for path in (zero, evil, torn):
        assert str(path) in out, out
    assert f"{split}: split PROBE_SET is empty" in out
    assert "4 problem(s)" in out


def test_user_data_read_errors_are_data_errors_and_keep_their_old_bases(tmp_path):
    from kpt_plugins.face.data.bin_pairs import load_bin
    from kpt_plugins.face.data.recordio import RecordIOError
    from kpt_plugins.mnist.affnist import AffnistDataError
    from kpt_plugins.mnist.data import MnistDataError, load_mnist

    from kpt.data.safe_pickle import CorruptPickleError, UnsafePickleError

    for cls, old in ((RecordIOError, ValueError), (GaitDataError, ValueError),
                     (MnistDataError, RuntimeError), (AffnistDataError, RuntimeError),
                     (UnsafePickleError, pickle.UnpicklingError),
                     (CorruptPickleError, pickle.UnpicklingError)):
        assert issubclass(cls, DataError) and issubclass(cls, old), cls
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 torn zip")
    with pytest.raises(MnistDataError, match=r"mnist\.npz: not a readable \.npz"):
        load_mnist(tmp_path)
    bad_bin = tmp_path / "lfw.bin"
    bad_bin.write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(DataError, match=r"lfw\.bin: not a valid pickle"):
        load_bin(bad_bin)
