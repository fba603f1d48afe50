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
    square = _faces(2, 128)  # 4×4 blocks of 32 pixels: 28 pixels each at 112
    write_bin(tmp_path / "cfp_fp.bin", square, np.array([False]))
    images = load_bin(tmp_path / "cfp_fp.bin").images
    assert images.shape == (2, 3, 112, 112)
    for row in range(4):
        for col in range(4):  # block centres keep their colour (JPEG: a few levels off)
            got = images[:, :, 14 + 28 * row, 14 + 28 * col].numpy().astype(int)
            assert np.abs(got - square[:, 16 + 32 * row, 16 + 32 * col].astype(int)).max() < 12


def test_resize_keeps_the_centre_of_a_tall_image(tmp_path):
    """160×128 (H×W): scaled by 112/128 to 140×112, then rows 14..125 kept (original 16..143)."""
    tall = np.zeros((2, 160, 128, 3), np.uint8)  # rows 0-15 and 144-159 black: cropped away
    tall[:, 16:80] = (255, 0, 0)  # red: 56 rows at 112
    tall[:, 80:144] = (0, 255, 0)  # green: 56 rows
    write_bin(tmp_path / "tall.bin", tall, np.array([True]))
    images = load_bin(tmp_path / "tall.bin").images.numpy().astype(int)
    assert images.shape == (2, 3, 112, 112)
    red, green = np.array([255, 0, 0]), np.array([0, 255, 0])
    for r in (2, 28, 52):
        assert np.abs(images[:, :, r, 56] - red).max() < 12, r
    for r in (60, 84, 109):
        assert np.abs(images[:, :, r, 56] - green).max() < 12, r


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
