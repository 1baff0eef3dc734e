"""Tables of medians with ratios, the goals of the REST and C-STORE issues, and the JSON record."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import median
from benchmarks.scenarios import CaseResult, ContenderResult


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_gb = 0.0
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
            mem_gb = kb / 1024 / 1024
    except (OSError, StopIteration):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tools": _tool_versions(),
        "xnatio": _code_under_test(),
    }


def _code_under_test() -> dict[str, str]:
    """Which xnatio was measured: its version, where it was imported from, and the git revision
    of this checkout (or ``$XNATIO_BENCH_REVISION`` for an exported tree)."""
    import xnatio

    root = Path(__file__).resolve().parent.parent
    revision = os.environ.get("XNATIO_BENCH_REVISION", "")
    if not revision:
        try:
            head = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "src"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            revision = head.stdout.strip() + (" + uncommitted changes" if dirty.stdout else "")
        except (OSError, subprocess.TimeoutExpired):
            revision = "unknown"
    return {
        "version": getattr(xnatio, "__version__", "?"),
        "imported_from": str(Path(xnatio.__file__).parent),
        "revision": revision or "unknown",
    }


def _tool_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    probes = {
        "curl": ["curl", "--version"],
        "dcmtk storescu": ["/usr/bin/storescu", "--version"],
    }
    for name, cmd in probes.items():
        if shutil.which(cmd[0]) is None:
            out[name] = "missing"
            continue
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            first = (done.stdout or done.stderr).strip().splitlines()
            out[name] = first[0] if first else "?"
        except (OSError, subprocess.TimeoutExpired):
            out[name] = "?"
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def case_table(cr: CaseResult) -> str:
    """A Markdown table of one case: medians over the runs that succeeded, ratio to baseline."""
    base = cr.results.get(cr.case.baseline or "")
    base_t = base.med("metric_s") if base is not None and base.ok else None
    knobs = ", ".join(f"{k}={v:g}" for k, v in cr.case.knobs.items()) or "none"
    link = f"; link: {cr.case.link_mbit:g} Mbit/s (veth + tbf)" if cr.case.link_mbit > 0 else ""
    head = (
        f"### {cr.case.name}\n\n"
        f"{cr.dataset.files:,} files, {cr.dataset.bytes / 1e6:,.0f} MB "
        f"({cr.dataset.to_json()['image']}); receiver: {cr.case.receiver}; server knobs: {knobs}"
        f"{link}; {cr.case.repeat} run(s) each, alternating.\n\n"
    )
    ratio_head = f"speed vs {cr.case.baseline}" if cr.case.baseline else "—"
    lines = [
        f"| contender | ok runs | time s | files/s | MB/s | peak RSS MB | peak tmp MB | "
        f"CPU s client / server | server tmp MB | {ratio_head} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cr.results.values():
        t = r.med("metric_s")
        ratio = f"{base_t / t:.2f}×" if base_t and t else "—"
        server_tmp = [run.server.get("server_tmp_mb", 0.0) for run in r.ok_runs]
        server_cpu = median([run.server["server_cpu_s"] for run in r.ok_runs if run.server])
        cpu = f"{_fmt(r.med('cpu_s'), '.1f')} / {_fmt(server_cpu, '.1f')}"
        lines.append(
            f"| {r.name} | {len(r.ok_runs)}/{len(r.runs) or '—'} | {_fmt(t, '.2f')} | "
            f"{_fmt(r.med('files_per_s'), ',.0f')} | {_fmt(r.med('mb_per_s'), '.1f')} | "
            f"{_fmt(r.med('peak_rss_mb'), '.0f')} | {_fmt(r.med('peak_tmp_mb'), '.1f')} | {cpu} | "
            f"{_fmt(max(server_tmp) if server_tmp else None, '.1f')} | {ratio} |"
        )
    notes = [
        f"- **{r.name} failed**: {'; '.join(r.errors)}" for r in cr.results.values() if r.errors
    ]
    for r in cr.results.values():
        own = median([x.details.get("xio_duration_s", 0.0) for x in r.measured_runs if x.details])
        t = r.med("metric_s")
        if own and t:
            notes.append(
                f"- {r.name}: its own `duration_s` (sending and commit) is {own:.2f} s of the "
                f"{t:.2f} s; the rest is start-up, discovery and (REST, unless --no-verify) "
                "the read-back verification"
            )
    return head + "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


@dataclass
class Goal:
    text: str
    measured: str
    met: bool | None  # None: not measured in this run
    # The goal's scenario when it was not part of this run: the table sums those goals up in one
    # line instead of a row each.
    not_run: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"goal": self.text, "measured": self.measured, "met": self.met}


def _find(
    results: list[CaseResult], scenario: str, contender: str
) -> list[tuple[CaseResult, ContenderResult]]:
    return [
        (cr, cr.results[contender])
        for cr in results
        if cr.case.scenario == scenario and contender in cr.results
    ]


def _t(r: ContenderResult) -> float | None:
    return r.med("metric_s") if r.ok else None


def _not_run(text: str, scenario: str) -> Goal:
    return Goal(text, f"not measured: {scenario} not in this run", None, not_run=scenario)


@dataclass(frozen=True)
class RatioGoal:
    """A goal on the median times of two contenders of one scenario, ``a`` (xio) and ``b``.

    ``faster``: ``b / a`` must reach ``ratio`` (``strict``: exceed it); otherwise ``a`` must be
    within ``ratio`` of ``b`` (``a / b <= ratio``). ``names``: how the measured line calls them.
    """

    scenario: str
    a: str
    b: str
    text: str
    ratio: float
    faster: bool = True
    strict: bool = False
    names: tuple[str, str] = ("", "")

    def measure(self, ta: float, tb: float) -> tuple[str, bool]:
        name_a, name_b = self.names[0] or self.a, self.names[1] or self.b
        if self.faster:
            r = tb / ta
            met = r > self.ratio if self.strict else r >= self.ratio
            return f"{name_b} {tb:.2f} s / {name_a} {ta:.2f} s = {r:.2f}×", met
        r = ta / tb
        return f"{name_a} {ta:.2f} s / {name_b} {tb:.2f} s = {r:.2f}×", r <= self.ratio


NEVER = "xio --compress never"
RATIO_GOALS = (
    RatioGoal("rest-limit", "xio", "curl", "REST within 1.25× of the curl limit", 1.25, False),
    RatioGoal("rest-wan", "xio", "xnatctl", "≥ 1.5× faster than xnatctl under rest-wan", 1.5),
    RatioGoal(
        "rest-wan",
        "xio --no-verify",
        "xnatctl",
        "≥ 1.5× faster than xnatctl under rest-wan, neither reading back",
        1.5,
    ),
    RatioGoal(
        "rest-wan",
        "xio",
        "xnatctl",
        "(issue 16) ≥ 2× faster than xnatctl under rest-wan (400 Mbit/s link)",
        2.0,
    ),
    RatioGoal(
        "rest-slow",
        "xio",
        "xnatctl",
        "(issue 16) ≥ 2.5× faster than xnatctl at 100 Mbit/s (rest-slow)",
        2.5,
    ),
    RatioGoal(
        "rest-wan",
        "xio",
        NEVER,
        "(issue 16) ≥ 1.8× faster than xio --compress never under rest-wan",
        1.8,
        names=("xio", "never"),
    ),
    RatioGoal(
        "rest-slow",
        "xio",
        NEVER,
        "(issue 16, for reference) faster than xio --compress never at 100 Mbit/s",
        1.0,
        strict=True,
        names=("xio", "never"),
    ),
    RatioGoal(
        "rest-limit",
        "xio",
        NEVER,
        "(issue 16) on loopback --compress auto within 5 % of never",
        1.05,
        False,
        names=("auto", "never"),
    ),
    # Issue 16 item 6: "Verification must not make xio slower than xnatctl, which checks
    # nothing": xio as installed (reading back) against xnatctl, wherever both run.
    RatioGoal(
        "rest-wan",
        "xio",
        "xnatctl",
        "(issue 16) xio with its read-back not slower than xnatctl (which checks nothing) "
        "under rest-wan",
        1.0,
        False,
    ),
    RatioGoal(
        "rest-slow",
        "xio",
        "xnatctl",
        "(issue 16) xio with its read-back not slower than xnatctl (which checks nothing) "
        "at 100 Mbit/s (rest-slow)",
        1.0,
        False,
    ),
    RatioGoal(
        "rest-latency",
        "xio --no-verify",
        "xnatctl",
        "≥ 1.5× faster than xnatctl with added latency per request and per file",
        1.5,
    ),
    RatioGoal(
        "rest-wan",
        "xio --no-verify",
        "sequential",
        "(for reference) faster than sequential upload under rest-wan, neither reading back",
        1.0,
        strict=True,
    ),
    RatioGoal(
        "cstore",
        "xio",
        "dcmtk-storescu",
        "C-STORE ≥ 5× dcmtk storescu (files/s)",
        5.0,
        names=("xio", "storescu"),
    ),
    RatioGoal(
        "cstore",
        "xio",
        "pynetdicom-storescu",
        "C-STORE ahead of pynetdicom's storescu",
        1.0,
        strict=True,
        names=("xio", "pynetdicom"),
    ),
)


def _ratio_goals(results: list[CaseResult], goal: RatioGoal) -> list[Goal]:
    out: list[Goal] = []
    for cr in results:
        if cr.case.scenario != goal.scenario:
            continue
        text = f"{goal.text} ({cr.case.name})"
        absent = [name for name in (goal.a, goal.b) if name not in cr.results]
        if absent:
            out.append(Goal(text, f"not measured: {', '.join(absent)} not run", None))
            continue
        ra, rb = cr.results[goal.a], cr.results[goal.b]
        ta, tb = _t(ra), _t(rb)
        if ta is None or tb is None:
            failed = ", ".join(x.name for x in (ra, rb) if not x.ok)
            out.append(Goal(text, f"not measured: {failed} failed", None))
        else:
            measured, met = goal.measure(ta, tb)
            out.append(Goal(text, measured, met))
    return out or [_not_run(goal.text, goal.scenario)]


@dataclass(frozen=True)
class ServerGoal:
    """A bound on the receiving server's CPU time (issue 16 item 2), per contender of a case:
    as a share of the client's wall time (``per="wall"``) or per GB of the session (``"GB"``)."""

    scenario: str
    text: str
    limit: float
    per: str  # "wall" or "GB"

    def goals(self, results: list[CaseResult]) -> list[Goal]:
        out: list[Goal] = []
        for cr in results:
            if cr.case.scenario != self.scenario:
                continue
            parts: list[str] = []
            verdicts: list[bool] = []
            for r in cr.results.values():
                runs = [x for x in r.measured_runs if "server_cpu_s" in x.server and x.wall_s > 0]
                if not runs:
                    parts.append(f"{r.name}: not measured")
                    continue
                cpu = median([x.server["server_cpu_s"] for x in runs]) or 0.0
                if self.per == "wall":
                    share = median([x.server["server_cpu_s"] / x.wall_s for x in runs]) or 0.0
                    wall = median([x.wall_s for x in runs]) or 0.0
                    # The window is the client's run (launch to exit, servers.Sandbox); what the
                    # server did after the client exited is shown beside it, not counted.
                    after = median([x.server.get("server_cpu_after_s", 0.0) for x in runs])
                    tail = f" (+{after:.1f} s after the client exited)" if after else ""
                    parts.append(f"{r.name}: {cpu:.1f} s of {wall:.1f} s = {share:.0%}{tail}")
                    verdicts.append(share < self.limit)
                else:
                    per_gb = cpu / (cr.dataset.bytes / 1e9)
                    parts.append(f"{r.name}: {cpu:.1f} s = {per_gb:.1f} s/GB")
                    verdicts.append(per_gb <= self.limit)
            text = f"{self.text} ({cr.case.name})"
            if not verdicts:
                out.append(Goal(text, "not measured: " + "; ".join(parts), None))
            else:
                # A contender without a measurement cannot make the goal met.
                complete = len(verdicts) == len(cr.results)
                met = all(verdicts) if complete or not all(verdicts) else None
                out.append(Goal(text, "; ".join(parts), met))
        return out or [_not_run(self.text, self.scenario)]


