"""The harness's receiver (benchmarks/servers.py): the server's CPU is counted over the client's
run only, what it does after the client exited is reported apart, and its data directory (in
memory when there is room) is gone when it stops. No timings are asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import servers  # noqa: E402

pytestmark = pytest.mark.integration


def _busy(server: servers.Sandbox, n: int) -> None:
    with requests.Session() as s:
        s.auth = (server.user, server.password)
        for _ in range(n):
            s.get(f"{server.url}/data/projects", params={"format": "json"}, timeout=10)


def test_the_server_cpu_after_the_client_exited_is_not_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(servers.SERVER_DATA_ENV, raising=False)
    server = servers.Sandbox(tmp_path / "server")
    server.start()
    try:
        data = server.data_dir
        assert data is not None and data.is_dir()
        if servers.SHM.is_dir() and server.in_memory:
            assert data.parent == servers.SHM
        # An empty client window, then work after the client "exited" (like the harness's count
        # of what landed): it is reported as after, not in the run.
        server.client_started()
        server.client_exited()
        _busy(server, 150)
    finally:
        peaks = server.stop()
    assert set(peaks) >= {"server_cpu_s", "server_cpu_after_s"}
    assert peaks["server_cpu_after_s"] > peaks["server_cpu_s"] >= 0.0
    if server.in_memory:
        assert not data.exists()  # the data in memory are removed at stop


def test_the_server_data_stay_on_disk_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the data go is decided before the server starts: no server needed to check it.
    monkeypatch.setenv(servers.SERVER_DATA_ENV, "disk")
    server = servers.Sandbox(tmp_path / "server")
    assert server._choose_data_dir() == tmp_path / "server" / "server-data"
    assert not server.in_memory
    monkeypatch.setenv(servers.SERVER_DATA_ENV, "memory")
    chosen = server._choose_data_dir()
    try:
        if server.in_memory:
            assert chosen.parent == servers.SHM and chosen.is_dir()
        else:  # no tmpfs with room on this machine
            assert chosen == tmp_path / "server" / "server-data"
    finally:
        if server.in_memory:
            chosen.rmdir()


def test_perf_stat_counts_are_read_by_name_and_uncounted_ones_left_out() -> None:
    text = (
        "# started on Mon Nov 30 15:20:00 2026\n\n"
        "31781,,context-switches,2960000000,100.00,,\n"
        "<not counted>,,page-faults,0,0.00,,\n"
        "3560,msec,task-clock,3560000000,100.00,1.000,CPUs utilized\n"
    )
    assert servers.perf_counts(text) == {"server_context_switches": 31781}
