"""Where xio's memory goes per file, and when its first import request leaves (issue 16 item 4).

    python -m benchmarks.memprobe rss 2000,10000,100000 [--no-verify]
    python -m benchmarks.memprobe types 10000
    python -m benchmarks.memprobe timeline 10000,100000 [--no-verify]
    python -m benchmarks.memprobe phases 100000 [--no-verify]
    python -m benchmarks.memprobe readback 3000

``rss``: ``xio upload-dicom`` of cached synthetic sessions (small files, benchmarks/data.py) into
a sandbox in its own process (its memory is not ours), through :mod:`benchmarks.relay`; prints
peak RSS of the client's process tree (benchmarks/measure.py) and the seconds from launch to the
first import request. ``types``: in this process, discover + plan + result of one session under
tracemalloc; prints the peak and the allocations still held per file, grouped by source line.
``timeline``: the same command as ``rss``, with each stage of the pipeline timed from launch to
the first import request (:mod:`benchmarks.timeline`); the client stops a second after that
request starts. ``phases``: the same command as ``rss``, run to its end, with the stages timed
and the client's own RSS sampled every 50 ms: which stage the peak is reached in, and the RSS at
the end of each stage. ``readback``: a session of 30 series uploaded
into a sandbox that then answers every request 50 ms late (``rest-wan``'s latency): the read-back
of its scan listings timed one at a time and ``VERIFY_LISTINGS`` at a time, alternately, 3 times
each. ``MEMPROBE_SRC=DIR``: the client runs
the ``xnatio`` of that source folder (e.g. an older commit's ``src``) for a side-by-side run.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from benchmarks.data import DataSpec, ensure_dataset
from benchmarks.measure import run_measured
from benchmarks.relay import FirstImportRelay
from benchmarks.servers import Sandbox

IMAGE = (64, 64)


def rss(sizes: list[int], verify: bool, timeline: bool = False, phases: bool = False) -> None:
    for n in sizes:
        ds = ensure_dataset(DataSpec(n, *IMAGE))
        work = Path(tempfile.mkdtemp(prefix=f"memprobe-{n}-"))
        sandbox = Sandbox(work / "server")
        sandbox.start()
        try:
            with FirstImportRelay("127.0.0.1", sandbox.port) as relay:
                timed = timeline or phases
                run = ["benchmarks.timeline", "--"] if timed else ["xnatio"]
                cmd = [sys.executable, "-m", *run, "upload-dicom", "BENCH", "S01"]
                cmd += [f"E{n}", str(ds.path), "--server", relay.url, "--user", "admin"]
                cmd += ["--json", "-q", "--num-batches", "42", "--upload-workers", "42"]
                if not verify:
                    cmd.append("--no-verify")
                (work / "home").mkdir()
                env = dict(os.environ, XNAT_PASSWORD=sandbox.password, HOME=str(work / "home"))
                stages = work / "timeline.jsonl"
                if timed:
                    env["TIMELINE_OUT"] = str(stages)
                    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
                if timeline:
                    env["TIMELINE_STOP"] = "1.0"  # the rest of the upload is not measured
                if phases:
                    env["TIMELINE_RSS"] = "0.05"
                if os.environ.get("MEMPROBE_SRC"):  # another tree's xnatio (a before/after run)
                    env["PYTHONPATH"] = os.pathsep.join(
                        p for p in (os.environ["MEMPROBE_SRC"], env.get("PYTHONPATH")) if p
                    )
                t0 = time.perf_counter()
                m = run_measured(
                    cmd, env=env, cwd=work, watch={}, log_dir=work / "log", timeout=1800
                )
                first = relay.first_import_at - t0 if relay.first_import_at else float("nan")
            print(
                f"{n:>8} files verify={verify}: rc {m.returncode} wall {m.wall_s:.1f} s "
                f"peak RSS {m.peak_rss_mb:.1f} MB first import {first:.2f} s "
                f"cpu {m.cpu_s:.1f} s",
                flush=True,
            )
            if m.returncode != 0:
                print(m.stderr[-2000:])
            if timeline:
                _print_timeline(stages, t0, relay.first_import_at)
            if phases:
                _print_phases(stages, t0)
        finally:
            sandbox.stop()
            shutil.rmtree(work, ignore_errors=True)


def _print_timeline(path: Path, t0: float, first_import: float | None) -> None:
    """Each timed stage (benchmarks/timeline.py) as seconds from launch, in order of start;
    the stages that ended after the first import request are left out."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if first_import is not None:
        rows.append({"stage": "FIRST IMPORT REQUEST", "start": first_import, "end": first_import})
    horizon = first_import if first_import is not None else float("inf")
    for r in sorted(rows, key=lambda r: (r["start"], -r["end"])):
        if r["start"] > horizon:
            continue
        took = r["end"] - r["start"]
        print(f"  {r['start'] - t0:7.3f} s  +{took:6.3f} s  {r['stage']}")


