"""``xio upload-many --watch``: keep running, and send each study once it has settled.

    loop: rescan the roots -> plan -> ManyRun.run (only new or unfinished studies are sent)
          -> heartbeat line -> sleep until the next rescan (or a file-system event, or SIGTERM)

**The periodic rescan is the truth.** File-system events (inotify on Linux, through the
``watchdog`` library) only wake the loop early; they are never needed for correctness, because
they are not delivered for changes made by other machines on a network file system (NFS, SMB)
and can overflow. Without ``watchdog``, or when it cannot watch a root, the loop simply polls
every ``interval`` seconds. When a study is still settling, the loop wakes when it should have
settled (at most ``interval`` later), so a study copied in is sent about ``--settle`` after its
last file was written.

SIGTERM (``ManyRun.drain``): no new study starts, the ones in flight finish, the loop ends and
``xio`` exits 0. A server that cannot be reached does not end the watch: the pass says so and
the next one tries again. Credentials refused or a configuration error end it (nothing would
change by waiting).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xnatio.errors import UnreachableError
from xnatio.many.ledger import FAILED, QUARANTINED, VERIFIED, WAITING
from xnatio.many.runner import ManyResult, ManyRun, StudyJob, StudyOutcome, jobs_of

log = logging.getLogger(__name__)

# After a file-system event, wait this long for more before rescanning (an export writes many
# files in a burst; one rescan for the burst is enough).
DEBOUNCE_SECONDS = 2.0


class Wakeup:
    """What ends the wait between two passes: the interval, a file-system event, a drain."""

    def __init__(self, drain: threading.Event) -> None:
        self.event = threading.Event()
        self.drain = drain

    def poke(self) -> None:
        self.event.set()

    def wait(self, seconds: float) -> str:
        deadline = time.monotonic() + max(0.0, seconds)
        while not self.drain.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return "interval"
            if self.event.wait(min(left, 0.5)):
                self.event.clear()
                # Let the burst end (still interruptible by a drain).
                self.drain.wait(min(DEBOUNCE_SECONDS, max(0.0, deadline - time.monotonic())))
                self.event.clear()
                return "change"
        return "drain"


def start_observer(roots: Sequence[Path], wake: Wakeup) -> Any:
    """A watchdog observer poking ``wake`` on any change under the roots; None when watchdog is
    missing or cannot watch (the loop then polls, which is always correct)."""
    try:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:  # pragma: no cover - watchdog is a dependency; polling still works
        log.info("watchdog is not installed: polling every interval")
        return None

    class Poke(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type not in ("opened", "closed_no_write"):
                wake.poke()

    observer = Observer()
    try:
        for root in roots:
            folder = root if root.is_dir() else root.parent
            observer.schedule(Poke(), str(folder), recursive=True)
        observer.daemon = True
        observer.start()
    except OSError as exc:  # inotify limits, a vanished root: polling is enough
        log.info("file-system events unavailable (%s): polling every interval", exc)
        return None
    return observer


def watch(
    run: ManyRun,
    make_plan: Callable[[], Any],
    *,
    roots: Sequence[Path],
    interval: float,
    say: Callable[[str], None],
    passes: int | None = None,
) -> ManyResult:
    """Run passes until ``run.drain`` is set (SIGTERM) or ``passes`` passes (tests); returns the
    latest outcome of every study seen, ``interrupted`` set when a drain ended it."""
    wake = Wakeup(run.drain)
    observer = start_observer(roots, wake)
    latest: dict[str, StudyOutcome] = {}
    started = time.monotonic()
    done = 0
    try:
        while not run.drain.is_set() and not run.cancel.is_set():
            jobs: list[StudyJob] = []
            try:
                jobs = jobs_of(make_plan())
                result = run.run(jobs)
            except UnreachableError as exc:
                say(f"pass failed: {exc}; trying again in {interval:.0f}s")
                result = ManyResult()
            for outcome in result.studies:
                latest[outcome.record.key] = outcome
            done += 1
            say(heartbeat(latest.values(), interval, observer is not None))
            if passes is not None and done >= passes:
                break
            wake.wait(next_wait(jobs, interval))
    finally:
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
    out = ManyResult(studies=list(latest.values()), duration=time.monotonic() - started)
    out.interrupted = run.drain.is_set()
    return out


def next_wait(jobs: Sequence[StudyJob], interval: float) -> float:
    """Until the next rescan: ``interval``, or sooner when a settling study settles sooner."""
    now = time.time()
    waits = [j.settles_at - now for j in jobs if j.settles_at > now]
    return min([interval, *(w + 0.5 for w in waits)])


def heartbeat(outcomes: Any, interval: float, events: bool) -> str:
    studies = list(outcomes)
    count = {s: sum(1 for o in studies if o.state == s) for s in (VERIFIED, WAITING, FAILED)}
    quarantined = sum(1 for o in studies if o.state == QUARANTINED)
    how = "file-system events and a rescan" if events else "a rescan"
    return (
        f"watching: {len(studies)} studies, {count[VERIFIED]} verified, {count[WAITING]} "
        f"waiting, {count[FAILED]} failed, {quarantined} quarantined; next: {how} within "
        f"{interval:.0f}s"
    )