SERVER_GOALS = (
    ServerGoal(
        "rest-latency",
        "(issue 16) the server's CPU < 40 % of the wall time",
        0.40,
        "wall",
    ),
    ServerGoal(
        "rest-limit",
        "(issue 16) server CPU ≤ 5 s per GB of session without knobs",
        5.0,
        "GB",
    ),
    ServerGoal(
        "rest-latency",
        "(issue 16) server CPU ≤ 10 s per GB of session under the knobs",
        10.0,
        "GB",
    ),
)

# Issue 16 item 4, in the scale scenario (xio as installed, small files).
SCALE_RSS_AT = 100_000
SCALE_RSS_LIMIT_MB = 120.0
SCALE_GROWTH_FROM = 10_000
SCALE_GROWTH_LIMIT_MB = 20.0
PLAN_FILES = 1_000_000
PLAN_RSS_LIMIT_MB = 200.0
FIRST_REQUEST_LIMIT_S = 3.0
# The seconds from launch to the first import request, kept in a run's details by a contender
# that measures it (a relay between client and server sees the request leave).
FIRST_REQUEST_KEY = "first_import_s"


def _scale_goals(results: list[CaseResult]) -> list[Goal]:
    t_rss = f"(issue 16) peak RSS < {SCALE_RSS_LIMIT_MB:.0f} MB at {SCALE_RSS_AT:,} files (scale)"
    t_growth = (
        f"(issue 16) peak RSS grows < {SCALE_GROWTH_LIMIT_MB:.0f} MB from {SCALE_GROWTH_FROM:,} "
        f"to {SCALE_RSS_AT:,} files (scale)"
    )
    t_plan = (
        f"(issue 16) < {PLAN_RSS_LIMIT_MB:.0f} MB at {PLAN_FILES:,} files (scale; issue 16 asks "
        "it of planning 1,000,000 files in 1,000 studies)"
    )
    t_first = (
        f"(issue 16) the first import request leaves within {FIRST_REQUEST_LIMIT_S:g} s of "
        "launch, at any size (scale)"
    )
    cases = [cr for cr in results if cr.case.scenario == "scale"]
    if not cases:
        return [_not_run(t, "scale") for t in (t_rss, t_growth, t_plan, t_first)]

    def rss(files: int) -> tuple[float | None, str]:
        """xio's median peak RSS in the scale case of ``files`` files, or why there is none."""
        for cr in cases:
            if cr.dataset.files == files and "xio" in cr.results:
                r = cr.results["xio"]
                value = median([x.peak_rss_mb for x in r.measured_runs])
                return value, "" if value is not None else "xio failed"
        return None, f"no {files:,}-file case in this run"

    out: list[Goal] = []
    at, why = rss(SCALE_RSS_AT)
    if at is None:
        out.append(Goal(t_rss, f"not measured: {why}", None))
    else:
        out.append(Goal(t_rss, f"{at:.0f} MB", at < SCALE_RSS_LIMIT_MB))
    base, why_base = rss(SCALE_GROWTH_FROM)
    if at is None or base is None:
        out.append(Goal(t_growth, f"not measured: {why or why_base}", None))
    else:
        out.append(
            Goal(
                t_growth,
                f"{base:.0f} → {at:.0f} MB = {at - base:+.0f} MB",
                at - base < SCALE_GROWTH_LIMIT_MB,
            )
        )
    plan = [(cr, r) for cr in cases if cr.dataset.files >= PLAN_FILES for r in cr.results.values()]
    if not plan:
        out.append(Goal(t_plan, f"not measured: no {PLAN_FILES:,}-file case in this run", None))
    for cr, r in plan:
        value = r.med("peak_rss_mb") if r.ok else None
        text = f"{t_plan}, {r.name} ({cr.case.name})"
        if value is None:
            out.append(Goal(text, f"not measured: {r.name} failed", None))
        else:
            out.append(Goal(text, f"{value:.0f} MB", value < PLAN_RSS_LIMIT_MB))
    firsts = [
        (cr.dataset.files, x.details[FIRST_REQUEST_KEY])
        for cr in cases
        for r in cr.results.values()
        for x in r.measured_runs
        if isinstance(x.details.get(FIRST_REQUEST_KEY), (int, float))
    ]
    if not firsts:
        out.append(Goal(t_first, "not measured: no run recorded its first request", None))
    else:
        worst_files, worst = max(firsts, key=lambda p: p[1])
        out.append(
            Goal(
                t_first,
                f"slowest {worst:.1f} s (at {worst_files:,} files; {len(firsts)} runs)",
                worst <= FIRST_REQUEST_LIMIT_S,
            )
        )
    return out


