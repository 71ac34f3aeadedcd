"""glibc's allocator, tuned for a run of the command line (a no-op elsewhere).

A run allocates and frees tile-sized arrays by the thousand (a 820x616 tile is 2 MB as
float32, a 4056x3040 one 49 MB), on several threads, next to libvips' own threads.
glibc's defaults cost it twice:

- up to eight malloc arenas per CPU: memory freed by one of libvips' threads stays
  fragmented across arenas, and the process grows (the usual advice for libvips servers
  is ``MALLOC_ARENA_MAX=2``);
- an adaptive mmap threshold, and a heap trimmed as soon as 128 kB are free at its top:
  each block that was given back to the system is faulted in again, page by page, when
  the next tile needs it. The 1,000-tile scan of 820x616 tiles took a million page faults
  and 4.8 s of system time with only the arenas and a fixed 1 MB threshold set, 94,000
  and 1.9 s with the thresholds here.

Blocks of :data:`MMAP_THRESHOLD` or more still come straight from the system and go
back when freed (a band of the mosaic is tens of megabytes); smaller ones are reused
from the heap, which is trimmed only when :data:`TRIM_THRESHOLD` is free at its top.
"""

from __future__ import annotations

import os
import sys

ARENAS = 2
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20
# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_malloc(arenas: int = ARENAS, mmap_threshold: int = MMAP_THRESHOLD,
                trim_threshold: int = TRIM_THRESHOLD) -> None:
    """Ask glibc for at most ``arenas`` malloc arenas, blocks of ``mmap_threshold`` bytes
    or more straight from the system, and a heap trimmed when ``trim_threshold`` bytes
    are free at its top. A setting the environment gives (``MALLOC_ARENA_MAX``,
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) is left as it is. The command
    line calls this; a library user may prefer those variables."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        for variable, parameter, value in (
                ("MALLOC_ARENA_MAX", _M_ARENA_MAX, arenas),
                ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, mmap_threshold),
                ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, trim_threshold)):
            if variable not in os.environ:
                libc.mallopt(parameter, value)
    except (OSError, AttributeError):  # not glibc (musl, say)
        pass
