"""The receivers the contenders send to, each in its own process, and the checks of what landed.

The local XNAT-compatible server runs as ``python -m xnatio sandbox`` in a separate process, so
its CPU use does not share the client's interpreter and the client's RSS is measured alone. It is
started afresh for every run, on a new data directory, so sessions never merge across runs and a
run's result can be counted on the server exactly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import requests

from benchmarks.link import Link
from benchmarks.measure import Sampler, cpu_seconds

STORESCP = "/usr/bin/storescp"
ARCHIVE_IDLE_S = 30.0  # the sandbox's --idle-seconds in the harness (XNAT's default: 300)
STORESCU = "/usr/bin/storescu"
# Where the sandbox keeps what it receives: in memory (tmpfs) when there is room, so the
# receiver's file system work is not the client's disk's. Creating a file on this machine's ext4
# costs 0.3-0.9 ms of kernel CPU (measured: 3,000 empty files, one thread; 0.01 ms on tmpfs),
# which was half of the sandbox's CPU per file; a real XNAT writes to its own disks, not the
# client's. XNATIO_BENCH_SERVER_DATA=disk keeps it under the run's work directory (as before).
SHM = Path("/dev/shm")
SHM_MIN_FREE = 8e9  # the largest cached session is 4.8 GB
SERVER_DATA_ENV = "XNATIO_BENCH_SERVER_DATA"
# The harness's sandbox runs from this source tree when set (PYTHONPATH), e.g. an older commit's
# exported src/, so a scenario can be run with two servers side by side; the clients stay this
# checkout's.
SERVER_SRC_ENV = "XNATIO_BENCH_SERVER_SRC"
# The sandbox's import worker processes (``xio sandbox --import-workers``): 0 reads every body
# in its request thread. The harness's ``--server-workers`` sets it.
SERVER_WORKERS_ENV = "XNATIO_BENCH_SERVER_WORKERS"
DEFAULT_SERVER_WORKERS = 0


def free_port() -> int:
    """An unused loopback port (the machine is shared: never a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(
    port: int, proc: subprocess.Popen[bytes], timeout: float, what: str, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@dataclass
class Sandbox:
    """One ``xio sandbox`` process on a fresh data directory.

    With a ``link``, the server runs inside the link's network namespace and is reached over the
    shaped veth pair (benchmarks/link.py) instead of loopback.
    """

    workdir: Path
    knobs: dict[str, float] = field(default_factory=dict)
    user: str = "admin"
    password: str = "bench-password"
    # The projects the scenarios upload into: created at start (an upload to a project that
    # does not exist lands in Unassigned, facts 1.2).
    projects: tuple[str, ...] = ("BENCH",)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    cpu_at_start: float = 0.0
    link: Link | None = None
    pythonpath: str | None = field(default_factory=lambda: os.environ.get(SERVER_SRC_ENV) or None)
    """Run the server from another source tree (``PYTHONPATH``), e.g. an older commit's
    (default: ``$XNATIO_BENCH_SERVER_SRC``, else this checkout)."""
    import_workers: int = field(
        default_factory=lambda: int(os.environ.get(SERVER_WORKERS_ENV) or DEFAULT_SERVER_WORKERS)
    )
    """``xio sandbox --import-workers`` (default: ``$XNATIO_BENCH_SERVER_WORKERS``, else
    ``DEFAULT_SERVER_WORKERS``)."""
    data_dir: Path | None = None
    """Where the server keeps its data (set at start: tmpfs when there is room)."""
    in_memory: bool = False
    cpu_client_start: float | None = None
    cpu_client_exit: float | None = None

    @property
    def host(self) -> str:
        return self.link.server_ip if self.link is not None else "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def tmp_dir(self) -> Path:
        return self.workdir / "server-tmp"

    def _choose_data_dir(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        want = os.environ.get(SERVER_DATA_ENV, "memory")
        if want != "disk" and SHM.is_dir():
            st = os.statvfs(SHM)
            if st.f_bavail * st.f_frsize >= SHM_MIN_FREE:
                self.in_memory = True
                return Path(tempfile.mkdtemp(prefix="xnatio-bench-server-", dir=SHM))
        self.in_memory = False
        return self.workdir / "server-data"

    def start(self) -> None:
        data = self.data_dir = self._choose_data_dir()
        data.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = [
            *(self.link.exec_prefix() if self.link is not None else []),
            sys.executable,
            "-m",
            "xnatio",
            "sandbox",
            "--data-dir",
            str(data),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--user",
            self.user,
            "--password",
            self.password,
        ]
        for project in self.projects:
            cmd += ["--project", project]
        if self.import_workers > 0:
            cmd += ["--import-workers", str(self.import_workers)]
        # Direct-Archive uploads are archived after the idle interval (facts 1.6): shorter here,
        # so the check does not wait XNAT's 5 minutes, but longer than any pause between a
        # peer's requests: a session archived between two of them sends the rest to the
        # prearchive (facts 1.6), which is what a 2 s interval did to xnatctl under load.
        knobs = {"idle_seconds": ARCHIVE_IDLE_S, **self.knobs}
        for name, value in knobs.items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        env = dict(os.environ, TMPDIR=str(self.tmp_dir))
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        log = open(self.workdir / "server.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        try:
            _wait_port(self.port, self.proc, 20, "the sandbox server", self.host)
            self._wait_ready()
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}; its log: {self.log_tail()}") from exc
        # The server's own temp use (TMPDIR and its spool, DATA/tmp) is watched for the whole
        # run: it is not the client's.
        watch = {"tmpdir": self.tmp_dir, "spool": data / "tmp"}
        self.sampler = Sampler(self.proc.pid, watch, interval=0.2)
        self.sampler.__enter__()
        self.cpu_at_start = tree_cpu_seconds(self.proc.pid)  # its start-up is not the run's

    # The window of the server's CPU that counts (issue 16: "below 40 % of the wall time" of
    # the run): from the client's launch to its exit. What the server does after the client
    # exited (the harness's count of what landed, Direct-Archive's idle archiving, the stop) is
    # reported beside it as server_cpu_after_s, not in it.
    def client_started(self) -> None:
        if self.proc is not None:
            self.cpu_client_start = tree_cpu_seconds(self.proc.pid)

    def client_exited(self) -> None:
        if self.proc is not None:
            self.cpu_client_exit = tree_cpu_seconds(self.proc.pid)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                r = requests.get(
                    f"{self.url}/xapi/siteConfig/buildInfo",
                    auth=(self.user, self.password),
                    timeout=2,
                )
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("the sandbox server did not answer /xapi/siteConfig/buildInfo")

    def log_tail(self, n: int = 800) -> str:
        try:
            return (self.workdir / "server.log").read_text(errors="replace")[-n:].strip()
        except OSError:
            return "(no log)"

    def stop(self) -> dict[str, float]:
        """Stop the server; returns its peaks (RSS and temp disk, MB) over the run."""
        peaks: dict[str, float] = {}
        if self.sampler is not None:
            self.sampler.__exit__(None, None, None)
            tmp = self.sampler.peaks.tmp_bytes
            total = tree_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0
            peaks = {
                "server_rss_mb": self.sampler.peaks.rss_bytes / 1e6,
                # Upper bound: the two peaks need not have been at the same moment.
                "server_tmp_mb": (tmp["tmpdir"] + tmp["spool"]) / 1e6,
                "server_data_in_memory": float(self.in_memory),
            }
            if self.cpu_client_start is not None and self.cpu_client_exit is not None:
                peaks["server_cpu_s"] = self.cpu_client_exit - self.cpu_client_start
                peaks["server_cpu_after_s"] = total - self.cpu_client_exit
            else:  # no client window marked: the whole run
                peaks["server_cpu_s"] = total - self.cpu_at_start
            self.sampler = None
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
        if self.in_memory and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return peaks

    def stats(self) -> dict[str, Any]:
        try:
            r = requests.get(
                f"{self.url}/_sandbox/stats", auth=(self.user, self.password), timeout=10
            )
            return dict(r.json()) if r.ok else {}
        except (requests.RequestException, ValueError):
            return {}

    def count_archived(self, project: str, subject: str, label: str) -> tuple[int, str]:
        """Files in the archived session, counted scan by scan through XNAT's REST API.

        Returns (count, note): the note says what was found when it is not a plain archive.
        """
        s = requests.Session()
        s.auth = (self.user, self.password)
        base = f"{self.url}/data/projects/{project}/subjects/{subject}/experiments/{label}"
        r = s.get(f"{base}/scans", params={"format": "json"}, timeout=60)
        if r.status_code == 404:
            return 0, self._prearchive_note(s, project)
        r.raise_for_status()
        total = 0
        for scan in r.json()["ResultSet"]["Result"]:
            files = s.get(
                f"{base}/scans/{scan['ID']}/resources/DICOM/files",
                params={"format": "json"},
                timeout=60,
            )
            if files.status_code == 404:
                continue
            files.raise_for_status()
            total += len(files.json()["ResultSet"]["Result"])
        return total, ""

    def _prearchive_note(self, s: requests.Session, project: str) -> str:
        direct = (self.data_dir or self.workdir / "server-data") / "direct" / project
        if direct.is_dir() and any(direct.iterdir()):
            # Received with Direct-Archive and not yet archived (facts 1.6).
            return "direct-archive pending: received, not yet archived"
        try:
            r = s.get(
                f"{self.url}/data/prearchive/projects/{project}",
                params={"format": "json"},
                timeout=30,
            )
            rows = r.json()["ResultSet"]["Result"] if r.ok else []
        except (requests.RequestException, ValueError, KeyError):
            rows = []
        if not rows:
            return "no such experiment in the archive, and nothing in the prearchive"
        states = ", ".join(f"{row.get('name')}={row.get('status')}" for row in rows)
        return f"no such experiment in the archive; prearchive holds: {states}"


@dataclass
class StoreSCP:
    """dcmtk's ``storescp --fork`` (one child process per association) on a fresh directory."""

    workdir: Path
    aet: str = "XNAT"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def out_dir(self) -> Path:
        return self.workdir / "received"

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = open(self.workdir / "storescp.log", "wb")  # noqa: SIM115 - closed with the process
        # Absolute path: pynetdicom installs a Python ``storescp`` that comes first on PATH.
        self.proc = subprocess.Popen(
            [STORESCP, "--fork", "-aet", self.aet, "-od", str(self.out_dir), str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait_port(self.port, self.proc, 10, "storescp")

    def stop(self) -> dict[str, float]:
        """Stop storescp; returns the CPU time it and its association processes used."""
        peaks: dict[str, float] = {}
        if self.proc is not None:
            # cutime/cstime count the --fork children storescp has reaped.
            peaks["server_cpu_s"] = cpu_seconds(self.proc.pid)
            _stop(self.proc)
            self.proc = None
        return peaks

    def count_received(self) -> int:
        return sum(1 for p in self.out_dir.rglob("*") if p.is_file())


# -- what the local server costs -----------------------------------------------------------------
def tree_cpu_seconds(pid: int, system_only: bool = False) -> float:
    """User + system CPU (or system CPU alone) of a process, its live descendants and the
    children each reaped, from /proc."""
    if system_only:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total = (int(fields[12]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            total = 0.0
    else:
        total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(tree_cpu_seconds(int(child), system_only) for child in children)


class _CoreSampler(threading.Thread):
    """The most CPU seconds the server used in any 1-second window (sampled every 0.25 s):
    how many cores it kept busy at its peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        samples: list[tuple[float, float]] = []
        while not self._halt.wait(0.25):
            samples.append((time.monotonic(), tree_cpu_seconds(self.pid)))
            while samples and samples[-1][0] - samples[0][0] > 1.0:
                t0, c0 = samples.pop(0)
                t1, c1 = samples[-1]
                self.peak = max(self.peak, (c1 - c0) / (t1 - t0))

    def stop(self) -> None:
        self._halt.set()
        self.join()


class _PerfStat:
    """``perf stat`` on a running process: its context switches and page faults until ``stop``."""

    EVENTS: ClassVar[dict[str, str]] = {
        "context-switches": "server_context_switches",
        "page-faults": "server_page_faults",
    }

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        cmd = ["perf", "stat", "-x", ",", "-e", ",".join(self.EVENTS), "-o", str(out)]
        self.proc = subprocess.Popen([*cmd, "-p", str(pid)], stderr=subprocess.DEVNULL)
        time.sleep(0.2)  # (perf attaches to every thread before the client starts)

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        return perf_counts(self.out.read_text())


def perf_counts(text: str) -> dict[str, int]:
    """The counts of ``perf stat -x ,`` output, by our result names (uncounted events left out)."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in _PerfStat.EVENTS and fields[0].isdigit():
            found[_PerfStat.EVENTS[fields[2]]] = int(fields[0])
    return found


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def server_cost(
    session: Path,
    knobs: dict[str, float],
    workdir: Path,
    extra: list[str],
    server_src: str | None = None,
    verify: bool = False,
    perf: bool = False,
) -> dict[str, Any]:
    """Upload ``session`` with ``xio upload-dicom`` (its defaults) to a fresh sandbox and return
    the sandbox's CPU seconds (process tree, from /proc) over the upload, per file and per GB.
    ``verify`` lets the client read the session back (its default, as the harness's ``xio``
    runs); otherwise it runs with ``--no-verify``. ``perf`` also counts the server's context
    switches and page faults over the upload with ``perf stat`` (all its threads, ended ones
    too): less noisy than its CPU on a shared machine."""
    from benchmarks.contenders import _xio

    files = [p for p in session.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    server = Sandbox(workdir, knobs=dict(knobs), pythonpath=server_src)
    server.start()
    try:
        assert server.proc is not None
        load = _load()
        before = tree_cpu_seconds(server.proc.pid)
        sys_before = tree_cpu_seconds(server.proc.pid, system_only=True)
        started = time.monotonic()
        cores = _CoreSampler(server.proc.pid)
        cores.start()
        cmd = [*_xio(), "upload-dicom", "BENCH", "S1", "E1", str(session), "--server"]
        cmd += [server.url, "--user", server.user, *([] if verify else ["--no-verify"]), "-q"]
        cmd += extra
        env = dict(os.environ, XNAT_PASSWORD=server.password)
        counters = _PerfStat(server.proc.pid, workdir / "perf.txt") if perf else None
        server.client_started()
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False)
        server.client_exited()
        counts = counters.stop() if counters is not None else {}
        wall = time.monotonic() - started
        cpu = tree_cpu_seconds(server.proc.pid) - before
        system = tree_cpu_seconds(server.proc.pid, system_only=True) - sys_before
        cores.stop()
        landed, note = server.count_archived("BENCH", "S1", "E1")
    finally:
        peaks = server.stop()
    return {
        "files": len(files),
        "bytes": size,
        "client_exit": done.returncode,
        "landed": landed,
        "note": note,
        "wall_s": round(wall, 2),
        "server_cpu_s": round(cpu, 2),
        "server_system_cpu_s": round(system, 2),
        "server_cpu_share_of_wall": round(cpu / wall, 3),
        "server_cpu_ms_per_file": round(1000 * cpu / max(1, len(files)), 3),
        "server_cpu_s_per_gb": round(cpu / (size / 1e9), 2),
        "server_cores_peak_1s": round(cores.peak, 2),
        # The count of what landed and the stop, after the client exited (not in the above).
        "server_cpu_after_s": round(peaks.get("server_cpu_after_s", 0.0), 2),
        "server_data": "memory" if server.in_memory else "disk",
        "load_before": load,
        "load_after": _load(),
        "knobs": knobs,
        "server": server_src or "this checkout",
        "verify": verify,
        **counts,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.servers SESSION_DIR [--knob NAME=VALUE]… [-- XIO_ARGS]``: what
    the sandbox costs (CPU per file and per GB) receiving one xio upload of SESSION_DIR."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.servers")
    parser.add_argument("session", type=Path)
    parser.add_argument("--knob", action="append", default=[], help="NAME=VALUE (repeatable)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--compare",
        metavar="SRC",
        help="also run the server from this source tree (e.g. an exported older commit's src/),"
        " alternating with this checkout's",
    )
    parser.add_argument(
        "--data",
        choices=("memory", "disk", "both"),
        default="memory",
        help="where the server keeps its data: tmpfs (the harness's default when there is"
        " room), the work directory's disk, or both alternately",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="let xio read the session back (its default and the harness's); without it the"
        " upload runs with --no-verify",
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="also count the server's context switches and page faults (perf stat)",
    )
    parser.add_argument("xio_args", nargs="*", help="extra xio upload-dicom arguments (after --)")
    args = parser.parse_args(argv)
    knobs = {k: float(v) for k, v in (item.split("=", 1) for item in args.knob)}
    sources = [None, args.compare] if args.compare else [None]
    places = ["memory", "disk"] if args.data == "both" else [args.data]
    previous = os.environ.get(SERVER_DATA_ENV)
    try:
        for _ in range(args.repeat):
            for place in places:
                os.environ[SERVER_DATA_ENV] = place
                for src in sources:
                    with tempfile.TemporaryDirectory(prefix="xnatio-server-cost-") as work:
                        result = server_cost(
                            args.session,
                            knobs,
                            Path(work),
                            args.xio_args,
                            src,
                            args.verify,
                            args.perf,
                        )
                        print(json.dumps(result), flush=True)
    finally:
        if previous is None:
            os.environ.pop(SERVER_DATA_ENV, None)
        else:
            os.environ[SERVER_DATA_ENV] = previous
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