def goals(results: list[CaseResult]) -> list[Goal]:
    out = [g for goal in RATIO_GOALS for g in _ratio_goals(results, goal)]
    out += [g for goal in SERVER_GOALS for g in goal.goals(results)]
    out += _scale_goals(results)
    for cr, r in _find(results, "rest-limit", "xio"):
        rss, tmp = r.med("peak_rss_mb"), r.med("peak_tmp_mb")
        where = f"xio, {cr.dataset.files:,} files ({cr.case.name})"
        if not r.ok or rss is None or tmp is None:
            out.append(
                Goal(
                    f"RSS < 200 MB and temp disk < 100 MB, {where}",
                    "not measured: xio failed",
                    None,
                )
            )
        else:
            out.append(Goal(f"peak RSS < 200 MB, {where}", f"{rss:.0f} MB", rss < 200))
            out.append(Goal(f"temp disk < 100 MB, {where}", f"{tmp:.1f} MB", tmp < 100))
    for cr, r in _find(results, "discover", "discover+plan"):
        fps = r.med("files_per_s")
        text = f"discovery ≥ 5,000 files/s, warm cache ({cr.case.name})"
        if not r.ok or fps is None:
            out.append(Goal(text, "not measured: discover+plan failed", None))
        else:
            out.append(Goal(text, f"{fps:,.0f} files/s", fps >= 5000))
    return out


