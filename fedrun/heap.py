"""Keep freed tensor memory from piling up in the C heap (glibc only; a no-op elsewhere).

glibc serves large allocations with mmap and returns them to the system when freed, but
after each such free it raises its mmap threshold (up to 32 MiB) so that later allocations
of that size come from the heap instead, where freed blocks stay mapped and fragment.
Training's activations and per-client deltas are exactly such blocks: over 3 rounds of W1
lstm the peak RSS was 498 MB with the sliding threshold, 462 MB fixed at 4 MiB and 427 MB
fixed at glibc's initial 128 KiB; but at 128 KiB every activation is a fresh mmap whose pages
the kernel must zero, and rounds took ~35% longer. 4 MiB keeps most of the memory and little
of the cost.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
THRESHOLD_BYTES = 4 * 1024 * 1024


def fix_mmap_threshold() -> bool:
    """True if glibc took the setting."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt)
        return False
