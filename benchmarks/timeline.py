"""Where the time goes between launch and the first import request (issue 16 item 4).

    python -m benchmarks.memprobe timeline 10000,100000 [--no-verify]

The parent starts a sandbox and a :class:`benchmarks.relay.FirstImportRelay`, then runs
``xio upload-dicom`` exactly as ``memprobe rss`` does, but through this module
(``python -m benchmarks.timeline -- ARGS``): before the CLI runs, the stages of the pipeline
are wrapped so that each call's start and end (``time.perf_counter``, one clock for every
process on Linux) are written to ``$TIMELINE_OUT`` as JSON lines. The parent prints them
relative to the launch, with the relay's first import request among them. With
``$TIMELINE_STOP`` (seconds), the client exits that long after its first import request starts.
With ``$TIMELINE_RSS`` (seconds), a thread also writes the process's
``VmRSS`` that often (``{"stage": "rss", "rss": bytes}``): where in the run the peak is reached.
Measurement only: nothing here changes what the stages do.
"""

from __future__ import annotations

import time

_BOOT = time.perf_counter()  # the interpreter is up and this module runs

import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

# (module, attribute path) of each stage to time; a missing one is ignored (the code moved).
STAGES = (
    ("xnatio.xnat.client", "XnatClient.__enter__"),
    ("xnatio.resume", "RunLocks.hold"),
    ("xnatio.discover", "discover"),
    ("xnatio.discover", "_walk"),
    ("xnatio.discover", "_collect"),  # archives; a folder's chunks go to _Collector.take
    ("xnatio.discover", "_Collector.finish"),  # the last chunk of a folder taken
    ("xnatio.discover", "check_single_study"),
    ("xnatio.transports.rest", "session_labels"),
    ("xnatio.preflight", "before_sending"),
    ("xnatio.journal", "Journal.__init__"),
    ("xnatio.journal", "Journal.open_run"),
    ("xnatio.journal", "manifest_fingerprint"),
    ("xnatio.journal", "JournalRun.split"),
    ("xnatio.journal", "JournalRun.changed_since_sent"),
    ("xnatio.transports.rest.transport", "RestTransport.on_server"),
    ("xnatio.transports.rest.transport", "RestTransport.send"),
    ("xnatio.transports.rest.transport", "server_rewrites"),
    ("xnatio.plan", "RestPlanner.plan"),
    ("xnatio.transports.rest.uploader", "RestUploader.upload"),
    ("xnatio.transports.rest.uploader", "UploadRun.of"),
    ("xnatio.xnat.client", "XnatClient.put_subject"),
    # After the first request (memprobe phases: where the peak RSS is reached)
    ("xnatio.transports.rest.send", "BatchSender.send_all"),
    ("xnatio.transports.rest.uploader", "RestUploader._commit"),
    ("xnatio.transports.rest.uploader", "RestUploader._result"),
    ("xnatio.transports.rest.transport", "RestTransport.commit"),
    ("xnatio.transports.rest.transport", "RestTransport.read_back"),
    ("xnatio.resume", "_finish"),
    ("xnatio.resume", "apply_verification"),
    ("xnatio.journal", "JournalRun.record_outcomes"),
    ("xnatio.journal", "JournalRun.record_verified"),
    ("xnatio.report", "account_for_skipped"),
    ("xnatio.cli.upload", "render_result"),
)

_lock = threading.Lock()
_out: Any = None


def _emit(record: dict[str, Any]) -> None:
    with _lock:
        _out.write(json.dumps(record) + "\n")
        _out.flush()


def _wrap(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _emit({"stage": name, "start": start, "end": time.perf_counter()})

    return timed


def _install() -> None:
    for module_name, attr in STAGES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner: Any = module
        *parents, leaf = attr.split(".")
        try:
            for p in parents:
                owner = getattr(owner, p)
            fn = getattr(owner, leaf)
        except AttributeError:
            continue
        setattr(owner, leaf, _wrap(attr, fn))


def _stop_after_first_import(grace: float) -> None:
    """Exit ``grace`` seconds after the first import request starts (the relay has seen it by
    then): the rest of the upload is not what is measured, and it would take minutes."""
    import requests.adapters

    send = requests.adapters.HTTPAdapter.send

    def watched(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.method == "POST" and "/services/import" in (request.url or ""):
            timer = threading.Timer(grace, os._exit, args=(0,))
            timer.daemon = True
            timer.start()
        return send(self, request, *args, **kwargs)

    requests.adapters.HTTPAdapter.send = watched  # type: ignore[method-assign]


def _sample_rss(interval: float) -> None:
    """Write this process's resident set size every ``interval`` seconds (from /proc)."""

    def run() -> None:
        while True:
            with open("/proc/self/status", "rb") as f:
                rss = next((int(x.split()[1]) * 1024 for x in f if x.startswith(b"VmRSS:")), 0)
            now = time.perf_counter()
            _emit({"stage": "rss", "start": now, "end": now, "rss": rss})
            time.sleep(interval)

    threading.Thread(target=run, name="timeline-rss", daemon=True).start()


def main() -> None:
    global _out
    _out = open(os.environ["TIMELINE_OUT"], "a")  # noqa: SIM115
    _emit({"stage": "interpreter up", "start": _BOOT, "end": _BOOT})
    start = time.perf_counter()
    from xnatio.cli.main import main as xio_main

    _install()
    if os.environ.get("TIMELINE_RSS"):
        _sample_rss(float(os.environ["TIMELINE_RSS"]))
    if os.environ.get("TIMELINE_STOP"):
        _stop_after_first_import(float(os.environ["TIMELINE_STOP"]))
    _emit({"stage": "import xnatio + timers", "start": start, "end": time.perf_counter()})
    argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    xio_main(argv)


if __name__ == "__main__":
    main()
