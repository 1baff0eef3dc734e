"""``python benchmarks/run.py [SCENARIO...]``: options, the run, the printed tables, the JSON."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.charts import SCALE_CHART_STEM, charts_unavailable, render, time_chart_stem
from benchmarks.data import cache_root
from benchmarks.link import link_unavailable, remove_stale
from benchmarks.report import (
    Goal,
    case_table,
    goals,
    goals_table,
    machine_info,
    scale_table,
)
from benchmarks.scenarios import SCENARIOS, TINY, CaseResult, Runner, Sizes, build_cases

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs"
# --docs: the tables go between these marks of docs/performance.md, the charts into docs/img.
DOCS_PAGE = DOCS / "performance.md"
DOCS_CHARTS = DOCS / "img"
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
# What --tiny is for, printed at its start: it checks that the harness works, not speed.
TINY_CHECKS = (
    "--tiny: checks that every contender runs and that the receiver holds every file it sent "
    "(REST {rest} files, C-STORE {cstore}, discover {discover}, scale {scale}); on data this "
    "small the times are start-up, so no goal is judged"
)


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated file counts, not {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("file counts must be positive")
    return values


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Measure xio side by side with the tools users would pick instead, on "
        "synthetic sessions, against local receivers (loopback only).",
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of: {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--repeat", type=int, help="runs per contender (default: per scenario)")
    p.add_argument(
        "--files",
        type=int,
        help="session size for rest-limit, rest-wan, rest-slow, rest-latency and cstore",
    )
    p.add_argument("--discover-files", type=_counts, help="e.g. 15000,50000")
    p.add_argument("--scale-files", type=_counts, help="e.g. 2000,15000,50000")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny sessions and one run each: checks that every contender runs and lands its "
        "files (a minute or two); the figures mean nothing",
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="generate the cached data and install the peers, then stop (nothing measured)",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="print the cases and their contenders' commands, then stop",
    )
    p.add_argument("--only", help="run only these contenders (comma-separated names)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--markdown", type=Path, help="also write the tables to this Markdown file")
    p.add_argument(
        "--charts",
        type=Path,
        metavar="DIR",
        help="draw the charts (SVG) into DIR (default: benchmarks/results, or docs/img with "
        "--docs); needs matplotlib: pip install -e '.[bench]'",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="when the run was not interrupted: its tables replace those between the results "
        "marks of docs/performance.md, and its charts go into docs/img",
    )
    p.add_argument("--keep", action="store_true", help="keep each run's work directory")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.docs and args.tiny:
        p.error("--docs takes a measured run; --tiny's figures mean nothing")
    if args.charts is None:
        args.charts = DOCS_CHARTS if args.docs else RESULTS_DIR
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    sizes = TINY if args.tiny else Sizes()
    if args.files:
        sizes = replace(
            sizes, rest_files=args.files, slow_files=args.files, cstore_files=args.files
        )
    if args.discover_files:
        sizes = replace(sizes, discover_files=args.discover_files)
    if args.scale_files:
        sizes = replace(sizes, scale_files=args.scale_files)
    repeat = args.repeat if args.repeat is not None else (1 if args.tiny else None)
    cases = build_cases(names, sizes, repeat)
    only = set(args.only.split(",")) if args.only else None

    if args.list:
        for case in cases:
            series, per = case.data.layout
            print(f"{case.name}: {series} x {per} files, receiver {case.receiver}", end="")
            print(f", knobs {case.knobs}" if case.knobs else "", end="")
            print(f", link {case.link_mbit:g} Mbit/s" if case.link_mbit else "", end="")
            print(f", repeat {case.repeat}")
            for x in case.contenders:
                print(f"  {x.name}: {x.summary}")
        return 0

    started = time.perf_counter()
    machine = machine_info()
    print(
        f"xnatio benchmarks: {', '.join(names)}; {machine['nproc']} CPUs ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB, load {machine['load_average']}; cache {cache_root()}",
        flush=True,
    )
    if args.tiny:
        print(
            TINY_CHECKS.format(
                rest=sizes.rest_files,
                cstore=sizes.cstore_files,
                discover=", ".join(map(str, sizes.discover_files)),
                scale=", ".join(map(str, sizes.scale_files)),
            ),
            flush=True,
        )
    runner = Runner(log=lambda s: print(s, flush=True), keep=args.keep, only=only)
    if args.prepare_only:
        for case in cases:
            runner.prepare_case(case)
        print(f"prepared in {time.perf_counter() - started:.0f} s")
        return 0
    results: list[CaseResult] = []
    interrupted = False
    # SIGTERM stops the harness as Ctrl-C does, so receivers and shaped links are cleaned up.
    signal.signal(signal.SIGTERM, _terminate)
    stale = [] if link_unavailable() else remove_stale()
    if stale:
        print(f"removed {len(stale)} namespace(s) left by a killed harness: {', '.join(stale)}")
    try:
        for case in cases:
            results.append(runner.run_case(case))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: reporting the cases that finished", file=sys.stderr)
    total = time.perf_counter() - started

    gs = goals(results)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_end = [round(x, 2) for x in os.getloadavg()]
    footer = (
        f"Command: `{command.strip()}`; total harness time {total:.0f} s.\n"
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}; started "
        f"{machine['utc']}, ended {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; "
        f"load average (1/5/15 min) {machine['load_average']} at start, {load_end} at end.\n"
        f"xnatio {machine['xnatio']['version']} at {machine['xnatio']['revision']}.\n"
    )
    record = {
        "command": command.strip(),
        "machine": machine,
        "load_average_end": load_end,
        "total_s": round(total, 1),
        "tiny": args.tiny,
        "cases": [cr.to_json() for cr in results],
        # --tiny judges no goal: its times are start-up (see TINY_CHECKS).
        "goals_judged": not args.tiny,
        "goals": [g.to_json() | ({"met": None} if args.tiny else {}) for g in gs],
    }
    print()
    print(_markdown(results, gs, footer, judged=not args.tiny))

    RESULTS_DIR.mkdir(exist_ok=True)
    outputs = [RESULTS_DIR / "latest.json", *([args.json] if args.json else [])]
    for path in outputs:
        path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results written to {', '.join(str(p) for p in outputs)}")
    drawn = _charts(record, args.charts) if results else []
    judged = not args.tiny
    if args.markdown:
        # The file shows the charts beside the tables, by paths relative to where it is.
        rel = {p.stem: os.path.relpath(p, args.markdown.resolve().parent) for p in drawn}
        args.markdown.write_text(_markdown(results, gs, footer, judged=judged, charts=rel))
    if args.docs and (interrupted or not results):
        print(f"{DOCS_PAGE} not updated: the run did not finish")
    elif args.docs:
        rel = {p.stem: os.path.relpath(p, DOCS_PAGE.parent) for p in drawn}
        why = _into_docs(_markdown(results, gs, footer, judged=judged, charts=rel, level=4))
        print(why or f"tables written into {DOCS_PAGE} (between {RESULTS_START} and {RESULTS_END})")
    # Benchmarks are not tests: a missed goal is reported, not an error. A contender that failed
    # to run is still worth a non-zero exit, so scripts notice a broken harness.
    failed = [r.name for cr in results for r in cr.results.values() if not r.ok]
    return 1 if failed else 0


def _charts(record: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw the run's charts; a missing plotting library or a chart that fails to draw costs
    one line, never the results (already written)."""
    why = charts_unavailable()
    if why:
        print(why)
        return []
    try:
        drawn = render(record, out_dir)
    except Exception as exc:  # a chart must never cost the run its tables
        print(f"charts not drawn: {type(exc).__name__}: {exc}")
        return []
    print(f"charts written to {out_dir}: {', '.join(p.name for p in drawn)}")
    return drawn


