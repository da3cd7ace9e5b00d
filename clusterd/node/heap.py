"""Giving freed memory back to the system when a node goes idle.

Two layers keep what was freed for reuse: MLX's buffer cache, and the C
allocator's arenas (one per thread that allocates: gRPC's worker threads,
the compute thread, the links). Without giving it back, an idle node stays
as big as its busiest moment and grows with every new peak of concurrent
calls (the soak found 5-9 MiB in 10 minutes, mostly in glibc's thread arenas).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from typing import Callable

import mlx.core as mx


def _allocator_trim() -> Callable[[], object]:
    """The platform's call that returns free allocator pages, or a no-op."""
    if sys.platform == "darwin":
        # All zones (NULL), as much as possible (goal 0).
        lib = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
        relief = lib.malloc_zone_pressure_relief
        relief.argtypes, relief.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_size_t
        return lambda: relief(None, 0)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc; other C libraries may not have it
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_TRIM = _allocator_trim()  # found once; a function, not state


def give_back() -> None:
    """MLX's cached buffers and the allocator's free pages to the system."""
    mx.clear_cache()
    _TRIM()


def free_memory() -> None:
    """After a shard is dropped: its Python objects first, then the pages."""
    gc.collect()
    give_back()
