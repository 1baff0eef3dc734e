"""One transfer's shared state and its bounded pool of workers (after s3transfer's
``TransferCoordinator`` and ``BoundedExecutor``).

* :class:`Coordinator` holds the one cancel path. Ctrl-C, SIGTERM (turned into KeyboardInterrupt by
  the CLI), a worker's unexpected exception (a progress or journal callback that raised)
  all end in :meth:`Coordinator.cancel`: the event workers check before each step is set, and every
  registered stopper runs, so a worker blocked on its socket wakes at once. Backoffs wait on the
  same event, so a cancel never waits one out.
* :class:`BoundedExecutor` takes a slot before ``submit`` and gives it back when the task is done:
  the producer blocks (in a lock acquire, which Ctrl-C interrupts) instead of queueing without
  limit, and at most ``max_workers`` tasks exist at once. The executor is a constructor argument,
  so a test can run the tasks serially in the calling thread.

Nothing here knows of DICOM or HTTP; the C-STORE sender and the REST engine both use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")
Stopper = Callable[[], None]


class Coordinator:
    """Cancel state of one transfer, shared by its workers; safe to use from any thread."""

    def __init__(self, event: threading.Event | None = None) -> None:
        # ``event``: a caller's own cancel flag (REST's ``cancel=``), so setting it from outside
        # is the same cancel as :meth:`cancel` for every check of :attr:`cancelled`.
        self._lock = threading.Lock()
        self._event = event if event is not None else threading.Event()
        self._stoppers: set[Stopper] = set()
        self._exception: BaseException | None = None

    @property
    def event(self) -> threading.Event:
        """Set once cancelled: for waits (a backoff) that a cancel must cut short."""
        return self._event

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def exception(self) -> BaseException | None:
        """The first fatal error a worker reported, if any (re-raised by the caller)."""
        return self._exception

    def cancel(self, exception: BaseException | None = None) -> None:
        """Stop everything now: set the event and run every registered stopper (once each)."""
        with self._lock:
            if exception is not None and self._exception is None:
                self._exception = exception
            self._event.set()
            stoppers, self._stoppers = list(self._stoppers), set()
        for stop in stoppers:
            stop()

    def add_stopper(self, stop: Stopper) -> None:
        """Register how to stop one in-flight operation; runs it at once if already cancelled."""
        with self._lock:
            if not self._event.is_set():
                self._stoppers.add(stop)
                return
        stop()

    def remove_stopper(self, stop: Stopper) -> None:
        with self._lock:
            self._stoppers.discard(stop)


class SerialExecutor(Executor):
    """Runs each task in the submitting thread: a deterministic replay of the pool for tests."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the caller's result() re-raises it, as with a pool
            future.set_exception(exc)
        return future


ExecutorFactory = Callable[[int], Executor]


def thread_pool(name: str) -> ExecutorFactory:
    def make(workers: int) -> Executor:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    return make


class BoundedExecutor:
    """At most ``max_workers`` tasks at once; ``submit`` blocks for a free slot."""

    def __init__(self, max_workers: int, executor: ExecutorFactory | None = None) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        self._slots = threading.BoundedSemaphore(max_workers)
        self._executor = (executor or thread_pool("worker"))(max_workers)
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        self._slots.acquire()
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)
        self._slots.release()

    def shutdown(self, *, cancel_futures: bool = False) -> None:
        """Wait for the running tasks to end (after a cancel, they end promptly).

        The tasks are waited for through their futures before the threads are joined: a Ctrl-C
        that interrupts ``Thread.join`` can leave that thread marked as ended while it still runs
        (seen on CPython 3.11), so a second shutdown after a cancel would not wait for it.
        """
        self._executor.shutdown(wait=False, cancel_futures=cancel_futures)
        with self._lock:
            pending = list(self._pending)
        wait(pending)
        self._executor.shutdown(wait=True)

    def __enter__(self) -> BoundedExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(cancel_futures=exc[0] is not None)
