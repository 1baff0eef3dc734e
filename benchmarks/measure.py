"""Run one command and measure it: wall time, peak RSS of its process tree, peak temp disk.

The client runs as a child process with its own fresh ``TMPDIR`` (and ``HOME``), so what it
leaves on disk is its own. A sampler thread polls ``/proc`` every ``interval`` seconds:

* RSS: the sum of ``VmRSS`` over the child and all its descendants (a client that forks worker
  processes is charged for all of them), and each process's ``VmHWM`` (the kernel's own peak,
  reset at exec), so a short spike of a single process between two samples is not missed.
  ``wait4``'s ``ru_maxrss`` is not used: it counts the pages of the Python harness that the
  child shared between fork and exec.
* temp disk: the allocated size (``st_blocks``) of everything under the watched directories.

No psutil: only ``/proc`` and the standard library, so the harness runs wherever xnatio does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MB = 1_000_000


@dataclass
class Measured:
    """What one measured command did."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    peak_tmp_mb: dict[str, float]
    cpu_s: float  # user + system time of the client and the children it waited for
    stdout: str
    stderr: str
    timed_out: bool = False


@dataclass
class _Peaks:
    rss_bytes: int = 0
    tmp_bytes: dict[str, int] = field(default_factory=dict)


def _children(pid: int) -> list[int]:
    """Child pids of ``pid`` from /proc/PID/task/*/children (cheap: no scan of all of /proc)."""
    out: list[int] = []
    try:
        with os.scandir(f"/proc/{pid}/task") as tasks:
            for task in tasks:
                try:
                    with open(f"{task.path}/children", "rb") as f:
                        out.extend(int(x) for x in f.read().split())
                except OSError:
                    continue
    except OSError:
        pass
    return out


_HAVE_CHILDREN_FILE = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children_map() -> dict[int, list[int]]:
    """pid -> child pids, from /proc/*/stat (field 4 is the parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may contain spaces.
        rest = raw[raw.rfind(b")") + 2 :].split()
        if len(rest) > 1:
            children.setdefault(int(rest[1]), []).append(int(entry.name))
    return children


def _tree(root: int) -> list[int]:
    if _HAVE_CHILDREN_FILE:
        get = _children
    else:  # kernels without CONFIG_PROC_CHILDREN: one scan of /proc per sample
        children = _children_map()

        def get(pid: int) -> list[int]:
            return children.get(pid, [])

    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(get(pid))
    return out


def _rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes; zeros once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, hwm


def tree_rss_bytes(root: int) -> tuple[int, int]:
    """(sum of current RSS, largest single-process peak) over ``root`` and its descendants."""
    pairs = [_rss_bytes(pid) for pid in _tree(root)]
    return sum(p[0] for p in pairs), max((p[1] for p in pairs), default=0)


def dir_bytes(path: Path) -> int:
    """Disk space allocated to everything under ``path`` (files vanishing meanwhile are fine)."""
    total = 0
    todo = [str(path)]
    while todo:
        current = todo.pop()
        try:
            with os.scandir(current) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    else:
                        total += st.st_blocks * 512
        except OSError:
            continue
    return total


class Sampler:
    """Polls the RSS of a process tree and the size of some directories until stopped."""

    def __init__(self, pid: int | None, watch: Mapping[str, Path], interval: float = 0.1) -> None:
        self.pid = pid
        self.watch = dict(watch)
        self.interval = interval
        self.peaks = _Peaks(tmp_bytes={name: 0 for name in self.watch})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # one last look at what was left behind

    def sample(self) -> None:
        if self.pid is not None:
            total, single_peak = tree_rss_bytes(self.pid)
            self.peaks.rss_bytes = max(self.peaks.rss_bytes, total, single_peak)
        for name, path in self.watch.items():
            self.peaks.tmp_bytes[name] = max(self.peaks.tmp_bytes[name], dir_bytes(path))

    def _run(self) -> None:
        # Densely at first, so a command that lives a fraction of a second is still seen.
        start = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            dense = time.monotonic() - start < 1.0
            self._stop.wait(min(0.01, self.interval) if dense else self.interval)


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    watch: Mapping[str, Path],
    log_dir: Path,
    timeout: float,
    stdin_text: str | None = None,
) -> Measured:
    """Run ``cmd`` to completion (or ``timeout``) and measure it; output is kept in ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=err,
            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so a timeout kills all of it
        )
        if stdin_text is not None and proc.stdin is not None:
            proc.stdin.write(stdin_text.encode())
            proc.stdin.close()
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, _kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            with Sampler(proc.pid, watch) as sampler:
                # wait4 rather than Popen.wait: its rusage gives the client's CPU time.
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - start
        except BaseException:
            # Interrupted (Ctrl-C, or SIGTERM turned into it): the client, in a session of its
            # own, would otherwise go on uploading after the harness has gone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            watchdog.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak_rss = sampler.peaks.rss_bytes
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        peak_rss_mb=peak_rss / MB,
        peak_tmp_mb={k: v / MB for k, v in sampler.peaks.tmp_bytes.items()},
        cpu_s=usage.ru_utime + usage.ru_stime,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        timed_out=timed_out.is_set(),
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process and its reaped children, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime..cstime are fields 14-17.
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None
