"""Import slots (``sandbox/slots.py``): at most ``n`` request threads import a file at once, in
arrival order, none waits longer than its patience, and the knobs' deliberate sleeps are taken
without a slot. The importer holds one for each file's work. Nothing here asserts on time: the
waits are sequenced with events and the queue's own state."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from sandbox_helpers import session

from xnatio.sandbox import importer
from xnatio.sandbox.importer import DicomImport, ImportParams
from xnatio.sandbox.knobs import KnobBox, Knobs
from xnatio.sandbox.slots import Slots
from xnatio.sandbox.store import Store

LONG = 30.0  # a patience no test reaches


def _until(check: Callable[[], object], what: str) -> None:
    """Wait (polling) for a state another thread reaches; fails after a generous bound."""
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def _holder(slots: Slots, go: threading.Event, order: list[str], name: str) -> threading.Thread:
    """A thread that takes a slot, notes its name, and keeps it until ``go`` is set."""

    def run() -> None:
        with slots.slot() as got:
            order.append(name if got else name + " (no slot)")
            go.wait(10)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def test_no_more_than_n_threads_hold_a_slot_and_all_get_one() -> None:
    slots = Slots(2, patience=LONG)
    go = threading.Event()
    order: list[str] = []
    threads = [_holder(slots, go, order, f"t{i}") for i in range(5)]
    _until(lambda: len(slots._waiters) == 3, "three threads queue behind two holders")
    assert len(order) == 2
    go.set()
    for t in threads:
        t.join(10)
    assert sorted(order) == [f"t{i}" for i in range(5)]
    assert (slots.granted, slots.handed_over, slots.impatient) == (2, 3, 0)
    assert slots._free == 2 and not slots._waiters


def test_a_released_slot_goes_to_the_longest_waiter_not_to_a_newcomer() -> None:
    slots = Slots(1, patience=LONG)
    assert slots.acquire()
    gates = {name: threading.Event() for name in "abc"}
    order: list[str] = []
    threads = []
    for queued, name in enumerate("ab", 1):  # a, then b, queue in that order
        threads.append(_holder(slots, gates[name], order, name))
        _until(lambda q=queued: len(slots._waiters) == q, f"{name} queues")
    slots.release()  # hands over to a: the pool stays empty for a newcomer
    _until(lambda: order == ["a"], "a gets the slot")
    threads.append(_holder(slots, gates["c"], order, "c"))
    _until(lambda: len(slots._waiters) == 2, "c queues behind b")
    gates["a"].set()
    _until(lambda: order == ["a", "b"], "b, not c, gets a's slot")
    gates["b"].set()
    gates["c"].set()
    for t in threads:
        t.join(10)
    assert order == ["a", "b", "c"]


def test_a_thread_out_of_patience_goes_ahead_without_a_slot() -> None:
    slots = Slots(1, patience=0.01)
    assert slots.acquire()
    go = threading.Event()
    order: list[str] = []
    t = _holder(slots, go, order, "late")
    _until(lambda: order, "the late thread goes ahead")
    assert order == ["late (no slot)"] and slots.impatient == 1
    go.set()
    t.join(10)
    assert not slots._waiters and slots._free == 0  # it gave back nothing it did not hold
    slots.release()
    assert slots._free == 1


def test_paused_lets_another_thread_work_and_takes_a_slot_back() -> None:
    slots = Slots(1, patience=LONG)
    go = threading.Event()
    order: list[str] = []
    with slots.slot():
        with slots.paused():
            assert not slots.held()
            t = _holder(slots, go, order, "other")
            _until(lambda: order == ["other"], "another thread takes the paused slot")
            go.set()  # it finishes and hands the slot back over
            t.join(10)
        assert slots.held()
    assert not slots.held() and slots._free == 1


def test_a_held_slot_is_not_taken_twice_and_no_limit_never_waits() -> None:
    slots = Slots(1, patience=LONG)
    with slots.slot() as outer, slots.slot() as inner:
        assert outer and inner and slots._free == 0
    assert slots._free == 1 and slots.granted == 1
    unlimited = Slots(0)
    with unlimited.slot() as got, unlimited.paused():
        assert not got and not unlimited.held()


# -- the importer ------------------------------------------------------------------------------
DEST = {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}


class _Watching(Slots):
    """Slots that note, for every file's bytes read, whether the reader held a slot."""

    def __init__(self) -> None:
        super().__init__(1, patience=LONG)
        self.reads_held: list[bool] = []


