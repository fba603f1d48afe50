"""Validation .bin pair files: reading both storage forms and refusing malicious pickles."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
from kpt_plugins.face.data.bin_pairs import load_bin, write_bin

from kpt.data.safe_pickle import UnsafePickleError


def _faces(n: int, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(n)
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return np.stack([np.kron(b, np.ones((size // 4, size // 4, 1), np.uint8)) for b in base])


@pytest.mark.parametrize("as_bytes", [True, False])
def test_read_pairs(tmp_path, as_bytes):
    images = _faces(6)
    issame = np.array([True, False, True])
    path = tmp_path / "lfw.bin"
    write_bin(path, images, issame, as_bytes=as_bytes)
    pairs = load_bin(path)
    assert pairs.name == "lfw" and len(pairs) == 3
    assert pairs.images.shape == (6, 3, 112, 112)
    assert pairs.issame.tolist() == [True, False, True]
    got = pairs.images.permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(got - images).mean() < 3  # RGB, pair order kept
    assert len(load_bin(path, limit=2)) == 2


def test_python2_style_byte_strings(tmp_path):
    from kpt_plugins.face.data.recordio import encode_image

    bins = [encode_image(im) for im in _faces(2)]
    # what Python 2 writes for (list of str, [True]): BINSTRING opcodes that Python 3 can only
    # read with encoding="bytes" (default ASCII decoding fails on JPEG bytes)
    body = b"".join(b"T" + struct.pack("<i", len(b)) + b for b in bins)
    payload = b"\x80\x02](" + body + b"e](\x88e\x86."
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(payload)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(payload)
    pairs = load_bin(path)
    assert pairs.issame.tolist() == [True] and pairs.images.shape == (2, 3, 112, 112)


def test_resizes_other_sizes(tmp_path):
    write_bin(tmp_path / "cfp_fp.bin", _faces(2, 128), np.array([False]))
    assert load_bin(tmp_path / "cfp_fp.bin").images.shape == (2, 3, 112, 112)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_bin_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(str(marker))], [True])))
    with pytest.raises(UnsafePickleError) as info:
        load_bin(path)
    assert "evil.bin" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_wrong_structure_errors(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(ValueError, match="2 images per pair"):
        load_bin(path)
    path.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(ValueError, match=r"\(bins, issame_list\)"):
        load_bin(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(pickle.UnpicklingError, match="odd.bin"):
        load_bin(path)