def _into_docs(markdown: str, page: Path = DOCS_PAGE) -> str:
    """Replace what is between the results marks of ``page``; why not ("" when done)."""
    try:
        text = page.read_text()
    except OSError as exc:
        return f"{page} not updated: {exc.strerror or exc}"
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start < 0 or end < start:
        return f"{page} not updated: it has no {RESULTS_START} ... {RESULTS_END} marks"
    head = text[: start + len(RESULTS_START)]
    page.write_text(f"{head}\n{markdown.strip()}\n{text[end:]}")
    return ""


def _markdown(
    results: list[CaseResult],
    gs: list[Goal],
    footer: str,
    *,
    judged: bool,
    charts: dict[str, str] | None = None,
    level: int = 3,
) -> str:
    """The tables of the run, under headings of ``level``; with ``charts`` (chart name -> path),
    each scenario's chart follows its last table and the scale chart the scale table."""
    charts = charts or {}
    parts: list[str] = []
    for i, cr in enumerate(results):
        parts.append(case_table(cr))
        scenario = cr.case.scenario
        last = i + 1 == len(results) or results[i + 1].case.scenario != scenario
        chart = charts.get(time_chart_stem(scenario))
        if last and chart:
            parts.append(f"![{scenario}: time of each contender]({chart})\n")
    scale = scale_table(results)
    if scale:
        parts.append(scale)
        if SCALE_CHART_STEM in charts:
            parts.append(f"![scale: peak RSS against file count]({charts[SCALE_CHART_STEM]})\n")
    parts.append("### goals\n\n" + goals_table(gs, judged=judged))
    text = "\n".join(parts) + "\n" + footer
    return ("\n" + text).replace("\n### ", "\n" + "#" * level + " ")[1:]
