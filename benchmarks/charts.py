"""Charts of the harness's results (issue 16 item 7): where people would rather look than read.

    python benchmarks/charts.py [RESULTS] [--out DIR]

``RESULTS`` is the JSON record a harness run writes (default ``benchmarks/results/latest.json``)
or a Markdown file holding the tables a run printed (``docs/performance.md``: only the medians
are in there, so its charts show no spread). Two kinds of chart, SVG, into ``DIR`` (default
``benchmarks/results``; the documentation's are in ``docs/img``):

* ``bench-time-<scenario>.svg``: the time of every contender, a panel per case, each run a dot
  on its bar (the bar is the median, the whisker the range of the runs), and the ratio to the
  case's baseline;
* ``bench-scale.svg``: peak RSS against the number of files in the ``scale`` scenario (log
  scale), beside the time per 1,000 files.

Preparing the data (:func:`time_charts`, :func:`scale_series`) needs only the standard library;
drawing needs matplotlib, the ``bench`` extra (``pip install -e '.[bench]'``). Without it the
harness still runs and says, in one line, how to get the charts (:func:`charts_unavailable`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INSTALL_HINT = "pip install -e '.[bench]' (matplotlib)"
SCALE = "scale"
# The bound of issue 16 item 4 drawn on the scale chart: peak RSS at 100,000 files.
RSS_GOAL_MB = 120.0
RSS_GOAL_FILES = 100_000


# --- the data of the charts (no matplotlib) -----------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One contender of one case: its successful runs' times and median, or why it has none."""

    contender: str
    runs_s: tuple[float, ...]
    median_s: float | None
    failed: str = ""  # why there is no time ("" when there is one)
    ratio: str = ""  # e.g. "1.07× as fast as xnatctl"; "" for the baseline itself or without one


@dataclass(frozen=True)
class Panel:
    case: str
    title: str
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class TimeChart:
    scenario: str
    panels: tuple[Panel, ...]

    @property
    def filename(self) -> str:
        return f"{time_chart_stem(self.scenario)}.svg"


@dataclass(frozen=True)
class ScalePoint:
    files: int
    rss_mb: tuple[float, ...]  # each successful run's peak RSS
    median_rss_mb: float
    seconds: float | None  # median time of the runs


@dataclass(frozen=True)
class ScaleSeries:
    contender: str
    points: tuple[ScalePoint, ...]  # by number of files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def time_chart_stem(scenario: str) -> str:
    """The file name (without .svg) of a scenario's time chart."""
    return f"bench-time-{_slug(scenario)}"


SCALE_CHART_STEM = "bench-scale"


def _ok_runs(contender: dict[str, Any], key: str) -> tuple[float, ...]:
    return tuple(
        float(run[key])
        for run in contender.get("runs", [])
        if run.get("ok") and isinstance(run.get(key), (int, float))
    )


