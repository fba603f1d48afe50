"""Keep glibc from handing freed tensor memory back to the kernel between training steps.

A CPU training step allocates and frees the same large activation buffers every step. glibc serves
blocks above its mmap threshold with ``mmap`` and returns them with ``munmap`` (and trims the heap top
above ``M_TRIM_THRESHOLD``), so each step pays the page faults of touching fresh pages again. On this
project's 2-core CPU that was a quarter of the wall time of ``kpt train mnist`` (300 steps: 20 s of
system time in 75 s; with the thresholds raised 1.4 s in 57 s, same results). Raising both
thresholds keeps the memory in the process for reuse; the peak memory is unchanged, it is just not
returned until exit. The same is done by ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
in the environment; this applies it from inside the process. Set ``KPT_MALLOC_TUNING=0`` to skip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30     # blocks up to 1 GiB come from the reusable heap
_TRIM_THRESHOLD = 2**31 - 1    # (largest int mallopt takes) keep the heap top while training

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if glibc accepted them.

    A no-op returning False on non-Linux systems, other C libraries, or with ``KPT_MALLOC_TUNING=0``.
    """
    global _done
    if _done:
        return True
    if os.environ.get("KPT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or an unusual libc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    if not ok:
        logger.debug("glibc mallopt refused the thresholds; allocator left as it is")
    _done = ok
    return ok