def goals_table(gs: list[Goal], *, judged: bool = True) -> str:
    """The goals of the scenarios that ran, a row each; those of scenarios not in this run in
    one line below. ``judged=False`` (``--tiny``): the figures are shown but no verdict."""
    lines = ["| goal | measured | met |", "|---|---|---|"]
    for g in gs:
        if g.not_run:
            continue
        if g.met is None:
            met = "not measured"
        elif not judged:
            met = "not judged (--tiny)"
        else:
            met = "yes" if g.met else "**no**"
        lines.append(f"| {g.text} | {g.measured} | {met} |")
    skipped: dict[str, int] = {}
    for g in gs:
        if g.not_run:
            skipped[g.not_run] = skipped.get(g.not_run, 0) + 1
    tail = ""
    if skipped:
        listed = ", ".join(f"{n} of {s}" for s, n in skipped.items())
        tail = f"\nNot measured (their scenario was not in this run): {listed}.\n"
    return "\n".join(lines) + "\n" + tail


def scale_table(results: list[CaseResult]) -> str:
    """How xio's time, RSS and temp disk grow with the session (scale scenario)."""
    rows = _find(results, "scale", "xio")
    if not rows:
        return ""
    lines = [
        "| files | MB | time s | ms per 100 files | peak RSS MB | peak tmp MB |",
        "|---|---|---|---|---|---|",
    ]
    for cr, r in rows:
        t = _t(r)
        per = None if t is None else t / cr.dataset.files * 100 * 1000
        lines.append(
            f"| {cr.dataset.files:,} | {cr.dataset.bytes / 1e6:,.0f} | {_fmt(t, '.2f')} | "
            f"{_fmt(per, '.1f')} | {_fmt(r.med('peak_rss_mb'), '.0f')} | "
            f"{_fmt(r.med('peak_tmp_mb'), '.1f')} |"
        )
    return "### scale: growth with session size (xio)\n\n" + "\n".join(lines) + "\n"
