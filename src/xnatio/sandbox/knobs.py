"""Knobs: make the sandbox behave like a distant, busy or failing XNAT.

Performance knobs (``latency_ms``, ``per_file_ms``, ``archive_ms``, ``bandwidth_mbps``) shape every
request; fault knobs (``fail_next``, ``reset_next``, ``hang_next``, ``drop_response_next``,
``disk_full``, ``expire_sessions``) inject the failures an uploader must survive. Counted fault
knobs decrement as they fire and can be limited to paths starting with ``fault_path`` (for example
``/data/services/import``), so a test can fault uploads without faulting the login.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass
class Knobs:
    """Settable at start (``SandboxServer(knobs=…)``, ``xio sandbox`` flags) and while running
    (``SandboxServer.set_knobs(**fields)`` or ``POST /_sandbox/knobs`` with a JSON object).
    """

    latency_ms: float = 0.0
    """Added to every request before it is handled (a far-away server)."""
    per_file_ms: float = 0.0
    """Processing time per DICOM file imported (XNAT parses and rewrites each one)."""
    archive_ms: float = 0.0
    """Extra time one archive operation takes; widens the window of the archive races."""
    build_ms: float = 0.0
    """Time the idle builder spends building a session (QUEUED_BUILDING → BUILDING → READY);
    files arriving meanwhile make it RECEIVING_INTERRUPT, then RECEIVING (facts 3.2)."""
    archive_timeout_seconds: float = 600.0
    """XNAT's ``sessionArchiveTimeoutInterval``: an archive (commit, archive service) still
    running after this long answers 500 "…did not complete within the configured timeout
    interval." while the archive goes on and completes (facts 3.3, 3.4; QBIC:140-170)."""
    bandwidth_mbps: float = 0.0
    """Cap, in megabits per second, on reading request bodies, shared by all requests; 0 = none."""
    fail_next: int = 0
    """The next N matching requests fail with ``fail_status`` (after their body was read)."""
    fail_status: int = 503
    retry_after: float | None = None
    """Seconds sent as ``Retry-After`` with 429/503 faults; None sends no header."""
    reset_next: int = 0
    """The next N matching requests have their connection reset in the middle of the body."""
    hang_next: int = 0
    """The next N matching requests get no answer for ``hang_seconds``, then a closed socket."""
    hang_seconds: float = 30.0
    drop_response_next: int = 0
    """The next N matching requests are handled in full (the server does the work), then their
    connection is reset instead of answered: a success the client never hears of."""
    disk_full: bool = False
    """Writes fail as on a full disk; XNAT answers that as every import data error, 400
    "unable to read DICOM object NAME" (facts 1.4), never 507."""
    expire_sessions: bool = False
    """One-shot: setting it to true invalidates every JSESSION now (then it reads false again)."""
    session_timeout: float | None = None
    """Idle timeout of JSESSIONs in seconds; None keeps the server's setting."""
    site_anonymization: bool = True
    """XNAT's default site-wide anonymization script, enabled by default (facts 1.7):
    ``(0008,1030) := project`` (unless Unassigned), ``(0010,0010) := subject``,
    ``(0010,0020) := session``, run on each file at receipt unless ``prevent_anon=true``.
    Also ``SandboxServer.site_anon``; ``xio sandbox --no-site-anon`` /
    ``SandboxServer(site_anon=False)`` / ``PUT /data/config/anon/script?status=disabled`` turn
    it off."""
    reencode: bool = True
    """Every stored file is re-encoded on receipt (regenerated file meta, header re-serialized,
    the rest verbatim), so the stored MD5 is not the uploaded file's (facts 1.7). Off only to
    model a server whose bytes are the client's (with the site script off too)."""
    auto_archive_projects: list[str] = field(default_factory=list)
    """Projects whose prearchive setting is auto-archive (commit answers 301 + archive URI)."""
    reject_series: list[str] = field(default_factory=list)
    """Series Numbers a series import filter (or a site script's ``reject``) drops at receipt:
    their files are read and not stored, the request still answers 200, with no URI when every
    file was dropped (facts 1.3: GDI:193-200, 397-400)."""
    build_idle_seconds: float = 300.0
    """XNAT's session idle interval (default 300 s, facts 3.2): a RECEIVING row untouched this
    long is built (and auto-archived by the 3.2 rule); the builder runs every N/5 s, as XNAT's
    60 s for 300. ``xio sandbox --idle-seconds N``."""
    redirect_status: int = 0
    """A proxy in front of XNAT: every matching request (``fault_path``) is answered with this
    3xx status (301, 302, 303, 307, 308) and ``Location: redirect_to`` + the request's path and
    query (an http→https redirect); 0 = off."""
    redirect_to: str = ""
    """Base URL redirects point to (e.g. ``https://127.0.0.1:PORT``); empty = the login page
    ``{context path}/app/template/Login.vm`` of this server (a redirect to a login page)."""
    login_page: bool = False
    """A single-sign-on proxy: every matching request is answered 200 with an HTML login page."""
    fault_path: str = ""
    """Counted fault knobs and ``disk_full`` apply only to paths starting with this prefix."""
    overload_inflight: int = 0
    """A server that is full: a request arriving while this many are already in flight is
    answered 503 at once (with ``Retry-After`` if ``retry_after`` is set); 0 = never."""

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_INT_FIELDS = {
    "fail_next",
    "fail_status",
    "reset_next",
    "hang_next",
    "drop_response_next",
    "redirect_status",
    "overload_inflight",
}
_FLOAT_FIELDS = {
    "latency_ms",
    "per_file_ms",
    "archive_ms",
    "archive_timeout_seconds",
    "build_ms",
    "bandwidth_mbps",
    "hang_seconds",
    "build_idle_seconds",
}