class _Entry(io.BytesIO):
    def __init__(
        self, data: bytes, slots: _Watching, on_read: Callable[[], object] = lambda: None
    ) -> None:
        super().__init__(data)
        self._slots = slots
        self._on_read = on_read

    def read(self, n: int | None = -1, /) -> bytes:
        self._slots.reads_held.append(self._slots.held())
        self._on_read()
        return super().read(n)


def _import(store: Store, slots: _Watching, files: list[bytes], knobs: Knobs) -> DicomImport:
    def entries() -> Iterator[tuple[str, IO[bytes]]]:
        for i, data in enumerate(files):
            yield f"f{i}.dcm", _Entry(data, slots)

    p = ImportParams.from_params(DEST, "application/zip")
    job = DicomImport(store, KnobBox(knobs), p, "/data/services/import", slots=slots)
    job.run(entries())
    return job


def test_the_importer_does_each_files_work_holding_a_slot(store: Store, tmp_path: Path) -> None:
    s = session(tmp_path, series=1, instances=3)
    files = [p.read_bytes() for p in s.instances.values()]
    slots = _Watching()
    job = _import(store, slots, files, Knobs())
    assert job.files_written == 3
    assert slots.reads_held and all(slots.reads_held)
    assert slots.granted == 3 and slots._free == 1 and not slots.held()


def test_the_per_file_knob_sleeps_without_a_slot(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = session(tmp_path, series=1, instances=3)
    files = [p.read_bytes() for p in s.instances.values()]
    slots = _Watching()
    knobs = KnobBox(Knobs())
    held_while_sleeping: list[bool] = []

    def sleep(seconds: float) -> None:
        held_while_sleeping.append(slots.held())

    def entries() -> Iterator[tuple[str, IO[bytes]]]:
        # The knob is set while the first file is read (its slot held).
        yield "f0.dcm", _Entry(files[0], slots, lambda: knobs.set(per_file_ms=5))
        for i, data in enumerate(files[1:], 1):
            yield f"f{i}.dcm", _Entry(data, slots)

    monkeypatch.setattr(importer.time, "sleep", sleep)
    p = ImportParams.from_params(DEST, "application/zip")
    job = DicomImport(store, knobs, p, "/data/services/import", slots=slots)
    job.run(entries())
    assert job.files_written == 3
    # The file read when the knob was set sleeps without its slot and takes one back for the
    # write (granted twice); the next ones, with the knob already on, take none (the knobs
    # that sleep stand for parallel costs).
    assert held_while_sleeping == [False, False, False]
    first = slots.reads_held[: slots.reads_held.index(False)]
    assert len(first) >= 2 and slots.granted == 2
    assert not any(slots.reads_held[len(first) :])
    assert slots._free == 1


@pytest.mark.parametrize("knob", [{"bandwidth_mbps": 1000.0}, {"per_file_ms": 1.0}])
def test_with_a_knob_that_sleeps_no_slot_is_taken(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, knob: dict[str, float]
) -> None:
    # The bandwidth cap sleeps inside the body reads, per_file_ms per file: parallel costs.
    monkeypatch.setattr(importer.time, "sleep", lambda seconds: None)
    s = session(tmp_path, series=1, instances=2)
    files = [p.read_bytes() for p in s.instances.values()]
    slots = _Watching()
    job = _import(store, slots, files, Knobs(**knob))  # type: ignore[arg-type]
    assert job.files_written == 2
    assert slots.granted == 0 and not any(slots.reads_held)
