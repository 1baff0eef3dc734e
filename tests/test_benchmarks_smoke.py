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
from benchmarks.scenarios import Case, Runner  # noqa: E402


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
