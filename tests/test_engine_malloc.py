"""kpt.engine.malloc: glibc thresholds raised once, skippable, harmless elsewhere."""

import sys

import pytest

from kpt.engine import malloc


def test_opt_out_leaves_allocator_alone(monkeypatch):
    monkeypatch.setattr(malloc, "_done", False)
    monkeypatch.setenv("KPT_MALLOC_TUNING", "0")
    assert malloc.keep_freed_memory() is False
    assert malloc._done is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_glibc_accepts_thresholds_once(monkeypatch):
    monkeypatch.setattr(malloc, "_done", False)
    monkeypatch.delenv("KPT_MALLOC_TUNING", raising=False)
    calls = []
    real_cdll = malloc.ctypes.CDLL

    def counting_cdll(name):
        calls.append(name)
        return real_cdll(name)

    monkeypatch.setattr(malloc.ctypes, "CDLL", counting_cdll)
    first = malloc.keep_freed_memory()
    second = malloc.keep_freed_memory()
    if not first:
        pytest.skip("not glibc: mallopt unavailable or refused")
    assert second is True and len(calls) == 1  # the second call does not touch libc again