def _print_phases(path: Path, t0: float) -> None:
    """Each timed stage with the client's RSS at its start and end and the most during it, then
    the peak sample and the stages running when it was taken."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    samples = sorted((r["start"], r["rss"]) for r in rows if r["stage"] == "rss")
    stages = [r for r in rows if r["stage"] != "rss"]
    if not samples:
        print("  no RSS samples")
        return

    def at(t: float) -> float:
        before = [rss for when, rss in samples if when <= t]
        return (before[-1] if before else samples[0][1]) / 1e6

    def most(start: float, end: float) -> float:
        inside = [rss for when, rss in samples if start <= when <= end]
        return max(inside, default=0) / 1e6

    print(f"  {'start':>8}  {'took':>8}  {'RSS at start':>12}  {'end':>7}  {'most':>7}  stage")
    for r in sorted(stages, key=lambda r: (r["start"], -r["end"])):
        print(
            f"  {r['start'] - t0:7.2f}s  {r['end'] - r['start']:7.2f}s  {at(r['start']):10.1f}MB"
            f"  {at(r['end']):7.1f}  {max(most(r['start'], r['end']), at(r['end'])):7.1f}"
            f"  {r['stage']}"
        )
    when, peak = max(samples, key=lambda s: s[1])
    active = [r["stage"] for r in stages if r["start"] <= when <= r["end"]]
    print(f"  peak {peak / 1e6:.1f} MB at {when - t0:.2f} s, during: {', '.join(active) or '-'}")


def readback(n: int) -> None:
    from xnatio import defaults
    from xnatio.pipeline import UploadOptions, upload
    from xnatio.sandbox import SandboxServer
    from xnatio.settings import Secret, Settings
    from xnatio.synth import generate_session
    from xnatio.verify import stream_server_session
    from xnatio.xnat.client import XnatClient

    work = Path(tempfile.mkdtemp(prefix=f"memprobe-readback-{n}-"))
    password = Secret("bench-password")
    try:
        with SandboxServer(
            work / "server", users={"admin": password.reveal()}, projects=["BENCH"]
        ) as server:
            exam = work / "exam"
            generate_session(exam, series=30, instances=max(1, n // 30), image_size=(8, 8))
            settings = Settings(server=server.url, username="admin", password=password)
            options = UploadOptions(
                project="BENCH", subject="S01", session="E1", path=exam, resume=False
            )
            result = upload(settings=settings, options=options)
            assert result.success, result.errors[:3]
            server.set_knobs(latency_ms=50.0)
            with XnatClient(server.url, username="admin", password=password) as client:
                for _ in range(3):
                    for k in (1, defaults.VERIFY_LISTINGS):
                        t0 = time.perf_counter()
                        found = stream_server_session(client, "BENCH", "S01", "E1", in_flight=k)
                        assert found is not None
                        files = sum(len(s.files) for s in found[1])
                        took = time.perf_counter() - t0
                        print(f"  {k} listing(s) at a time: {took:.2f} s ({files} files)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def types(n: int) -> None:
    """One real upload in this process (the sandbox in its own), snapshots at the commit (every
    outcome made) and at the end (the result held)."""
    from xnatio.discover import discover
    from xnatio.models import Phase, ProgressEvent
    from xnatio.pipeline import UploadOptions, upload
    from xnatio.settings import Secret, Settings

    ds = ensure_dataset(DataSpec(n, *IMAGE))
    discover(next(ds.path.iterdir()), workers=1)  # lazy imports first
    work = Path(tempfile.mkdtemp(prefix=f"memprobe-types-{n}-"))
    sandbox = Sandbox(work / "server")
    sandbox.start()
    snaps: dict[str, tracemalloc.Snapshot] = {}

    def progress(e: ProgressEvent) -> None:
        if e.phase is Phase.COMMIT and "commit" not in snaps:
            snaps["commit"] = tracemalloc.take_snapshot()

    try:
        secret = Secret(sandbox.password)
        settings = Settings(server=sandbox.url, username="admin", password=secret)
        options = UploadOptions(
            project="BENCH",
            subject="S01",
            session=f"T{n}",
            path=ds.path,
            journal=work / "journal.sqlite",
            lock_dir=work / "locks",
            verify=not os.environ.get("MEMPROBE_NO_VERIFY"),
        )
        gc.collect()
        tracemalloc.start(int(os.environ.get("MEMPROBE_DEPTH", "1")))
        stop = threading.Event()
        best = [0]

        def sample() -> None:  # the snapshot nearest the peak (every 0.2 s)
            while not stop.wait(0.2):
                current, _ = tracemalloc.get_traced_memory()
                if current > best[0]:
                    best[0] = current
                    snaps["peak"] = tracemalloc.take_snapshot()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = upload(settings=settings, options=options, progress=progress)
        stop.set()
        sampler.join()
        _, peak = tracemalloc.get_traced_memory()
        snaps["end"] = tracemalloc.take_snapshot()
        tracemalloc.stop()
    finally:
        sandbox.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{n} files: success {result.success}, tracemalloc peak {peak / n:.0f} B/file")
    for when, snap in snaps.items():
        print(f"held at {when}:")
        for stat in snap.statistics("lineno")[:12]:
            frame = stat.traceback[0]
            where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}"
            print(f"  {stat.size / n:7.0f} B/file  {where}:{frame.lineno}")
    if os.environ.get("MEMPROBE_DEPTH"):
        for stat in snaps["commit"].statistics("traceback")[:3]:
            print(f"{stat.size / n:.0f} B/file from:")
            print("\n".join(stat.traceback.format()[-16:]))
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    print("objects per file (gc-tracked):", {k: round(v / n, 2) for k, v in counts.most_common(8)})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("rss", "types", "timeline", "phases", "readback"))
    p.add_argument("sizes")
    p.add_argument("--no-verify", action="store_true")
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.what in ("rss", "timeline", "phases"):
        rss(sizes, not a.no_verify, timeline=a.what == "timeline", phases=a.what == "phases")
    elif a.what == "readback":
        readback(sizes[0])
    else:
        types(sizes[0])


if __name__ == "__main__":
    main()
