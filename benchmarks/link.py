"""A real network link for the benchmarks: the kernel shapes it, not the server.

The receiver runs in its own network namespace, joined to this one by a veth pair; the
client-side end of the pair gets a ``tbf`` (token bucket) queue discipline at the link rate, so
every contender's upload meets the same TCP bottleneck, with the kernel's own queueing and
back-pressure. (``netem`` is not available on these machines, so the per-request latency stays a
sandbox knob: ``--latency-ms``.)

Needs root and iproute2 (``ip``, ``tc``); :func:`link_unavailable` says why a link cannot be made,
so the harness can report the case as not runnable instead of failing. Every namespace this
module makes is named ``xnbench-<pid>-<n>``: :func:`remove_stale` deletes those whose process has
gone (a harness killed with SIGKILL), and :class:`Link` removes its own on exit, including
Ctrl-C and SIGTERM (the harness turns SIGTERM into ``KeyboardInterrupt``).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from types import TracebackType

PREFIX = "xnbench-"
_counter = itertools.count()
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-(\d+)$")


def link_unavailable() -> str:
    """Why no link can be made here ("" when one can)."""
    if os.geteuid() != 0:
        return "a shaped link needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"a shaped link needs {tool!r} (apt-get install iproute2)"
    return ""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def namespaces() -> list[str]:
    done = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces of harness processes that no longer exist; returns their names."""
    removed = []
    for name in namespaces():
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def burst_bytes(rate_mbit: float) -> int:
    """The token bucket's depth: at least one timer tick of data at the rate (the kernel's
    timer runs at up to 1000 Hz; a bucket shallower than rate/HZ caps the rate below the
    setting), and never below 64 KiB, so a GSO segment always fits."""
    per_ms = rate_mbit * 1e6 / 8 / 1000
    return max(64 * 1024, int(per_ms * 4))


@dataclass
class Link:
    """A namespace for the receiver behind a veth pair shaped to ``rate_mbit`` toward it."""

    rate_mbit: float
    name: str = ""
    client_ip: str = ""
    server_ip: str = ""
    _host_if: str = ""
    _made: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.rate_mbit <= 0:
            raise ValueError("the link rate must be positive")
        n = next(_counter)
        pid = os.getpid()
        self.name = f"{PREFIX}{pid}-{n}"
        # Interface names are at most 15 bytes; a /30 per link from the pid and counter.
        tag = f"{pid % 100000}{n % 10}"
        self._host_if = f"xnb{tag}a"
        self._peer_if = f"xnb{tag}b"
        octet2 = 64 + (pid % 64)
        block = (n % 64) * 4
        octet3 = (pid // 64) % 256
        self.client_ip = f"10.{octet2}.{octet3}.{block + 1}"
        self.server_ip = f"10.{octet2}.{octet3}.{block + 2}"

    def __enter__(self) -> Link:
        why = link_unavailable()
        if why:
            raise RuntimeError(why)
        remove_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        _run("ip", "netns", "add", self.name)
        self._made = True
        _run("ip", "link", "add", self._host_if, "type", "veth", "peer", "name", self._peer_if)
        _run("ip", "link", "set", self._peer_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.client_ip}/30", "dev", self._host_if)
        _run("ip", "link", "set", self._host_if, "up")
        ns = ("ip", "netns", "exec", self.name)
        _run(*ns, "ip", "addr", "add", f"{self.server_ip}/30", "dev", self._peer_if)
        _run(*ns, "ip", "link", "set", self._peer_if, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        # The client's uploads leave through the host end: shape its egress.
        _run(
            "tc",
            "qdisc",
            "add",
            "dev",
            self._host_if,
            "root",
            "tbf",
            "rate",
            f"{self.rate_mbit:g}mbit",
            "burst",
            str(burst_bytes(self.rate_mbit)),
            "latency",
            "50ms",
        )

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the receiver's namespace."""
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        # Deleting the namespace deletes the peer end, and with it the host end of the pair.
        if self._made:
            _run("ip", "netns", "del", self.name, check=False)
            self._made = False
        _run("ip", "link", "del", self._host_if, check=False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
