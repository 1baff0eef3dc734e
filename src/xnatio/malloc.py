"""A cap on glibc's malloc arenas and a fixed mmap threshold, set from inside xio before its
sender threads start.

glibc gives threads up to 8 arenas per core (16 on 2 cores, for the 42 threads of a REST
upload). Memory a thread frees stays with its arena, so the process keeps the high-water mark of
every arena it used: at 100,000 files 35-50 MB of the client's peak RSS was arena retention, not
live data (``docs/performance.md``, "A lead for the 100,000-file peak"). :func:`cap_arenas` asks
glibc for at most :data:`xnatio.defaults.MALLOC_ARENAS` arenas with ``mallopt(M_ARENA_MAX)``;
existing arenas stay, so it is called before any of an upload's threads start, by
:func:`xnatio.pipeline.upload` (``xio upload-dicom``, ``upload-many``, ``demo`` and library
callers alike), and before that by :func:`xnatio.many.group.find_studies` (the plan of
``upload-many``, its dry run too). Not by ``xio sandbox``: the local server's threads are its
own concern.

Large blocks: glibc serves blocks of 128 KiB or more with ``mmap`` at first, but after the first is
freed it raises its mmap threshold to that size (up to 32 MB) and serves them from the arenas from
then on, where freed chunks fragment the heap and stay resident. A fixed threshold
(``mallopt(M_MMAP_THRESHOLD)``, :data:`xnatio.defaults.MALLOC_MMAP_THRESHOLD`, which also turns that
adjustment off) keeps them mapped and returned whole when freed: at 100,000 files the peak went
138.6 -> 131.1 MB and the RSS after sending 124 -> 108 MB, for the same CPU
(``docs/performance.md``, "rss"). That was measured with the request bodies' chunks at 256 KiB; they
are 64 KiB now (``archive.CHUNK``, below the threshold, from the arenas), which took more off the
peak ("Smaller body chunks").

Linux with glibc only; elsewhere (musl, macOS, Windows) it does nothing, and a setting the user
made in the environment (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``: glibc reads them at
start-up) wins. Never raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from xnatio import defaults

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
_done = False


def cap_arenas(
    arenas: int = defaults.MALLOC_ARENAS, mmap_threshold: int = defaults.MALLOC_MMAP_THRESHOLD
) -> bool:
    """At most ``arenas`` malloc arenas from now on, and blocks of ``mmap_threshold`` bytes or
    more mapped (once per process); True if glibc took the cap on arenas."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return False
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(mallopt(M_ARENA_MAX, max(1, arenas)))
