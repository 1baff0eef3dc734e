"""xnatio.malloc: the cap on glibc's malloc arenas (issue 16 item 4), seen in glibc's own count.

Each case runs in a fresh interpreter: arenas, once made, stay for the life of a process.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's malloc only",
)

# Six threads allocating at once (each would get an arena of its own), then glibc's malloc_stats
# (on stderr: one "Arena N:" line per arena).
_THREADS = """
import ctypes, sys, threading
from xnatio.malloc import cap_arenas
if sys.argv[1] == "cap":
    print(cap_arenas(1), cap_arenas(1), flush=True)
together = threading.Barrier(6)
def work():
    together.wait()
    held = [bytes(1000 + i) for i in range(50)]
    together.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(mode: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    run = subprocess.run(
        [sys.executable, "-c", _THREADS, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | (env or {}),
    )
    if "Arena" not in run.stderr:
        pytest.skip("not glibc (no malloc_stats)")
    return run.stderr.count("Arena "), run.stdout.strip()


def test_the_cap_keeps_every_thread_in_the_arenas_allowed() -> None:
    uncapped, _ = _arenas("none")
    capped, said = _arenas("cap")
    assert uncapped > 1  # glibc's default: an arena per thread, up to 8 per core
    assert capped == 1
    assert said == "True False"  # taken once per process


# A 300 KB block freed, then a 200 KB one held: is it mapped (mallinfo2's hblks)?
_MAPPED = """
import ctypes, sys
from xnatio.malloc import cap_arenas
if sys.argv[1] == "cap":
    cap_arenas()
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks
freed = bytes(300_000)
del freed
held = bytes(200_000)
print(libc.mallinfo2().hblks - before)
"""


def _mapped(mode: str, env: dict[str, str] | None = None) -> int:
    run = subprocess.run(
        [sys.executable, "-c", _MAPPED, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {}),
    )
    if run.returncode != 0:
        pytest.skip(f"no mallinfo2 (glibc < 2.33?): {run.stderr[-200:]}")
    return int(run.stdout)


def test_large_blocks_stay_mapped_after_one_is_freed() -> None:
    """glibc raises its mmap threshold to the size of a mapped block once it is freed, so the
    request bodies' 256 KB chunks then come from (and fragment) the arenas; the fixed threshold
    keeps each mapped, returned whole when freed."""
    assert _mapped("none") == 0  # glibc's dynamic threshold: from the heap
    assert _mapped("cap") == 1
    assert _mapped("cap", {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}) == 0  # the user's wins


def test_a_users_malloc_arena_max_wins() -> None:
    arenas, said = _arenas("cap", {"MALLOC_ARENA_MAX": "3"})
    assert said == "False False"
    assert arenas == 3
