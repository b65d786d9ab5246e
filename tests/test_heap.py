"""The heap setting that keeps freed tensor memory from fragmenting glibc's heap."""
import platform

import pytest

from fedrun import heap


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt(M_MMAP_THRESHOLD) is glibc's; elsewhere the call is a no-op")
def test_glibc_accepts_the_fixed_mmap_threshold():
    assert heap.fix_mmap_threshold() is True


def test_a_missing_libc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: "/nonexistent/libc.so")
    assert heap.fix_mmap_threshold() is False
