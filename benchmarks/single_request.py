"""One request or parallel batches, by file count (issue 16 item 5).

``python benchmarks/single_request.py [--counts 100,200,...] [--knobs PER_FILE_MS:LATENCY_MS ...]``

For each knob setting one sandbox is started (``xio sandbox``, its own process); each subset of
the first N files of a small-file session (64x64 MR, generated once and cached like the harness's
data) is sent twice through the library (``resumable_rest_upload``, no read-back, each to its own
session label): as one request (a planner with no threshold) and as ``--batches`` parallel batches
with as many workers. One JSON line per (knobs, N) with both wall times in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.data import DataSpec, cache_root, ensure_dataset
from benchmarks.servers import free_port
from xnatio.discover import discover
from xnatio.pipeline import ResumeOptions, resumable_rest_upload
from xnatio.plan import RestPlanner
from xnatio.retry import RetryPolicy
from xnatio.transports.rest import RestTarget
from xnatio.xnat.client import XnatClient

USER, PASSWORD, PROJECT = "admin", "bench-password", "P"
ONE_REQUEST = RestPlanner(single_max_files=2**62, single_max_bytes=2**62)
ALWAYS_BATCHES = RestPlanner(single_max_files=0, single_max_bytes=0)


def subset(source: Path, n: int) -> Path:
    """The first ``n`` files of ``source`` (sorted paths), hard-linked into a cached folder."""
    folder = cache_root() / "single-request" / f"{source.parent.name}-{n}"
    if folder.exists():
        return folder
    files = sorted(p for p in source.rglob("*") if p.is_file())[:n]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in files:
        q = tmp / p.relative_to(source)
        q.parent.mkdir(parents=True, exist_ok=True)
        os.link(p, q)
    tmp.rename(folder)
    return folder


def start_sandbox(
    work: Path, per_file_ms: float, latency_ms: float
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "xnatio", "sandbox", "--data-dir", str(work / "data"),
        "--port", str(port), "--user", USER, "--password", PASSWORD, "--project", PROJECT,
        "--per-file-ms", str(per_file_ms), "--latency-ms", str(latency_ms),
        "--idle-seconds", "3600",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(url + "/_sandbox/stats", timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("the sandbox did not start")


def send(url: str, root: Path, label: str, planner: RestPlanner, batches: int) -> float:
    manifest = discover(root)
    target = RestTarget(
        project=PROJECT,
        subject="S",
        session=label,
        num_batches=batches,
        upload_workers=batches,
        archive_workers=5,
        overwrite="none",
    )
    retry = RetryPolicy(retries=3, base=0.5, cap=2.0)
    with (
        tempfile.TemporaryDirectory() as journal,
        XnatClient(url, username=USER, password=PASSWORD, retry=retry, timeout=3600) as client,
    ):
        start = time.perf_counter()
        result = resumable_rest_upload(
            client,
            manifest,
            target,
            options=ResumeOptions(journal=Path(journal) / "j.sqlite", verify=False),
            retry=retry,
            planner=planner,
        )
        elapsed = time.perf_counter() - start
    if not result.success:
        raise RuntimeError(f"{label}: {result.errors}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="100,200,500,1000,2000")
    parser.add_argument("--knobs", nargs="*", default=["0:0", "2:0", "20:0", "0:50", "20:50"])
    parser.add_argument("--batches", type=int, default=42)
    args = parser.parse_args()
    counts = [int(x) for x in args.counts.split(",")]
    source = ensure_dataset(DataSpec(max(counts), 64, 64)).path
    for knob in args.knobs:
        per_file, latency = (float(x) for x in knob.split(":"))
        with tempfile.TemporaryDirectory(prefix="xnatio-single-") as work:
            proc, url = start_sandbox(Path(work), per_file, latency)
            try:
                for n in counts:
                    root = subset(source, n)
                    row: dict[str, float] = {"per_file_ms": per_file, "latency_ms": latency}
                    row["files"] = n
                    for mode, planner in (("single", ONE_REQUEST), ("batches", ALWAYS_BATCHES)):
                        label = f"E{per_file:g}_{latency:g}_{n}_{mode}".replace(".", "_")
                        row[mode] = round(send(url, root, label, planner, args.batches), 2)
                    print(json.dumps(row), flush=True)
            finally:
                proc.terminate()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