def coerce_knobs(values: dict[str, Any]) -> dict[str, Any]:
    """Validate and convert JSON/CLI values for ``Knobs`` fields; unknown names raise ValueError."""
    out: dict[str, Any] = {}
    unknown = set(values) - Knobs.field_names()
    if unknown:
        raise ValueError(f"unknown knob(s): {', '.join(sorted(unknown))}")
    for name, value in values.items():
        if name in _INT_FIELDS:
            out[name] = int(value)
        elif name in _FLOAT_FIELDS:
            out[name] = float(value)
        elif name in {
            "disk_full",
            "expire_sessions",
            "site_anonymization",
            "reencode",
            "login_page",
        }:
            out[name] = value if isinstance(value, bool) else str(value).lower() in {"1", "true"}
        elif name in {"retry_after", "session_timeout"}:
            out[name] = None if value is None else float(value)
        elif name in ("auto_archive_projects", "reject_series"):
            out[name] = [str(v) for v in value]
        else:
            out[name] = str(value)
    return out


class KnobBox:
    """Thread-safe holder of the live knobs, the fault counters, and request statistics."""

    def __init__(self, knobs: Knobs | None = None) -> None:
        self._lock = threading.Lock()
        self._knobs = replace(knobs) if knobs is not None else Knobs()
        self._bw_next = 0.0  # when the bandwidth "pipe" is free again (monotonic seconds)
        self.stats: Counter[str] = Counter()
        self._inflight = 0  # requests being handled now (sandbox administration excluded)
        self._inflight_peak = 0

    def get(self) -> Knobs:
        with self._lock:
            return replace(
                self._knobs,
                auto_archive_projects=list(self._knobs.auto_archive_projects),
                reject_series=list(self._knobs.reject_series),
            )

    @property
    def live(self) -> Knobs:
        """The live knobs themselves, without a copy, for a quick look (never to be changed:
        ``set`` swaps the whole object, so a look sees one consistent set)."""
        return self._knobs

    def set(self, **values: Any) -> Knobs:
        clean = coerce_knobs(values)
        with self._lock:
            self._knobs = replace(self._knobs, **clean)
            return replace(self._knobs)

    def take(self, counter: str, path: str) -> bool:
        """Consume one unit of a counted fault knob if it is armed and scoped to ``path``."""
        with self._lock:
            if not path.startswith(self._knobs.fault_path):
                return False
            left = getattr(self._knobs, counter)
            if left <= 0:
                return False
            setattr(self._knobs, counter, left - 1)
            self.stats[f"fault.{counter}"] += 1
            return True

    def disk_full_for(self, path: str) -> bool:
        if not self._knobs.disk_full:  # (set() swaps the whole object: no lock to look)
            return False
        with self._lock:
            return self._knobs.disk_full and path.startswith(self._knobs.fault_path)

    def throttle(self, nbytes: int) -> None:
        """Account ``nbytes`` of body against the shared bandwidth cap (sleeps as needed)."""
        if self._knobs.bandwidth_mbps <= 0:  # no cap: every body read passes without the lock
            return
        with self._lock:
            mbps = self._knobs.bandwidth_mbps
            if mbps <= 0:
                return
            now = time.monotonic()
            start = max(now, self._bw_next)
            self._bw_next = start + nbytes * 8 / (mbps * 1e6)
            wait = self._bw_next - now
        if wait > 0:
            time.sleep(wait)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def enter(self) -> int:
        """A request starts being handled; returns how many are in flight with it."""
        with self._lock:
            self._inflight += 1
            self._inflight_peak = max(self._inflight_peak, self._inflight)
            return self._inflight

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1

    def reset_peak(self) -> None:
        """Start a new measurement: the peak becomes what is in flight now."""
        with self._lock:
            self._inflight_peak = self._inflight

    def stats_json(self) -> dict[str, int]:
        """Request counters, plus ``inflight`` (requests being handled now) and
        ``inflight_peak`` (the most handled at once since start or the last reset)."""
        with self._lock:
            out = dict(sorted(self.stats.items()))
            out["inflight"], out["inflight_peak"] = self._inflight, self._inflight_peak
            return out
