"""The benchmark harness itself: its measurements and its report, on tiny data (no timings).

Benchmarks are not tests; these only check that the harness measures what it says, reports a
broken contender as failed with its reason, and that ``run.py --tiny`` produces a complete record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import contenders as c  # noqa: E402
from benchmarks.data import DataSpec  # noqa: E402
from benchmarks.measure import run_measured  # noqa: E402
from benchmarks.scenarios import Case, Runner, RunRecord  # noqa: E402


def test_run_measured_sees_memory_and_temp_disk_of_the_whole_process_tree(tmp_path: Path) -> None:
    watched = tmp_path / "tmp"
    watched.mkdir()
    # A parent holding 60 MB starts a child that holds 80 MB and writes 5 MB into TMPDIR.
    child = (
        "import os, time; b = bytearray(80_000_000); "
        "open(os.path.join(os.environ['TMPDIR'], 'f'), 'wb').write(os.urandom(5_000_000)); "
        "time.sleep(0.6)"
    )
    parent = (
        "import subprocess, sys; a = bytearray(60_000_000); "
        f"subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    )
    m = run_measured(
        [sys.executable, "-c", parent],
        env=dict(os.environ, TMPDIR=str(watched)),
        cwd=tmp_path,
        watch={"tmp": watched},
        log_dir=tmp_path / "log",
        timeout=60,
    )
    assert m.returncode == 0, m.stderr
    assert m.peak_rss_mb >= 140  # both processes at once, not only the parent
    assert 5 <= m.peak_tmp_mb["tmp"] < 6


def test_run_measured_kills_a_command_that_overruns(tmp_path: Path) -> None:
    m = run_measured(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        env=dict(os.environ),
        cwd=tmp_path,
        watch={},
        log_dir=tmp_path / "log",
        timeout=0.5,
    )
    assert m.timed_out
    assert m.returncode != 0


@pytest.mark.integration
def test_a_contender_that_fails_is_reported_with_its_reason_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XNATIO_BENCH_CACHE", str(tmp_path / "cache"))

    def build(ctx: c.RunContext) -> c.Invocation:
        return c.Invocation([sys.executable, "-c", "import sys; sys.exit('no route to XNAT')"])

    def unavailable() -> None:
        raise c.Unavailable("not installed here (apt-get install it)")

    broken = c.Contender("broken", "exits 1", c.nothing, build, c.check_received)
    missing = c.Contender("missing", "cannot run", unavailable, build, c.check_received)
    case = Case(
        "cstore",
        "cstore tiny",
        DataSpec(6, 16, 16),
        "storescp",
        [broken, missing],
        repeat=1,
    )
    result = Runner(log=lambda s: None).run_case(case)
    assert not result.results["broken"].ok
    assert result.results["broken"].errors == [
        "run 1: exit code 1: no route to XNAT (0 of 6 files received)"
    ]
    assert result.results["missing"].errors == ["not installed here (apt-get install it)"]


@pytest.mark.integration
@pytest.mark.slow
def test_run_py_tiny_uploads_for_real_and_writes_a_complete_record(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = dict(os.environ, XNATIO_BENCH_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "rest-limit",
            "cstore",
            "discover",
            "--tiny",
            # xnatctl is left out: installing it from PyPI is not a unit of this test.
            "--only",
            "xio,curl,dcmtk-storescu,pynetdicom-storescu,discover+plan,xio --dry-run",
            "--json",
            str(out),
            "--charts",
            str(tmp_path / "charts"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["machine"]["nproc"] >= 1
    cases = {case["case"]: case for case in record["cases"]}
    assert set(cases) == {"rest-limit 60 files", "cstore 10 files", "discover 300 files"}
    rest = cases["rest-limit 60 files"]
    for name in ("xio", "curl"):
        run = rest["contenders"][name]["runs"][0]
        assert run["ok"], run["error"]
        # Counted on the server after the run, file by file.
        assert run["details"]["landed"] == rest["dataset"]["files"] == 60
    cstore = cases["cstore 10 files"]
    for name in ("xio", "dcmtk-storescu", "pynetdicom-storescu"):
        run = cstore["contenders"][name]["runs"][0]
        assert run["ok"], run["error"]
        assert run["details"]["landed"] == 10  # files storescp wrote
    assert set(cases["discover 300 files"]["contenders"]) == {"discover+plan", "xio --dry-run"}
    goals = {g["goal"] for g in record["goals"]}
    assert "REST within 1.25× of the curl limit (rest-limit 60 files)" in goals
    assert "C-STORE ≥ 5× dcmtk storescu (files/s) (cstore 10 files)" in goals
    assert "### rest-limit 60 files" in done.stdout
    # --tiny says what it checks, and judges no goal on figures that mean nothing.
    assert "--tiny: checks that every contender runs" in done.stdout
    assert record["goals_judged"] is False and record["tiny"] is True
    assert {g["met"] for g in record["goals"]} == {None}
    assert "| yes |" not in done.stdout and "**no**" not in done.stdout
    # Charts, or the one line saying how to get them.
    if ch.charts_unavailable():
        assert ch.charts_unavailable() in done.stdout
    else:
        assert (tmp_path / "charts" / "bench-time-rest-limit.svg").exists()


# --- the shaped link of rest-wan and rest-slow (benchmarks/link.py) ---------------------------

from benchmarks import link as shaped  # noqa: E402

needs_link = pytest.mark.skipif(
    bool(shaped.link_unavailable()), reason=shaped.link_unavailable() or "link available"
)


@needs_link
def test_a_link_puts_the_receiver_behind_a_kernel_shaped_veth_and_goes_away(tmp_path: Path) -> None:
    import socket
    import subprocess

    with shaped.Link(100) as link:
        assert link.name in shaped.namespaces()
        qdisc = subprocess.run(
            ["tc", "qdisc", "show", "dev", link._host_if], capture_output=True, text=True
        ).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
        # A listener inside the namespace is reached at the server address, not on loopback.
        server = subprocess.Popen(
            [
                *link.exec_prefix(),
                sys.executable,
                "-c",
                "import socket; s = socket.socket(); "
                f"s.bind(({link.server_ip!r}, 0)); s.listen(1); "
                "print(s.getsockname()[1], flush=True); c, _ = s.accept(); "
                "c.sendall(c.recv(5)); c.close()",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            with socket.create_connection((link.server_ip, port), timeout=10) as conn:
                conn.sendall(b"hello")
                assert conn.recv(5) == b"hello"
        finally:
            server.wait(timeout=10)
            server.stdout.close()  # type: ignore[union-attr]
    assert link.name not in shaped.namespaces()
    gone = subprocess.run(["ip", "link", "show", link._host_if], capture_output=True)
    assert gone.returncode != 0


@needs_link
def test_namespaces_of_a_killed_harness_are_removed_and_sigterm_cleans_up() -> None:
    import signal
    import subprocess

    # A harness process that made a link and was then stopped with SIGTERM cleans up itself
    # (the harness turns SIGTERM into KeyboardInterrupt, as benchmarks/cli.py does).
    code = (
        f"import signal, sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks.cli import _terminate\n"
        "from benchmarks.link import Link\n"
        "signal.signal(signal.SIGTERM, _terminate)\n"
        "with Link(50) as link:\n"
        "    print(link.name, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    name = proc.stdout.readline().strip()
    assert name in shaped.namespaces()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert name not in shaped.namespaces()

    # One left behind by a harness killed with SIGKILL: removed by the next harness.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{shaped.PREFIX}{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in shaped.remove_stale()
        assert stale not in shaped.namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


# --- an interrupted harness leaves nothing behind ------------------------------------------------


def _alive_pid(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.integration
def test_sigterm_during_a_run_stops_client_and_receiver_and_removes_the_work_directory(
    tmp_path: Path,
) -> None:
    import signal

    from benchmarks.measure import _tree

    marker = tmp_path / "client-started"
    # A harness whose one contender never finishes: the client writes a marker, then sleeps.
    client = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(120)"
    code = (
        f"import signal, sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks import contenders as c\n"
        "from benchmarks.cli import _terminate\n"
        "from benchmarks.data import DataSpec\n"
        "from benchmarks.scenarios import Case, Runner\n"
        "signal.signal(signal.SIGTERM, _terminate)\n"
        f"client = {client!r}\n"
        "build = lambda ctx: c.Invocation([sys.executable, '-c', client])\n"
        "hang = c.Contender('hang', 'sleeps', c.nothing, build, c.check_received)\n"
        "case = Case('cstore', 'cstore tiny', DataSpec(6, 16, 16), 'storescp', [hang], 1)\n"
        "try:\n"
        "    Runner(log=lambda s: None).run_case(case)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    env = dict(os.environ, XNATIO_BENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        for _ in range(600):  # the client has started (at most a minute under load)
            if marker.exists() or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert marker.exists(), proc.communicate(timeout=30)
        started = [pid for pid in _tree(proc.pid) if pid != proc.pid]
        assert len(started) >= 2  # storescp and the client at least
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"interrupted" in out, err.decode()[-2000:]
    assert [pid for pid in started if _alive_pid(pid)] == []
    assert list((tmp_path / "cache" / "work").iterdir()) == []


# --- the goals of the report and the data of the charts (no run, no timing) ----------------------

from benchmarks import charts as ch  # noqa: E402
from benchmarks.data import Dataset  # noqa: E402
from benchmarks.report import case_table, goals, goals_table  # noqa: E402
from benchmarks.scenarios import CaseResult, ContenderResult  # noqa: E402


def _run(rep: int, seconds: float | None, rss: float = 100.0, server_cpu: float = 0.0) -> RunRecord:
    ok = seconds is not None
    return RunRecord(
        rep=rep,
        ok=ok,
        error="" if ok else "exit code 1: boom",
        wall_s=seconds or 0.0,
        metric_s=seconds or 0.0,
        files_per_s=None,
        mb_per_s=None,
        peak_rss_mb=rss,
        peak_tmp_mb=0.0,
        cpu_s=1.0,
        server={"server_cpu_s": server_cpu} if server_cpu else {},
        details={},
    )


def _case(
    scenario: str,
    times: dict[str, list[float | None]],
    *,
    files: int = 1000,
    mb: float = 1000.0,
    baseline: str | None = None,
    rss: float = 100.0,
    server_cpu: float = 0.0,
) -> CaseResult:
    case = Case(scenario, f"{scenario} {files} files", DataSpec(files, 8, 8), "none", [], 2)
    case.baseline = baseline
    dataset = Dataset(DataSpec(files, 8, 8), Path("/nonexistent"), files, int(mb * 1e6), "1.2.3")
    results = {
        name: ContenderResult(
            name,
            name,
            [_run(i, t, rss=rss, server_cpu=server_cpu * (t or 0)) for i, t in enumerate(ts)],
        )
        for name, ts in times.items()
    }
    return CaseResult(case, dataset, results)


ISSUE_16_GOALS = (
    "≥ 2× faster than xnatctl under rest-wan",
    "≥ 1.8× faster than xio --compress never under rest-wan",
    "≥ 2.5× faster than xnatctl at 100 Mbit/s",
    "on loopback --compress auto within 5 % of never",
    "the server's CPU < 40 % of the wall time",
    "server CPU ≤ 5 s per GB of session without knobs",
    "server CPU ≤ 10 s per GB of session under the knobs",
    "peak RSS < 120 MB at 100,000 files",
    "peak RSS grows < 20 MB from 10,000 to 100,000 files",
    "< 200 MB at 1,000,000 files",
    "the first import request leaves within 3 s",
    "xio with its read-back not slower than xnatctl",
)


def test_every_goal_of_issue_16_is_listed_and_says_not_measured_when_nothing_was_run() -> None:
    gs = goals([])
    for text in ISSUE_16_GOALS:
        found = [g for g in gs if text in g.text]
        assert found, f"no goal for {text!r}"
        assert all(g.met is None and g.measured.startswith("not measured") for g in found)
    table = goals_table(gs)
    assert "| yes |" not in table and "**no**" not in table
    assert "Not measured (their scenario was not in this run)" in table


def test_a_failed_or_missing_contender_makes_its_goals_not_measured_never_met() -> None:
    wan = _case(
        "rest-wan",
        {"xio": [10.0, 11.0], "xnatctl": [None, 40.0], "xio --compress never": [30.0, 30.0]},
    )
    gs = {g.text: g for g in goals([wan])}
    two_x = gs[
        "(issue 16) ≥ 2× faster than xnatctl under rest-wan (400 Mbit/s link) (rest-wan 1000 files)"
    ]
    assert two_x.met is None and two_x.measured == "not measured: xnatctl failed"
    seq = gs[
        "(for reference) faster than sequential upload under rest-wan, neither reading back "
        "(rest-wan 1000 files)"
    ]
    assert seq.met is None and seq.measured == "not measured: xio --no-verify, sequential not run"
    never = gs[
        "(issue 16) ≥ 1.8× faster than xio --compress never under rest-wan (rest-wan 1000 files)"
    ]
    assert never.met is True and never.measured == "never 30.00 s / xio 10.50 s = 2.86×"
    assert "| not measured |" in goals_table(list(gs.values()))


def test_issue_16_goals_are_judged_on_the_measured_figures() -> None:
    wan = _case(
        "rest-wan",
        {"xio": [20.0], "xnatctl": [45.0], "xio --compress never": [30.0]},
    )
    latency = _case(
        "rest-latency", {"xio --no-verify": [10.0], "xnatctl": [20.0]}, mb=2000, server_cpu=0.3
    )
    busy = _case("rest-latency", {"xio --no-verify": [10.0]}, files=2000, server_cpu=0.5)
    scale = [
        _case("scale", {"xio": [5.0]}, files=10_000, rss=100.0),
        _case("scale", {"xio": [50.0]}, files=100_000, rss=125.0),
    ]
    gs = {g.text: g for g in goals([wan, latency, busy, *scale])}
    assert gs[
        "(issue 16) ≥ 2× faster than xnatctl under rest-wan (400 Mbit/s link) (rest-wan 1000 files)"
    ].met
    assert not gs[
        "(issue 16) ≥ 1.8× faster than xio --compress never under rest-wan (rest-wan 1000 files)"
    ].met
    share = gs["(issue 16) the server's CPU < 40 % of the wall time (rest-latency 1000 files)"]
    assert share.met is True and share.measured == (
        "xio --no-verify: 3.0 s of 10.0 s = 30%; xnatctl: 6.0 s of 20.0 s = 30%"
    )
    assert (
        gs["(issue 16) the server's CPU < 40 % of the wall time (rest-latency 2000 files)"].met
        is False
    )
    per_gb = gs[
        "(issue 16) server CPU ≤ 10 s per GB of session under the knobs (rest-latency 1000 files)"
    ]
    assert per_gb.met is True and "xnatctl: 6.0 s = 3.0 s/GB" in per_gb.measured
    rss = gs["(issue 16) peak RSS < 120 MB at 100,000 files (scale)"]
    assert rss.met is False and rss.measured == "125 MB"
    growth = gs["(issue 16) peak RSS grows < 20 MB from 10,000 to 100,000 files (scale)"]
    assert growth.met is False and growth.measured == "100 → 125 MB = +25 MB"


def test_a_run_over_the_memory_bound_is_judged_on_what_it_measured_not_skipped() -> None:
    """A 100,000-file run that landed everything but went over the RSS bound is a measured miss:
    its RSS and its first request count in the goals (they were 'not measured', and the first
    request goal said 'yes' from the smaller case alone)."""
    small = _case("scale", {"xio": [5.0]}, files=15_000, rss=98.0)
    small.results["xio"].runs[0].details["first_import_s"] = 1.3
    big = _case("scale", {"xio": [50.0]}, files=100_000, rss=219.0)
    run = big.results["xio"].runs[0]
    run.ok, run.error = False, "peak RSS 219.0 MB is over the bound of 120 MB (issue 16 item 4)"
    run.details.update(over_rss_bound=True, first_import_s=3.25)
    gs = {g.text: g for g in goals([small, big])}
    rss = gs["(issue 16) peak RSS < 120 MB at 100,000 files (scale)"]
    assert rss.met is False and rss.measured == "219 MB"
    first = gs[
        "(issue 16) the first import request leaves within 3 s of launch, at any size (scale)"
    ]
    assert first.met is False and first.measured.startswith("slowest 3.2 s (at 100,000 files")
    run.details.pop("over_rss_bound")  # any other failure: not measured, never met
    gs = {g.text: g for g in goals([small, big])}
    assert gs["(issue 16) peak RSS < 120 MB at 100,000 files (scale)"].met is None


def test_chart_data_keep_every_run_the_failures_and_the_ratio_to_the_baseline() -> None:
    limit = _case(
        "rest-limit", {"xio": [12.0, 10.0, 11.0], "curl": [10.0, 9.0, 11.0]}, baseline="curl"
    )
    broken = _case("cstore", {"xio": [2.0], "dcmtk-storescu": [None]}, baseline="dcmtk-storescu")
    scale = [
        _case("scale", {"xio": [9.0, 11.0]}, files=100_000, rss=110.0),
        _case("scale", {"xio": [1.0]}, files=10_000, rss=90.0),
        _case("scale", {"xio": [None]}, files=50_000),
    ]
    record = {"cases": [cr.to_json() for cr in (limit, broken, *scale)]}
    charts = ch.time_charts(record)
    assert [c.scenario for c in charts] == ["rest-limit", "cstore"]  # scale has its own chart
    xio, curl = charts[0].panels[0].bars
    assert (xio.runs_s, xio.median_s, xio.ratio) == (
        (12.0, 10.0, 11.0),
        11.0,
        "0.91× as fast as curl",
    )
    assert (curl.median_s, curl.ratio) == (10.0, "")
    failed = charts[1].panels[0].bars[1]
    assert failed.median_s is None and failed.failed == "run 1: exit code 1: boom"
    assert charts[1].panels[0].bars[0].ratio == ""  # no baseline time, no ratio
    (series,) = ch.scale_series(record)
    assert [(p.files, p.median_rss_mb, p.seconds) for p in series.points] == [
        (10_000, 90.0, 1.0),
        (100_000, 110.0, 10.0),
    ]


def test_chart_data_read_back_from_the_markdown_tables_a_run_prints() -> None:
    limit = _case("rest-limit", {"xio": [12.0, 10.0], "curl": [10.0, 9.0]}, baseline="curl")
    scale = _case("scale", {"xio": [3.0]}, files=2000, rss=52.0)
    text = "<!-- results:start -->\n" + case_table(limit) + "\n" + case_table(scale)
    text += "xnatio 0.1.0 at 17817e1 (committed tree).\n<!-- results:end -->\n"
    record = ch.record_from_markdown(text.replace("### ", "#### "))
    (chart,) = ch.time_charts(record)
    xio, curl = chart.panels[0].bars
    assert (xio.median_s, xio.runs_s, curl.median_s) == (11.0, (), 9.5)
    assert xio.ratio == "0.86× as fast as curl"
    assert "1,000 files, 1,000 MB, 2 runs each (medians only" in chart.panels[0].title
    (series,) = ch.scale_series(record)
    assert [(p.files, p.median_rss_mb) for p in series.points] == [(2000, 52.0)]
    assert ch.caption(record) == "xnatio at 17817e1"
    assert ch.caption({"tiny": True}) == "--tiny: these times are start-up and mean nothing"


def test_charts_are_drawn_as_reproducible_svg(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    limit = _case("rest-limit", {"xio": [12.0, 10.0], "curl": [10.0, None]}, baseline="curl")
    scale = [_case("scale", {"xio": [1.0]}, files=n, rss=r) for n, r in ((2000, 60), (20000, 80))]
    record = {"cases": [cr.to_json() for cr in (limit, *scale)]}
    first = ch.render(record, tmp_path / "a")
    second = ch.render(record, tmp_path / "b")
    assert [p.name for p in first] == ["bench-time-rest-limit.svg", "bench-scale.svg"]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()  # no date, fixed ids: diffable in git
    svg = first[0].read_text()
    assert "xio" in svg and "failed: run 2: exit code 1: boom" in svg
    assert "peak RSS" in first[1].read_text()


def test_docs_get_the_tables_between_their_marks_and_the_charts_beside_them(tmp_path: Path) -> None:
    from benchmarks import cli

    results = [
        _case("rest-limit", {"xio": [12.0], "curl": [10.0]}, baseline="curl"),
        _case("scale", {"xio": [1.0]}, files=2000),
    ]
    charts = {"bench-time-rest-limit": "img/bench-time-rest-limit.svg", "bench-scale": "img/s.svg"}
    text = cli._markdown(
        results, goals(results), "Command: x\n", judged=True, charts=charts, level=4
    )
    assert text.startswith("#### rest-limit 1000 files\n")
    assert "\n### " not in text and "\n#### goals\n" in text
    # Each scenario's chart follows its tables.
    assert text.index("| curl |") < text.index("(img/bench-time-rest-limit.svg)")
    assert text.index("(img/bench-time-rest-limit.svg)") < text.index("#### scale 2000 files")
    assert text.index("#### scale: growth") < text.index("(img/s.svg)")

    page = tmp_path / "performance.md"
    page.write_text(f"# P\n\nprose\n\n{cli.RESULTS_START}\nold tables\n{cli.RESULTS_END}\n\nmore\n")
    assert cli._into_docs(text, page) == ""
    new = page.read_text()
    assert (
        "old tables" not in new and "prose" in new and new.endswith(f"{cli.RESULTS_END}\n\nmore\n")
    )
    assert new.count("#### rest-limit 1000 files") == 1
    unmarked = tmp_path / "other.md"
    unmarked.write_text("# no marks\n")
    assert "has no <!-- results:start -->" in cli._into_docs(text, unmarked)
    assert unmarked.read_text() == "# no marks\n"


def test_without_matplotlib_the_harness_says_in_one_line_how_to_get_charts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    record = {"cases": [_case("rest-limit", {"xio": [1.0]}).to_json()]}
    assert cli._charts(record, tmp_path) == []
    out = capsys.readouterr().out
    assert out.startswith("charts skipped: matplotlib is not installed;") and out.count("\n") == 1
    assert "pip install -e '.[bench]'" in out
    assert list(tmp_path.iterdir()) == []


def test_a_plain_run_is_the_proof_run_every_rest_scenario_twice_or_more() -> None:
    from benchmarks.scenarios import SCENARIOS, Sizes, build_cases

    cases = build_cases(list(SCENARIOS), Sizes(), None)
    rest = [case for case in cases if case.receiver == "sandbox" and case.scenario != "scale"]
    assert {case.scenario for case in rest} == {
        "rest-limit",
        "rest-wan",
        "rest-slow",
        "rest-latency",
    }
    assert {case.scenario: case.repeat for case in rest} == {
        "rest-limit": 3,  # three contenders: each once in each place of the order
        "rest-wan": 2,
        "rest-slow": 2,
        "rest-latency": 2,
    }


def test_a_signal_during_a_runs_clean_up_takes_effect_only_when_it_is_done() -> None:
    import signal
    import threading

    from benchmarks.cli import _terminate
    from benchmarks.scenarios import _signals_held

    previous = signal.signal(signal.SIGTERM, _terminate)
    # Another thread alive, as the receivers' samplers are: the kernel may pick it.
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt), _signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes: give it many
                steps.append(1)
            steps.append("done")
        assert steps[-1] == "done"  # the whole block ran, then the interrupt came
        assert signal.getsignal(signal.SIGTERM) is _terminate  # restored
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)


def test_each_repetition_starts_one_place_further_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A B C, B C A, C A B: every contender takes every place in the order in turn (the first
    of a case, the first after a previous run's clean-up, the last), none always in the middle."""
    monkeypatch.setenv("XNATIO_BENCH_CACHE", str(tmp_path / "cache"))
    order: list[tuple[int, str]] = []

    def run_one(self: Runner, case: Case, x: c.Contender, rep: int, *rest: object) -> RunRecord:
        order.append((rep, x.name))
        return RunRecord(rep, True, "", 1.0, 1.0, None, None, 0.0, 0.0, 0.0, {}, {})

    monkeypatch.setattr(Runner, "_run_one", run_one)

    def build(ctx: c.RunContext) -> c.Invocation:
        return c.Invocation([sys.executable, "-c", "pass"])

    names = ["A", "B", "C"]
    contenders = [c.Contender(n, n, c.nothing, build, c.check_received) for n in names]
    case = Case("cstore", "cstore tiny", DataSpec(4, 16, 16), "storescp", contenders, repeat=3)
    result = Runner(log=lambda s: None).run_case(case)
    assert [n for _, n in order] == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert [r for r, _ in order] == [0] * 3 + [1] * 3 + [2] * 3
    assert all(len(result.results[n].runs) == 3 for n in names)
