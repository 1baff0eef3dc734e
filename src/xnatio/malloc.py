"""A cap on glibc's malloc arenas, set from inside xio before its sender threads start.

glibc gives threads up to 8 arenas per core (16 on 2 cores, for the 42 threads of a REST
upload). Memory a thread frees stays with its arena, so the process keeps the high-water mark of
every arena it used: at 100,000 files 35-50 MB of the client's peak RSS was arena retention, not
live data (``docs/performance.md``, "A lead for the 100,000-file peak"). :func:`cap_arenas` asks
glibc for at most :data:`xnatio.defaults.MALLOC_ARENAS` arenas with ``mallopt(M_ARENA_MAX)``;
existing arenas stay, so it is called as early as possible (``xio``'s entry point, and
:func:`xnatio.pipeline.upload` for library callers, before any of the upload's threads start).

Linux with glibc only; elsewhere (musl, macOS, Windows) and when the user set
``MALLOC_ARENA_MAX`` (glibc reads it at start-up: theirs wins) it does nothing. Never raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from xnatio import defaults

M_ARENA_MAX = -8  # glibc's malloc.h
_done = False


def cap_arenas(arenas: int = defaults.MALLOC_ARENAS) -> bool:
    """At most ``arenas`` malloc arenas from now on (once per process); True if glibc took it."""
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, max(1, arenas)))