def _median(contender: dict[str, Any], key: str) -> float | None:
    value = (contender.get("median") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and contender.get("ok") else None


def _title(case: dict[str, Any]) -> str:
    ds = case.get("dataset", {})
    runs = case.get("repeat", 1)
    spread = "" if case.get("runs_recorded", True) else " (medians only: runs not recorded)"
    return (
        f"{case.get('scenario', '')}: {ds.get('files', 0):,} files, "
        f"{ds.get('bytes', 0) / 1e6:,.0f} MB, {runs} run{'s' if runs != 1 else ''} each{spread}"
    )


def time_charts(record: dict[str, Any]) -> list[TimeChart]:
    """A chart per scenario (in the run's order) with a panel per case, a bar per contender.
    The ``scale`` scenario is drawn by :func:`scale_series` instead."""
    by_scenario: dict[str, list[Panel]] = {}
    for case in record.get("cases", []):
        scenario = case.get("scenario", "")
        if scenario == SCALE:
            continue
        contenders: dict[str, Any] = case.get("contenders", {})
        baseline = case.get("baseline") or ""
        base = _median(contenders[baseline], "metric_s") if baseline in contenders else None
        bars = []
        for name, x in contenders.items():
            median = _median(x, "metric_s")
            if median is None:
                errors = x.get("errors") or []
                bars.append(Bar(name, (), None, failed=str(errors[0]) if errors else "failed"))
                continue
            ratio = ""
            if base and name != baseline:
                ratio = f"{base / median:.2f}× as fast as {baseline}"
            bars.append(Bar(name, _ok_runs(x, "metric_s"), median, ratio=ratio))
        panel = Panel(case.get("case", scenario), _title(case), tuple(bars))
        by_scenario.setdefault(scenario, []).append(panel)
    return [TimeChart(s, tuple(panels)) for s, panels in by_scenario.items()]


def scale_series(record: dict[str, Any]) -> list[ScaleSeries]:
    """Peak RSS (and time) against the number of files, a series per contender of ``scale``;
    a contender's failed cases are left out of its series."""
    points: dict[str, list[ScalePoint]] = {}
    for case in record.get("cases", []):
        if case.get("scenario") != SCALE:
            continue
        files = int(case.get("dataset", {}).get("files", 0))
        for name, x in case.get("contenders", {}).items():
            rss = _median(x, "peak_rss_mb")
            if rss is None or files <= 0:
                continue
            point = ScalePoint(files, _ok_runs(x, "peak_rss_mb"), rss, _median(x, "metric_s"))
            points.setdefault(name, []).append(point)
    return [
        ScaleSeries(name, tuple(sorted(ps, key=lambda p: p.files))) for name, ps in points.items()
    ]


def caption(record: dict[str, Any]) -> str:
    """Where the figures come from: date, load, code, as a chart's footnote."""
    machine = record.get("machine", {})
    parts = []
    if machine.get("utc"):
        parts.append(f"measured {machine['utc']}")
    if machine.get("nproc"):
        parts.append(f"{machine['nproc']} CPUs")
    load = machine.get("load_average")
    if load:
        parts.append(
            f"load {load[0]}"
            + (f" → {record['load_average_end'][0]}" if record.get("load_average_end") else "")
        )
    revision = machine.get("xnatio", {}).get("revision")
    if revision:
        parts.append(f"xnatio at {revision}")
    if record.get("tiny"):
        parts.append("--tiny: these times are start-up and mean nothing")
    return ", ".join(parts)


# --- a record from the Markdown tables a run printed ---------------------------------------------

_CASE_HEAD = re.compile(r"^#{3,4} (\S+) (\d+) files\s*$")
_DATASET = re.compile(r"^([\d,]+) files, ([\d,.]+) MB .*?; (\d+) run\(s\) each")
_MACHINE = re.compile(r"started (\S+?)[,;]")
_REVISION = re.compile(r"^xnatio \S+ at (\S+?)[ .]")


def record_from_markdown(text: str) -> dict[str, Any]:
    """The cases of the harness tables in ``text`` (between ``<!-- results:start -->`` and
    ``<!-- results:end -->`` when those marks are there) as a record :func:`time_charts` and
    :func:`scale_series` read: medians only, so no spread."""
    start, end = text.find("<!-- results:start -->"), text.find("<!-- results:end -->")
    if start >= 0 and end > start:
        text = text[start:end]
    cases: list[dict[str, Any]] = []
    machine: dict[str, Any] = {}
    current: dict[str, Any] | None = None
    columns: list[str] = []
    for line in text.splitlines():
        head = _CASE_HEAD.match(line)
        if head:
            current = {
                "scenario": head.group(1),
                "case": f"{head.group(1)} {head.group(2)} files",
                "dataset": {"files": int(head.group(2)), "bytes": 0},
                "repeat": 1,
                "baseline": None,
                "runs_recorded": False,
                "contenders": {},
            }
            cases.append(current)
            columns = []
            continue
        if line.startswith("#"):
            current = None
            continue
        if (m := _MACHINE.search(line)) and line.startswith("Machine:"):
            machine["utc"] = m.group(1)
        if m := _REVISION.match(line):
            machine["xnatio"] = {"revision": m.group(1)}
        if current is None:
            continue
        if m := _DATASET.match(line):
            current["dataset"]["bytes"] = float(m.group(2).replace(",", "")) * 1e6
            current["repeat"] = int(m.group(3))
        elif line.startswith("| contender |"):
            columns = [c.strip() for c in line.strip("|").split("|")]
            if columns[-1].startswith("speed vs "):
                current["baseline"] = columns[-1].removeprefix("speed vs ")
        elif columns and line.startswith("| ") and not line.startswith("|---"):
            values = [c.strip() for c in line.strip("|").split("|")]
            cells = dict(zip(columns, values, strict=False))
            ok_runs, _, attempted = cells.get("ok runs", "0/0").partition("/")
            ok = ok_runs.isdigit() and ok_runs == attempted
            current["contenders"][cells["contender"]] = {
                "ok": ok,
                "errors": [] if ok else [f"{ok_runs} of {attempted} runs succeeded"],
                "median": {
                    "metric_s": _number(cells.get("time s", "")),
                    "peak_rss_mb": _number(cells.get("peak RSS MB", "")),
                },
                "runs": [],
            }
    return {"machine": machine, "cases": cases}


def _number(cell: str) -> float | None:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return None


def load_record(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix.lower() in (".md", ".markdown"):
        return record_from_markdown(text)
    record: dict[str, Any] = json.loads(text)
    return record


# --- drawing (matplotlib) -----------------------------------------------------------------------


def charts_unavailable() -> str:
    """Why no chart can be drawn here ("" when they can)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"charts skipped: matplotlib is not installed; {INSTALL_HINT} draws them"
    return ""


XIO = "#1f6fb4"  # xio as installed
XIO_VARIANT = "#8fbde6"  # xio with other options
PEER = "#b0b0b0"  # the tools users would pick instead


def _colour(name: str) -> str:
    if name == "xio":
        return XIO
    if name.startswith("xio") or name in ("sequential", "discover+plan"):
        return XIO_VARIANT
    return PEER


# Reproducible SVG: no date, fixed ids, text kept as text (small, diffable files).
_RC = {"svg.hashsalt": "xnatio-benchmarks", "svg.fonttype": "none", "font.size": 9.0}
_SAVE = {"format": "svg", "metadata": {"Date": None}, "bbox_inches": "tight"}


def _draw_time(chart: TimeChart, note: str, path: Path) -> None:
    from matplotlib.figure import Figure

    heights = [max(len(p.bars), 1) * 0.38 + 0.75 for p in chart.panels]
    fig = Figure(figsize=(8.0, sum(heights) + 0.5), layout="constrained")
    axes = fig.subplots(len(chart.panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, panel in zip(axes, chart.panels, strict=True):
        names = [b.contender for b in panel.bars]
        ys = list(range(len(names)))[::-1]  # the first contender on top
        top = max((max(b.runs_s or (b.median_s or 0.0,)) for b in panel.bars), default=0.0)
        top = top or 1.0
        for y, bar in zip(ys, panel.bars, strict=True):
            if bar.median_s is None:
                ax.text(top * 0.01, y, f"failed: {bar.failed}"[:90], va="center", color="#b00")
                continue
            ax.barh(y, bar.median_s, height=0.62, color=_colour(bar.contender))
            if len(bar.runs_s) > 1:
                lo, hi = min(bar.runs_s), max(bar.runs_s)
                ax.errorbar(
                    bar.median_s,
                    y,
                    xerr=[[bar.median_s - lo], [hi - bar.median_s]],
                    fmt="none",
                    ecolor="#333",
                    capsize=3,
                    lw=0.9,
                )
            if bar.runs_s:
                ax.plot(bar.runs_s, [y] * len(bar.runs_s), "o", ms=3.2, color="#222", zorder=3)
            label = f"{bar.median_s:.2f} s" + (f"   {bar.ratio}" if bar.ratio else "")
            right = max(bar.runs_s or (bar.median_s,))
            ax.text(right + top * 0.015, y, label, va="center")
        ax.set_yticks(ys, names)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.set_xlim(0, top * 1.45)
        runs = any(b.runs_s for b in panel.bars)
        ax.set_xlabel("seconds (bar: median; dots: each run)" if runs else "seconds (median)")
        ax.set_title(panel.title, loc="left", fontsize=9.5)
        ax.spines[["top", "right"]].set_visible(False)
    if note:
        fig.supxlabel(note, fontsize=7.5, color="#555")
    fig.savefig(path, **_SAVE)


def _draw_scale(series: list[ScaleSeries], note: str, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(8.0, 3.4), layout="constrained")
    rss_ax, time_ax = fig.subplots(1, 2)
    files_seen = [p.files for s in series for p in s.points]
    for s in series:
        xs = [p.files for p in s.points]
        colour = _colour(s.contender) if s.contender == "xio" else None
        rss_ax.plot(xs, [p.median_rss_mb for p in s.points], "o-", label=s.contender, color=colour)
        for p in s.points:
            if len(p.rss_mb) > 1:
                rss_ax.vlines(p.files, min(p.rss_mb), max(p.rss_mb), color="#333", lw=0.9)
            rss_ax.annotate(
                f"{p.median_rss_mb:.0f}",
                (p.files, p.median_rss_mb),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        timed = [p for p in s.points if p.seconds is not None]
        time_ax.plot(
            [p.files for p in timed],
            [(p.seconds or 0.0) / p.files * 1000 for p in timed],
            "o-",
            label=s.contender,
            color=colour,
        )
    if files_seen:
        rss_ax.axhline(RSS_GOAL_MB, ls="--", lw=0.9, color="#b00")
        rss_ax.text(
            min(files_seen),
            RSS_GOAL_MB,
            f" goal: < {RSS_GOAL_MB:.0f} MB at {RSS_GOAL_FILES:,} files",
            va="bottom",
            color="#b00",
            fontsize=8,
        )
    ticks = sorted(set(files_seen))
    for ax in (rss_ax, time_ax):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{n:,}" for n in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("files in the session")
        ax.set_ylim(bottom=0)
        ax.spines[["top", "right"]].set_visible(False)
    rss_ax.set_ylabel("peak RSS, MB")
    rss_ax.set_title("scale: peak RSS against file count", loc="left", fontsize=9.5)
    time_ax.set_ylabel("seconds per 1,000 files")
    time_ax.set_title("scale: time per 1,000 files", loc="left", fontsize=9.5)
    if len(series) > 1:
        rss_ax.legend(fontsize=8, frameon=False)
    if note:
        fig.supxlabel(note, fontsize=7.5, color="#555")
    fig.savefig(path, **_SAVE)


def render(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw every chart the record has data for into ``out_dir``; returns the files written.
    Needs matplotlib (check :func:`charts_unavailable` first)."""
    import matplotlib

    out_dir.mkdir(parents=True, exist_ok=True)
    note = caption(record)
    written: list[Path] = []
    with matplotlib.rc_context(_RC):
        for chart in time_charts(record):
            path = out_dir / chart.filename
            _draw_time(chart, note, path)
            written.append(path)
        series = scale_series(record)
        if series:
            path = out_dir / f"{SCALE_CHART_STEM}.svg"
            _draw_scale(series, note, path)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/charts.py",
        description="Draw the charts of a harness run (SVG) from its JSON record, or from the "
        "Markdown tables it printed (medians only).",
    )
    p.add_argument(
        "results",
        nargs="?",
        type=Path,
        default=RESULTS_DIR / "latest.json",
        help="a run's JSON record or a Markdown file of its tables "
        "(default: benchmarks/results/latest.json)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="where the SVG files go (default: %(default)s)",
    )
    args = p.parse_args(argv)
    why = charts_unavailable()
    if why:
        print(why, file=sys.stderr)
        return 2
    try:
        record = load_record(args.results)
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    written = render(record, args.out)
    if not written:
        print(f"no results to draw in {args.results}", file=sys.stderr)
        return 1
    print("charts written: " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
