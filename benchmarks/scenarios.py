"""Scenarios, their cases (one dataset and receiver each), and the loop that runs them.

Within a case every contender runs in the same harness run, alternating, each on a freshly
started receiver, so slow drifts of a shared machine fall on all of them alike; each repetition
starts one place further on (A B C, B C A, C A B ...), so every contender takes every place in
the order in turn, the first of a case included. (With a fixed order, the first contender of
every repetition was the slower one: in the 21:18 UTC proof run xio took 15.67 and 14.56 s on
loopback against ``--compress never``'s 14.01 and 13.11 s with the same tar sent; in three more
repetitions the first run was 15.28 s, the later ones 12.7-14.3 s for both. With the order turned
round every other repetition, A B C, C B A, the middle one never ran first or last, and xio, at
the ends, was the slower one again: docs/performance.md, "srvcpu" and "turns".)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import contenders as c
from benchmarks.data import (
    Dataset,
    DataSpec,
    ManySpec,
    cache_root,
    ensure_dataset,
    ensure_dcm_view,
    ensure_many,
    ensure_tar,
    warm_cache,
)
from benchmarks.link import Link, link_unavailable
from benchmarks.measure import MB, median, run_measured
from benchmarks.relay import FirstImportRelay
from benchmarks.servers import Sandbox, StoreSCP

# rest-wan's and rest-slow's server costs; docs/performance.md says why these values. Their link
# rate is not a server knob: the kernel shapes a real link (benchmarks/link.py), so every
# contender meets the same TCP bottleneck.
WAN_KNOBS: dict[str, float] = {"latency_ms": 50.0, "per_file_ms": 2.0}
WAN_LINK_MBIT = 400.0
SLOW_LINK_MBIT = 100.0
# rest-latency: the same distant, busy server on a link fast enough not to be the limit, which is
# how issue 3 states its goal against xnatctl ("added latency per request and per file").
LATENCY_KNOBS: dict[str, float] = {"latency_ms": 50.0, "per_file_ms": 2.0}

REST_WORKERS = 42  # xio's default --num-batches / --upload-workers
# Issue 16 item 4: peak RSS of an upload of 100,000 files below 120 MB (asserted from this many
# files up), and planning 1,000,000 files in 1,000 studies (upload-many) below 200 MB.
SCALE_RSS_FILES = 100_000
SCALE_RSS_MB = 120.0
MANY_PLAN_RSS_MB = 200.0
CSTORE_ASSOCIATIONS = 45  # xio's default --num-batches for --transport dicom-store

# 288 x 288 x 2 bytes + header: 167 KB a file, so 15,000 files are the 2.5 GB of the issue.
FULL_IMAGE = (288, 288)
SMALL_IMAGE = (64, 64)


@dataclass
class Case:
    scenario: str
    name: str
    data: DataSpec
    receiver: str  # "sandbox", "storescp" or "none"
    contenders: list[c.Contender]
    repeat: int
    baseline: str | None = None
    knobs: dict[str, float] = field(default_factory=dict)
    link_mbit: float = 0.0  # > 0: the receiver sits behind a shaped link of this rate
    needs_tar: bool = False
    moves_bytes: bool = True  # False for discovery: it reads headers only, MB/s means nothing
    auth_sandbox: bool = False
    timeout: float = 900.0
    # The memory bound of issue 16 item 4 (0: none): a run whose client peak RSS is above it
    # fails, with the measurement in its error.
    max_rss_mb: float = 0.0
    # A many-study tree (upload-many) instead of one session of ``data``.
    many: ManySpec | None = None
    # Note when the first import request leaves the client (benchmarks/relay.py).
    time_first_import: bool = False


@dataclass
class Sizes:
    rest_files: int = 15_000
    # 100 Mbit/s moves 12 MB/s: a third of the REST session keeps each run near a minute.
    slow_files: int = 5_000
    cstore_files: int = 2_000
    discover_files: tuple[int, ...] = (15_000, 50_000)
    # 10,000 and 100,000: issue 16's RSS growth goal (benchmarks.report.SCALE_GROWTH_FROM).
    scale_files: tuple[int, ...] = (2_000, 10_000, 15_000, 50_000, 100_000)
    # upload-many --dry-run over (studies, files per study): issue 12's million files.
    scale_many: tuple[int, int] = (1_000, 1_000)
    image: tuple[int, int] = FULL_IMAGE
    scale_image: tuple[int, int] = SMALL_IMAGE


TINY = Sizes(
    rest_files=60,
    slow_files=60,
    cstore_files=10,
    discover_files=(300,),
    scale_files=(60, 180),
    scale_many=(3, 20),
    image=SMALL_IMAGE,
    scale_image=SMALL_IMAGE,
)

SCENARIOS = (
    "rest-limit",
    "rest-wan",
    "rest-slow",
    "rest-latency",
    "cstore",
    "discover",
    "scale",
)
# Every REST scenario at least twice, as issue 16 asks of the run that proves its goals, so a plain
# `python benchmarks/run.py` is that run (docs/performance.md gives its time: about half an hour on
# 2 cores); rest-limit, whose runs are short, three times, so each of its three contenders runs
# once in each place of the order. cstore's single-association references take about 2 minutes
# each, so once; discovery is cheap, so three times. --repeat N runs every contender of every
# scenario N times, each repetition starting one place further on.
DEFAULT_REPEAT = {
    "rest-limit": 3,
    "rest-wan": 2,
    "rest-slow": 2,
    "rest-latency": 2,
    "cstore": 1,
    "discover": 3,
    "scale": 1,
}


def build_cases(names: list[str], sizes: Sizes, repeat: int | None) -> list[Case]:
    def reps(scenario: str) -> int:
        return repeat if repeat is not None else DEFAULT_REPEAT[scenario]

    rest = DataSpec(sizes.rest_files, *sizes.image)
    cases: list[Case] = []
    for name in names:
        if name == "rest-limit":
            cases.append(
                Case(
                    "rest-limit",
                    f"rest-limit {rest.files} files",
                    rest,
                    "sandbox",
                    [
                        c.xio_rest(REST_WORKERS),
                        c.xio_rest_uncompressed(REST_WORKERS),
                        c.curl_single_tar(),
                    ],
                    reps(name),
                    baseline="curl",
                    needs_tar=True,
                )
            )
        elif name == "rest-wan":
            cases.append(
                Case(
                    "rest-wan",
                    f"rest-wan {rest.files} files",
                    rest,
                    "sandbox",
                    [
                        c.xio_rest(REST_WORKERS),
                        c.xio_rest_uncompressed(REST_WORKERS),
                        c.xio_rest_no_verify(REST_WORKERS),
                        c.xnatctl_rest(REST_WORKERS),
                        c.xio_sequential(),
                    ],
                    reps(name),
                    baseline="xnatctl",
                    knobs=dict(WAN_KNOBS),
                    link_mbit=WAN_LINK_MBIT,
                )
            )
        elif name == "rest-slow":
            slow = DataSpec(sizes.slow_files, *sizes.image)
            cases.append(
                Case(
                    "rest-slow",
                    f"rest-slow {slow.files} files",
                    slow,
                    "sandbox",
                    [
                        c.xio_rest(REST_WORKERS),
                        c.xio_rest_uncompressed(REST_WORKERS),
                        c.xio_rest_no_verify(REST_WORKERS),
                        c.xnatctl_rest(REST_WORKERS),
                    ],
                    reps(name),
                    baseline="xnatctl",
                    knobs=dict(WAN_KNOBS),
                    link_mbit=SLOW_LINK_MBIT,
                )
            )
        elif name == "rest-latency":
            cases.append(
                Case(
                    "rest-latency",
                    f"rest-latency {rest.files} files",
                    rest,
                    "sandbox",
                    [c.xio_rest_no_verify(REST_WORKERS), c.xnatctl_rest(REST_WORKERS)],
                    reps(name),
                    baseline="xnatctl",
                    knobs=dict(LATENCY_KNOBS),
                )
            )
        elif name == "cstore":
            spec = DataSpec(sizes.cstore_files, *sizes.image)
            cases.append(
                Case(
                    "cstore",
                    f"cstore {spec.files} files",
                    spec,
                    "storescp",
                    [
                        c.xio_cstore(CSTORE_ASSOCIATIONS),
                        c.dcmtk_storescu(),
                        c.pynetdicom_storescu(),
                        c.pynetdicom_parallel(CSTORE_ASSOCIATIONS),
                        c.xnatctl_cstore(CSTORE_ASSOCIATIONS),
                    ],
                    reps(name),
                    baseline="dcmtk-storescu",
                    auth_sandbox=True,
                )
            )
        elif name == "discover":
            for n in sizes.discover_files:
                # The 15,000-file case reuses the REST session; larger ones the scale sessions.
                image = sizes.image if n == sizes.rest_files else sizes.scale_image
                cases.append(
                    Case(
                        "discover",
                        f"discover {n} files",
                        DataSpec(n, *image),
                        "none",
                        [c.discover_api(), c.xio_dry_run()],
                        reps(name),
                        moves_bytes=False,
                    )
                )
        elif name == "scale":
            for n in sizes.scale_files:
                cases.append(
                    Case(
                        "scale",
                        f"scale {n} files",
                        DataSpec(n, *sizes.scale_image),
                        "sandbox",
                        [c.xio_rest(REST_WORKERS), c.xio_rest_no_verify(REST_WORKERS)],
                        reps(name),
                        max_rss_mb=SCALE_RSS_MB if n >= SCALE_RSS_FILES else 0.0,
                        time_first_import=True,
                        timeout=3600.0,
                    )
                )
            many = ManySpec(*sizes.scale_many)
            cases.append(
                Case(
                    "scale",
                    f"scale upload-many --dry-run {many.files} files in {many.studies} studies",
                    DataSpec(many.files, 8, 8, modality="MANY"),
                    "none",
                    [c.xio_many_dry_run()],
                    reps(name),
                    moves_bytes=False,
                    max_rss_mb=MANY_PLAN_RSS_MB,
                    many=many,
                    timeout=3600.0,
                )
            )
        else:
            raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return cases


@dataclass
class RunRecord:
    rep: int
    ok: bool
    error: str
    wall_s: float
    metric_s: float  # what throughput is computed from: wall time, or in-process time
    files_per_s: float | None
    mb_per_s: float | None
    peak_rss_mb: float
    peak_tmp_mb: float
    cpu_s: float
    server: dict[str, float]
    details: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass
class ContenderResult:
    name: str
    summary: str
    runs: list[RunRecord] = field(default_factory=list)
    unavailable: str = ""

    @property
    def ok_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if r.ok]

    @property
    def ok(self) -> bool:
        return not self.unavailable and bool(self.runs) and all(r.ok for r in self.runs)

    @property
    def measured_runs(self) -> list[RunRecord]:
        """Runs that did their work, including those failed only for being over a memory bound
        (their RSS and first request are measured; the goals judge them, not skip them)."""
        return [r for r in self.runs if r.ok or r.details.get("over_rss_bound")]

    @property
    def errors(self) -> list[str]:
        if self.unavailable:
            return [self.unavailable]
        return [f"run {r.rep + 1}: {r.error}" for r in self.runs if not r.ok]

    def med(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.ok_runs if getattr(r, attr) is not None]
        return median(values)

    def to_json(self) -> dict[str, Any]:
        keys = (
            "metric_s",
            "wall_s",
            "files_per_s",
            "mb_per_s",
            "peak_rss_mb",
            "peak_tmp_mb",
            "cpu_s",
        )
        medians = {k: self.med(k) for k in keys}
        return {
            "summary": self.summary,
            "ok": self.ok,
            "ok_runs": len(self.ok_runs),
            "runs_attempted": len(self.runs),
            "errors": self.errors,
            "median": {k: (round(v, 3) if v is not None else None) for k, v in medians.items()},
            "runs": [r.to_json() for r in self.runs],
        }


@dataclass
class CaseResult:
    case: Case
    dataset: Dataset
    results: dict[str, ContenderResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.case.scenario,
            "case": self.case.name,
            "dataset": self.dataset.to_json(),
            "receiver": self.case.receiver,
            "knobs": self.case.knobs,
            "repeat": self.case.repeat,
            "baseline": self.case.baseline,
            "contenders": {name: r.to_json() for name, r in self.results.items()},
        }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


class Runner:
    def __init__(
        self,
        *,
        log: Callable[[str], None] = print,
        keep: bool = False,
        only: set[str] | None = None,
    ) -> None:
        self.log = log
        self.keep = keep
        self.only = only
        self.work_root = cache_root() / "work"
        self._prepared: dict[str, str] = {}  # contender prepare function name -> error

    def _prepare(self, contender: c.Contender) -> str:
        key = getattr(contender.prepare, "__name__", contender.name)
        if key not in self._prepared:
            try:
                contender.prepare()
                self._prepared[key] = ""
            except c.Unavailable as exc:
                self._prepared[key] = str(exc)
        return self._prepared[key]

    def prepare_case(self, case: Case) -> tuple[Dataset, Path | None, Path | None]:
        """The case's cached data (session, tar, .dcm view) and its selected contenders' tools."""
        chosen = self.selected(case)
        if case.many is not None:
            return ensure_many(case.many, self.log), None, None
        dataset = ensure_dataset(case.data, self.log)
        tar = ensure_tar(dataset, self.log) if case.needs_tar else None
        dcm_view = ensure_dcm_view(dataset) if any(x.name == "xnatctl" for x in chosen) else None
        for x in chosen:
            self._prepare(x)
        return dataset, tar, dcm_view

    def selected(self, case: Case) -> list[c.Contender]:
        return [x for x in case.contenders if self.only is None or x.name in self.only]

    def run_case(self, case: Case) -> CaseResult:
        self.log(f"== {case.name} (repeat {case.repeat})")
        dataset, tar, dcm_view = self.prepare_case(case)
        warmed = warm_cache(dataset)
        self.log(
            f"   {dataset.files} files, {dataset.bytes / MB:.0f} MB; page cache warmed "
            f"in {warmed:.1f} s"
        )
        contenders = self.selected(case)
        results = {x.name: ContenderResult(x.name, x.summary) for x in contenders}
        for x in contenders:
            results[x.name].unavailable = self._prepare(x)
            if results[x.name].unavailable:
                self.log(f"   {x.name}: cannot run: {results[x.name].unavailable}")
        runnable = [x for x in contenders if not results[x.name].unavailable]
        for rep in range(case.repeat):
            turn = rep % len(runnable) if runnable else 0
            for x in runnable[turn:] + runnable[:turn]:
                record = self._run_one(case, x, rep, dataset, tar, dcm_view)
                results[x.name].runs.append(record)
                self.log(f"   run {rep + 1} {x.name}: {_line(record)}")
        return CaseResult(case, dataset, results)

    def _run_one(
        self,
        case: Case,
        x: c.Contender,
        rep: int,
        dataset: Dataset,
        tar: Path | None,
        dcm_view: Path | None,
    ) -> RunRecord:
        workdir = self.work_root / _slug(f"{case.name}-{x.name}-{rep + 1}")
        shutil.rmtree(workdir, ignore_errors=True)
        ctx = c.RunContext(
            dataset=dataset,
            workdir=workdir,
            project="BENCH",
            subject="BENCH01",
            label=_slug(f"{x.name}_r{rep + 1}"),
            workers=REST_WORKERS,
            tar=tar,
            dcm_view=dcm_view,
        )
        ctx.tmp.mkdir(parents=True)
        ctx.home.mkdir(parents=True)
        server_peaks: dict[str, float] = {}
        link: Link | None = None
        first_import_s: float | None = None
        try:
            try:
                if case.link_mbit > 0:
                    why = link_unavailable()
                    if why:
                        raise c.Unavailable(why)
                    link = Link(case.link_mbit).__enter__()
                self._start_receivers(case, ctx, link)
                inv = x.build(ctx)
            except (c.Unavailable, RuntimeError) as exc:
                return _failed(rep, str(exc))
            env = _client_env(ctx, inv.env)
            relay = None
            if case.time_first_import and ctx.sandbox is not None:
                # The client talks to the sandbox through the relay, which notes the first
                # import request; every byte is forwarded unchanged.
                relay = FirstImportRelay(ctx.sandbox.host, ctx.sandbox.port).__enter__()
                inv.cmd = [relay.url if a == ctx.sandbox.url else a for a in inv.cmd]
            if ctx.sandbox is not None:
                ctx.sandbox.client_started()  # the server's CPU counts from here (servers.py)
            launched = time.perf_counter()
            measured = run_measured(
                inv.cmd,
                env=env,
                cwd=workdir,
                watch={"client_tmp": ctx.tmp, "client_home": ctx.home},
                log_dir=workdir / "client-log",
                timeout=case.timeout,
                stdin_text=inv.stdin_text,
            )
            if ctx.sandbox is not None:
                ctx.sandbox.client_exited()  # ... to here; what follows is reported apart
            if relay is not None:
                relay.close()
                if relay.first_import_at is not None:
                    first_import_s = relay.first_import_at - launched
            checked = x.check(ctx, measured)
            if checked.ok and case.max_rss_mb and measured.peak_rss_mb > case.max_rss_mb:
                checked.ok = False
                checked.details["over_rss_bound"] = True  # landed everything: a measured miss
                checked.error = (
                    f"peak RSS {measured.peak_rss_mb:.1f} MB is over the bound of "
                    f"{case.max_rss_mb:.0f} MB (issue 16 item 4)"
                )
        finally:
            # Ctrl-C or SIGTERM during the clean-up waits until it is done (then interrupts), so
            # an interrupted run leaves no receiver, link or work directory behind.
            with _signals_held():
                if ctx.sandbox is not None:
                    server_peaks = ctx.sandbox.stop()
                if ctx.auth_sandbox is not None:
                    ctx.auth_sandbox.stop()
                if ctx.scp is not None:
                    server_peaks = ctx.scp.stop()
                if link is not None:
                    link.close()
                if not self.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
        metric = checked.inner_s if checked.inner_s is not None else measured.wall_s
        ok = checked.ok
        return RunRecord(
            rep=rep,
            ok=ok,
            error=checked.error,
            wall_s=measured.wall_s,
            metric_s=metric,
            files_per_s=dataset.files / metric if ok and metric > 0 else None,
            mb_per_s=dataset.bytes / MB / metric
            if ok and metric > 0 and case.moves_bytes
            else None,
            peak_rss_mb=measured.peak_rss_mb,
            peak_tmp_mb=measured.peak_tmp_mb["client_tmp"],
            cpu_s=measured.cpu_s,
            server=server_peaks,
            details={
                "landed": checked.landed,
                # State kept under HOME (xio's resume journal, xnatctl's session cache).
                "home_mb": round(measured.peak_tmp_mb["client_home"], 3),
                # Seconds from launch to the first import request (issue 16 item 4: <= 3 s).
                **({"first_import_s": round(first_import_s, 3)} if first_import_s else {}),
                **checked.details,
            },
        )

    def _start_receivers(self, case: Case, ctx: c.RunContext, link: Link | None) -> None:
        if case.receiver == "sandbox":
            ctx.sandbox = Sandbox(ctx.workdir / "server", knobs=dict(case.knobs), link=link)
            ctx.sandbox.start()
        elif case.receiver == "storescp":
            ctx.scp = StoreSCP(ctx.workdir / "scp")
            ctx.scp.start()
            if case.auth_sandbox:
                ctx.auth_sandbox = Sandbox(ctx.workdir / "auth-server")
                ctx.auth_sandbox.start()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive during the block take effect when it ends.

    Python runs signal handlers in the main thread whichever thread the kernel delivered the
    signal to, so handlers that only take note hold the signal in any case (a signal mask would
    only hold it for the thread that set it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, hold) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: not set from Python, nothing to restore
                signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])  # now as it would have been: usually KeyboardInterrupt


def _client_env(ctx: c.RunContext, extra: dict[str, str]) -> dict[str, str]:
    # No XNAT_* settings of the person running the harness leak into a contender.
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAT")}
    env.update(TMPDIR=str(ctx.tmp), HOME=str(ctx.home), NO_COLOR="1", TERM="dumb")
    env.update(extra)
    return env


def _failed(rep: int, error: str) -> RunRecord:
    return RunRecord(rep, False, error, 0.0, 0.0, None, None, 0.0, 0.0, 0.0, {}, {})


def _line(r: RunRecord) -> str:
    if not r.ok:
        return f"FAILED: {r.error}"
    mb = "" if r.mb_per_s is None else f"{r.mb_per_s:.1f} MB/s, "
    return (
        f"{r.metric_s:.2f} s, {r.files_per_s or 0:,.0f} files/s, {mb}"
        f"RSS {r.peak_rss_mb:.0f} MB, tmp {r.peak_tmp_mb:.1f} MB, CPU {r.cpu_s:.1f} s"
        + (f" (server {r.server['server_cpu_s']:.1f} s)" if "server_cpu_s" in r.server else "")
        + (
            f", first import at {r.details['first_import_s']:.2f} s"
            if "first_import_s" in r.details
            else ""
        )
    )
