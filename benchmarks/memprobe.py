"""Where xio's memory goes per file, and when its first import request leaves (issue 16 item 4).

    python -m benchmarks.memprobe rss 2000,10000,100000 [--no-verify]
    python -m benchmarks.memprobe types 10000

``rss``: ``xio upload-dicom`` of cached synthetic sessions (small files, benchmarks/data.py) into
a sandbox in its own process (its memory is not ours), through :mod:`benchmarks.relay`; prints
peak RSS of the client's process tree (benchmarks/measure.py) and the seconds from launch to the
first import request. ``types``: in this process, discover + plan + result of one session under
tracemalloc; prints the peak and the allocations still held per file, grouped by source line.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

from benchmarks.data import DataSpec, ensure_dataset
from benchmarks.measure import run_measured
from benchmarks.relay import FirstImportRelay
from benchmarks.servers import Sandbox

IMAGE = (64, 64)


def rss(sizes: list[int], verify: bool) -> None:
    for n in sizes:
        ds = ensure_dataset(DataSpec(n, *IMAGE))
        work = Path(tempfile.mkdtemp(prefix=f"memprobe-{n}-"))
        sandbox = Sandbox(work / "server")
        sandbox.start()
        try:
            with FirstImportRelay("127.0.0.1", sandbox.port) as relay:
                cmd = [sys.executable, "-m", "xnatio", "upload-dicom", "BENCH", "S01"]
                cmd += [f"E{n}", str(ds.path), "--server", relay.url, "--user", "admin"]
                cmd += ["--json", "-q", "--num-batches", "42", "--upload-workers", "42"]
                if not verify:
                    cmd.append("--no-verify")
                (work / "home").mkdir()
                env = dict(os.environ, XNAT_PASSWORD=sandbox.password, HOME=str(work / "home"))
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
        finally:
            sandbox.stop()
            shutil.rmtree(work, ignore_errors=True)


def types(n: int) -> None:
    from xnatio.discover import discover
    from xnatio.models import file_path
    from xnatio.plan import plan_batches
    from xnatio.result import assemble_result

    ds = ensure_dataset(DataSpec(n, *IMAGE))
    discover(next(ds.path.iterdir()), workers=1)  # lazy imports first
    gc.collect()
    tracemalloc.start(1)
    manifest = discover(ds.path)
    after_discover = tracemalloc.take_snapshot()
    batches = plan_batches(manifest, 42)
    outcomes = {file_path(f): None for b in batches for f in b.files}
    result = assemble_result(manifest, {}, transport="rest", duration=1.0, batches_total=42)
    _, peak = tracemalloc.get_traced_memory()
    held = tracemalloc.take_snapshot()
    print(f"{n} files: peak {peak / n:.0f} B/file; held after result:")
    for stat in held.statistics("lineno")[:14]:
        frame = stat.traceback[0]
        print(f"  {stat.size / n:7.0f} B/file  {Path(frame.filename).name}:{frame.lineno}")
    print("after discovery:")
    for stat in after_discover.statistics("lineno")[:8]:
        frame = stat.traceback[0]
        print(f"  {stat.size / n:7.0f} B/file  {Path(frame.filename).name}:{frame.lineno}")
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    print("objects per file (gc-tracked):", {k: round(v / n, 2) for k, v in counts.most_common(8)})
    del outcomes, result, batches, manifest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("rss", "types"))
    p.add_argument("sizes")
    p.add_argument("--no-verify", action="store_true")
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.what == "rss":
        rss(sizes, not a.no_verify)
    else:
        types(sizes[0])


if __name__ == "__main__":
    main()
