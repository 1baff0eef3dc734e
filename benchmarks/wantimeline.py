"""Where an upload's time goes over a shaped link: one xio run, stage by stage (issue 16 item 1).

    XNATIO_BENCH_CACHE=/work/benchcache python -m benchmarks.wantimeline rest-wan [--files 3000]
        [--src DIR] [-- EXTRA XIO OPTIONS]

Sets up the scenario's receiver as the harness does (``rest-wan``: a 400 Mbit/s ``tbf`` link,
``rest-slow``: 100 Mbit/s; the server's 50 ms per request and 2 ms per file,
:mod:`benchmarks.scenarios`), then runs ``xio upload-dicom`` through :mod:`benchmarks.timeline`
with more stages timed: each batch's request (its index, start, end), each body's drain (from its
last byte handed to the socket until the peer acknowledged all of it), every change of
``--compress auto``'s choice, the subject, the commit and the archive requests, the read-back.
Meanwhile this process samples, every 20 ms, the bytes the host's end of the veth pair has
transmitted (what the link carried) and the CPU seconds of the client and of the server. It
prints one row per event, seconds from launch, and a summary: the link's floor (wire bytes at
the link rate), when the link went idle for good, the stragglers (batches ending after the first
one ended) and the CPU of each side per phase. With ``--src DIR`` the client runs that tree's
``xnatio`` (a side-by-side with another branch). Measurement only: nothing here changes what the
client or the server do.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.data import DataSpec, ensure_dataset
from benchmarks.link import Link, link_unavailable
from benchmarks.scenarios import FULL_IMAGE, SLOW_LINK_MBIT, WAN_KNOBS, WAN_LINK_MBIT
from benchmarks.servers import Sandbox, tree_cpu_seconds

# rest-limit: loopback, no knobs (the link's figures are then the loopback interface's).
LINKS = {"rest-wan": WAN_LINK_MBIT, "rest-slow": SLOW_LINK_MBIT, "rest-limit": 0.0}
SAMPLE_S = 0.02

# (module, attribute path, how to name one call from its arguments) beyond timeline.STAGES.
EXTRA_STAGES: tuple[tuple[str, str, str], ...] = (
    ("xnatio.transports.rest.send", "BatchSender._send_until_done", "batch"),
    ("xnatio.transports.rest.send", "BatchSender._post_import", "request"),
    ("xnatio.transports.rest.send", "BatchSender.prepare", "batch"),
    ("xnatio.transports.rest.wire", "AckedBytes.drain", ""),
    ("xnatio.compress", "Compression._switch", "switch"),
    ("xnatio.transports.rest.commit", "Committer.commit_session", ""),
    ("xnatio.transports.rest.commit", "Committer._archive_request", ""),
    ("xnatio.transports.rest.transport", "RestTransport.commit", ""),
    ("xnatio.transports.rest.transport", "RestTransport.read_back", ""),
    ("xnatio.pipeline", "upload", ""),
    ("xnatio.journal", "JournalRun.record_outcomes", ""),
    ("xnatio.verify", "verify_session", ""),
)


def client_main() -> None:
    """In the client's process: the stages of benchmarks.timeline plus EXTRA_STAGES."""
    import functools
    import importlib

    from benchmarks import timeline

    def name_of(kind: str, attr: str, args: tuple[Any, ...]) -> str:
        if kind == "batch" and len(args) > 1:
            return f"{attr} {getattr(args[1], 'index', -1) + 1}"
        if kind == "switch" and len(args) > 1:
            return f"{attr} -> {'deflate' if args[1] else 'store'}"
        return attr

    def wrap(attr: str, kind: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                record = {"stage": name_of(kind, attr, args), "start": start}
                record["end"] = time.perf_counter()
                record["cpu"] = time.thread_time() - cpu  # this thread's CPU seconds
                record["thread"] = threading.current_thread().name
                timeline._emit(record)

        return timed

    for module_name, attr, kind in EXTRA_STAGES:
        module = importlib.import_module(module_name)
        owner: Any = module
        *parents, leaf = attr.split(".")
        for p in parents:
            owner = getattr(owner, p)
        setattr(owner, leaf, wrap(attr, kind, getattr(owner, leaf)))
    # request numbering: the batch of a _post_import call is in the caller's frame; the
    # thread names the batch instead (one batch per task at a time).
    timeline.main()


class Sampler(threading.Thread):
    """Every SAMPLE_S: (time, link tx bytes, client CPU s, server CPU s)."""

    def __init__(self, iface: str, server_pid: int) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/sys/class/net/{iface}/statistics/tx_bytes")
        self.server_pid = server_pid
        self.client_pid: int | None = None
        self.rows: list[tuple[float, int, float, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            try:
                tx = int(self.path.read_text())
            except OSError:
                continue
            client = tree_cpu_seconds(self.client_pid) if self.client_pid else 0.0
            self.rows.append((time.perf_counter(), tx, client, tree_cpu_seconds(self.server_pid)))


def run(
    scenario: str, files: int, src: str | None, extra: list[str], spy: str | None = None
) -> None:
    mbit = LINKS[scenario]
    why = link_unavailable() if mbit else None
    if why:
        sys.exit(f"no link: {why}")
    ds = ensure_dataset(DataSpec(files, *FULL_IMAGE))
    work = Path(tempfile.mkdtemp(prefix=f"wantimeline-{scenario}-"))
    with Link(mbit) if mbit else contextlib.nullcontext() as link:
        knobs = dict(WAN_KNOBS) if mbit else {}
        sandbox = Sandbox(work / "server", knobs=knobs, link=link)
        sandbox.start()
        try:
            assert sandbox.proc is not None
            sampler = Sampler(link._host_if if link is not None else "lo", sandbox.proc.pid)
            (work / "home").mkdir()
            stages = work / "timeline.jsonl"
            root = str(Path(__file__).resolve().parent.parent)
            path = os.pathsep.join(p for p in (src, root) if p)
            env = dict(
                os.environ,
                XNAT_PASSWORD=sandbox.password,
                HOME=str(work / "home"),
                TIMELINE_OUT=str(stages),
                PYTHONPATH=path,
            )
            cmd = [sys.executable, "-m", "benchmarks.wantimeline", "--client", "--"]
            if spy:  # py-spy's on-CPU samples of the client, native frames included
                cmd = ["py-spy", "record", "-r", "100", "-n", "-f", "raw", "-o", spy, "--", *cmd]
            cmd += ["upload-dicom", "BENCH", "S01", "E1", str(ds.path), "--server", sandbox.url]
            cmd += ["--user", "admin", "--json", "-vv", "--num-batches", "42"]
            cmd += ["--upload-workers", "42", *extra]
            sampler.start()
            time.sleep(0.1)
            tx0 = sampler.rows[-1][1] if sampler.rows else 0
            t0 = time.perf_counter()
            with open(work / "stderr.log", "wb") as err, open(work / "stdout.log", "wb") as out:
                proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=out, stderr=err)
                sampler.client_pid = proc.pid
                rc = proc.wait()
            t_exit = time.perf_counter()
            time.sleep(0.1)
            sampler.stopped.set()
            sampler.join()
            report(stages, t0, t_exit, rc, sampler, tx0, mbit, work)
        finally:
            sandbox.stop()
    shutil.rmtree(work, ignore_errors=True)


def report(
    stages: Path,
    t0: float,
    t_exit: float,
    rc: int,
    sampler: Sampler,
    tx0: int,
    mbit: float,
    work: Path,
) -> None:
    rows = [json.loads(line) for line in stages.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: (r["start"], -r["end"]))
    print(f"exit {rc} after {t_exit - t0:.2f} s; load {os.getloadavg()}")
    if rc != 0:
        print((work / "stderr.log").read_text()[-3000:])
    for line in (work / "stderr.log").read_text().splitlines():
        if "compress auto" in line:
            print("   log:", line.strip()[:160])
    skip = ("BatchSender.prepare", "AckedBytes.drain", "BatchSender._post_import")
    for stage in ("JournalRun.record_outcomes", "BatchSender.prepare", "AckedBytes.drain"):
        calls = [r for r in rows if r["stage"] == stage]
        if calls:
            print(
                f"  {stage}: {len(calls)} calls, {sum(r['end'] - r['start'] for r in calls):.2f} s"
                f" wall, {sum(r.get('cpu', 0.0) for r in calls):.2f} s CPU of their threads"
            )
    for r in rows:
        if r["stage"].startswith(skip):
            continue
        print(
            f"  {r['start'] - t0:7.3f} -> {r['end'] - t0:7.3f} s (+{r['end'] - r['start']:6.3f})"
            f" cpu {r.get('cpu', 0.0):6.3f}  {r['stage']}"
        )
    batches = [r for r in rows if r["stage"].startswith("BatchSender._send_until_done")]
    drains = [r for r in rows if r["stage"] == "AckedBytes.drain"]
    requests_ = [r for r in rows if r["stage"] == "BatchSender._post_import"]
    samples = sampler.rows
    wire = samples[-1][1] - tx0 if samples else 0
    moving = [t for (t, tx), (t1, tx1) in _pairs([(s[0], s[1]) for s in samples]) if tx1 > tx]
    first_tx = min(moving) if moving else t0
    last_tx = max(moving) if moving else t0
    floor = wire / (mbit * 1e6 / 8) if mbit else 0.0
    print(f"link: {wire / 1e6:.1f} MB on the wire, floor {floor:.2f} s at {mbit:g} Mbit/s")
    print(f"  first bytes moving at {first_tx - t0:.2f} s, last at {last_tx - t0:.2f} s")
    if batches:
        ends = sorted(r["end"] - t0 for r in batches)
        starts = sorted(r["start"] - t0 for r in batches)
        print(
            f"  batches: first start {starts[0]:.2f}, last start {starts[-1]:.2f}, "
            f"first end {ends[0]:.2f}, median end {ends[len(ends) // 2]:.2f}, "
            f"last end {ends[-1]:.2f}"
        )
    if drains:
        handed = sorted(r["start"] - t0 for r in drains)
        acked = sorted(r["end"] - t0 for r in drains)
        print(
            f"  last byte handed per body: first {handed[0]:.2f}, median "
            f"{handed[len(handed) // 2]:.2f}, last {handed[-1]:.2f}; all acknowledged: first "
            f"{acked[0]:.2f}, last {acked[-1]:.2f}"
        )
        # after a body was acknowledged, how long until its request answered
        waits = []
        for d in drains:
            reqs = [q for q in requests_ if q["thread"] == d["thread"] and q["end"] >= d["end"]]
            if reqs:
                waits.append(min(q["end"] for q in reqs) - d["end"])
        if waits:
            waits.sort()
            print(
                f"  answer after last ack: median {waits[len(waits) // 2]:.3f} s, "
                f"max {waits[-1]:.3f} s"
            )
    # link rate per 0.5 s and CPU per second of each side
    print("  t(s)   link MB/s   client CPU   server CPU   (per 0.5 s)")
    step = 0.5
    k = 0
    t = t0
    while t < t_exit and samples:
        seg = [s for s in samples if t <= s[0] < t + step]
        if len(seg) >= 2:
            a, b = seg[0], seg[-1]
            dt = b[0] - a[0]
            if dt > 0:
                print(
                    f"  {t - t0:5.1f}  {(b[1] - a[1]) / dt / 1e6:8.1f}  "
                    f"{(b[2] - a[2]) / dt:9.2f}  {(b[3] - a[3]) / dt:10.2f}"
                )
        k += 1
        t = t0 + k * step
    if samples:
        inside = [s for s in samples if s[0] <= t_exit]
        print(
            f"CPU over the run: client {inside[-1][2]:.2f} s, server "
            f"{inside[-1][3] - samples[0][3]:.2f} s"
        )


def _pairs(xs: list[tuple[float, int]]) -> list[tuple[tuple[float, int], tuple[float, int]]]:
    return list(itertools.pairwise(xs))


def main() -> None:
    if "--client" in sys.argv:
        sys.argv.remove("--client")
        client_main()
        return
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=sorted(LINKS))
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--src", help="run the client from this tree's src (side by side)")
    p.add_argument("--spy", help="profile the client with py-spy into this file (raw format)")
    a = p.parse_args(argv)
    run(a.scenario, a.files, a.src, extra, a.spy)


if __name__ == "__main__":
    main()
