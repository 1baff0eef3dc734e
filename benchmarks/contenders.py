"""The contenders: how each tool is invoked, and how its result is checked on the receiver.

Every contender is a real command line a user would type (or the closest to it), run as a child
process with a fresh ``TMPDIR`` and ``HOME``. A contender that cannot run here raises
:class:`Unavailable` with the reason and how to fix it; the harness reports it as failed, never
drops it silently. After each run the receiver is asked how many files it holds: a benchmark of a
broken upload is worthless.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.data import Dataset, cache_root
from benchmarks.measure import Measured
from benchmarks.servers import STORESCU, Sandbox, StoreSCP

XNATCTL_VERSION = "0.6.0"


class Unavailable(Exception):
    """This contender cannot run on this machine (the message says why and how to fix it)."""


@dataclass
class RunContext:
    """Everything one run of one contender needs; ``workdir`` is fresh for every run."""

    dataset: Dataset
    workdir: Path
    project: str
    subject: str
    label: str
    workers: int
    sandbox: Sandbox | None = None
    scp: StoreSCP | None = None
    auth_sandbox: Sandbox | None = None
    tar: Path | None = None
    dcm_view: Path | None = None  # the same files named *.dcm, for tools that need extensions

    @property
    def tmp(self) -> Path:
        return self.workdir / "client-tmp"

    @property
    def home(self) -> Path:
        return self.workdir / "client-home"


@dataclass
class Invocation:
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin_text: str | None = None
    shown: str = ""  # the command as documented (no secrets)


@dataclass
class Checked:
    """The receiver's view of a run: did everything land?"""

    ok: bool
    error: str = ""
    landed: int | None = None
    inner_s: float | None = None  # time measured inside the process, where that is the metric
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Contender:
    name: str
    summary: str
    prepare: Callable[[], None]  # once per harness run; raises Unavailable
    build: Callable[[RunContext], Invocation]
    check: Callable[[RunContext, Measured], Checked]


def nothing() -> None:
    return None


def _last_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


def _failure(m: Measured) -> str:
    if m.timed_out:
        return f"timed out after {m.wall_s:.0f} s"
    lines = [ln.strip() for ln in m.stderr.splitlines() if ln.strip()]
    # The first line often says what went wrong, the last what to do (curl, click): keep both.
    why = " / ".join(dict.fromkeys([lines[0], lines[-1]]))[:400] if lines else ""
    return f"exit code {m.returncode}: {why or _last_line(m.stdout) or 'no output'}"


ARCHIVE_WAIT_S = 120.0
DIRECT_PENDING = "direct-archive pending"


def check_archived(ctx: RunContext, m: Measured) -> Checked:
    """The run succeeded and the server's archive holds every file of the dataset."""
    assert ctx.sandbox is not None
    if m.returncode != 0:
        return Checked(False, _failure(m))
    try:
        landed, note = ctx.sandbox.count_archived(ctx.project, ctx.subject, ctx.label)
    except Exception as exc:  # any failure to read back is the run's failure
        return Checked(False, f"could not count files on the server: {exc}")
    expected = ctx.dataset.files
    # A Direct-Archive upload (xnatctl's default) is archived only after XNAT's idle interval
    # (facts 1.6): at least 5 minutes on a real XNAT, ARCHIVE_IDLE_S on the harness's sandbox.
    # The run's time stops when the command exits (in the peer's favour); how long the archive
    # took to show the files after that is kept beside it.
    waited = 0.0
    started = time.monotonic()
    while landed != expected and note.startswith(DIRECT_PENDING):
        if time.monotonic() - started > ARCHIVE_WAIT_S:
            break
        time.sleep(0.5)
        try:
            landed, note = ctx.sandbox.count_archived(ctx.project, ctx.subject, ctx.label)
        except Exception as exc:
            return Checked(False, f"could not count files on the server: {exc}")
        waited = time.monotonic() - started
    details = {"archived_after_exit_s": round(waited, 1)} if waited else {}
    if landed != expected:
        more = f" ({note})" if note else ""
        return Checked(
            False, f"server archive holds {landed} of {expected} files{more}", landed, None, details
        )
    return Checked(True, landed=landed, details=details)


def check_received(ctx: RunContext, m: Measured) -> Checked:
    """The run succeeded and storescp wrote every file of the dataset."""
    assert ctx.scp is not None
    landed = ctx.scp.count_received()
    expected = ctx.dataset.files
    if m.returncode != 0:
        return Checked(False, f"{_failure(m)} ({landed} of {expected} files received)", landed)
    if landed != expected:
        return Checked(False, f"storescp received {landed} of {expected} files", landed)
    return Checked(True, landed=landed)


# --- xio ---------------------------------------------------------------------------------------


def _with_xio_report(
    check: Callable[[RunContext, Measured], Checked],
) -> Callable[[RunContext, Measured], Checked]:
    """Also keep what xio's ``--json`` result says of itself: its own upload time (``duration_s``,
    which leaves out start-up, discovery and the read-back verification) and its verdict."""

    def checked(ctx: RunContext, m: Measured) -> Checked:
        result = check(ctx, m)
        try:
            report = json.loads(m.stdout)
        except ValueError:
            return result
        if isinstance(report, dict):
            for key in ("status", "duration_s", "verified"):
                if key in report:
                    result.details[f"xio_{key}"] = report[key]
        return result

    return checked


def _xio() -> list[str]:
    # The installed console script of the checkout under test, next to this interpreter.
    exe = Path(sys.executable).with_name("xio")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "xnatio"]


def _xio_rest(extra: list[str], shown: str) -> Callable[[RunContext], Invocation]:
    def build(ctx: RunContext) -> Invocation:
        assert ctx.sandbox is not None
        cmd = [
            *_xio(),
            "upload-dicom",
            ctx.project,
            ctx.subject,
            ctx.label,
            str(ctx.dataset.path),
            "--server",
            ctx.sandbox.url,
            "--user",
            ctx.sandbox.user,
            "--json",
            "-q",
            *extra,
        ]
        return Invocation(cmd, env={"XNAT_PASSWORD": ctx.sandbox.password}, shown=shown)

    return build


def xio_rest(workers: int) -> Contender:
    args = ["--num-batches", str(workers), "--upload-workers", str(workers)]
    return Contender(
        name="xio",
        summary="xio upload-dicom P S E DIR --server URL --user admin --json -q "
        f"--num-batches {workers} --upload-workers {workers} (password in XNAT_PASSWORD)",
        prepare=nothing,
        build=_xio_rest(args, "xio upload-dicom ... " + " ".join(args)),
        check=_with_xio_report(check_archived),
    )


def xio_rest_no_verify(workers: int) -> Contender:
    args = ["--num-batches", str(workers), "--upload-workers", str(workers), "--no-verify"]
    return Contender(
        name="xio --no-verify",
        summary="xio upload-dicom P S E DIR --server URL --user admin --json -q "
        f"--num-batches {workers} --upload-workers {workers} --no-verify (no read-back after "
        "the commit, like curl and xnatctl)",
        prepare=nothing,
        build=_xio_rest(args, "xio upload-dicom ... " + " ".join(args)),
        check=_with_xio_report(check_archived),
    )


def xio_rest_uncompressed(workers: int) -> Contender:
    """xio as installed but ``--compress never`` (the tar): the side-by-side of issue 16."""
    args = ["--num-batches", str(workers), "--upload-workers", str(workers), "--compress", "never"]
    return Contender(
        name="xio --compress never",
        summary="xio upload-dicom P S E DIR --server URL --user admin --json -q "
        f"--num-batches {workers} --upload-workers {workers} --compress never (the tar, as "
        "before issue 16)",
        prepare=nothing,
        build=_xio_rest(args, "xio upload-dicom ... " + " ".join(args)),
        check=_with_xio_report(check_archived),
    )


def xio_sequential() -> Contender:
    args = ["--num-batches", "1", "--upload-workers", "1", "--no-verify"]
    return Contender(
        name="sequential",
        summary="xio upload-dicom P S E DIR --num-batches 1 --upload-workers 1 --no-verify "
        "(one archive, one request, no read-back)",
        prepare=nothing,
        build=_xio_rest(args, "xio upload-dicom ... " + " ".join(args)),
        check=_with_xio_report(check_archived),
    )


def xio_cstore(associations: int) -> Contender:
    def build(ctx: RunContext) -> Invocation:
        assert ctx.scp is not None
        cmd = [
            *_xio(),
            "upload-dicom",
            ctx.project,
            ctx.subject,
            ctx.label,
            str(ctx.dataset.path),
            "--transport",
            "dicom-store",
            "--dicom-host",
            "127.0.0.1",
            "--dicom-port",
            str(ctx.scp.port),
            "--dicom-called-aet",
            ctx.scp.aet,
            "--num-batches",
            str(associations),
            "--json",
            "-q",
        ]
        return Invocation(cmd)

    return Contender(
        name="xio",
        summary=f"xio upload-dicom P S E DIR --transport dicom-store --num-batches {associations}",
        prepare=nothing,
        build=build,
        check=_with_xio_report(check_received),
    )


# --- curl: the machine's limit -----------------------------------------------------------------


def _require_curl() -> None:
    if shutil.which("curl") is None:
        raise Unavailable("curl is not installed (apt-get install curl)")


def curl_single_tar() -> Contender:
    def build(ctx: RunContext) -> Invocation:
        assert ctx.sandbox is not None and ctx.tar is not None
        p, s, e = ctx.project, ctx.subject, ctx.label
        # dest=/archive/... makes XNAT build and archive the session within this one request
        # (xnat-api.md section 1), the same end state xio reaches with its final commit.
        url = (
            f"{ctx.sandbox.url}/data/services/import?import-handler=DICOM-zip"
            f"&PROJECT_ID={p}&SUBJECT_ID={s}&EXPT_LABEL={e}&inbody=true"
            f"&dest=/archive/projects/{p}/subjects/{s}/experiments/{e}"
        )
        # Credentials through a config file on stdin, never on the command line.
        config = f'user = "{ctx.sandbox.user}:{ctx.sandbox.password}"\n'
        cmd = [
            "curl",
            "-sS",
            "--fail-with-body",
            "-K",
            "-",
            "-H",
            "Content-Type: application/x-tar",
            # No "Expect: 100-continue" round trip before the body.
            "-H",
            "Expect:",
            # --upload-file streams the file; --data-binary @FILE reads it into memory first
            # and refuses files over 1 GB ("option --data-binary: out of memory", curl 7.88).
            "--upload-file",
            str(ctx.tar),
            "-X",
            "POST",
            url,
        ]
        return Invocation(cmd, stdin_text=config)

    return Contender(
        name="curl",
        summary="curl -X POST --upload-file session.tar -H 'Content-Type: application/x-tar' "
        "'URL/data/services/import?import-handler=DICOM-zip&PROJECT_ID=P&SUBJECT_ID=S"
        "&EXPT_LABEL=E&inbody=true&dest=/archive/projects/P/subjects/S/experiments/E' "
        "(one tar of the whole session, built once beforehand, not timed)",
        prepare=_require_curl,
        build=build,
        check=check_archived,
    )


# --- xnatctl (PyPI), in its own virtual environment --------------------------------------------


def xnatctl_venv() -> Path:
    return cache_root() / "venv-xnatctl"


def _xnatctl_exe() -> Path:
    return xnatctl_venv() / "bin" / "xnatctl"


def prepare_xnatctl() -> None:
    """Install xnatctl from PyPI into benchmarks/.cache/venv-xnatctl (once)."""
    venv = xnatctl_venv()
    marker = venv / f"xnatctl-{XNATCTL_VERSION}.installed"
    if marker.exists() and _xnatctl_exe().exists():
        return
    if sys.version_info < (3, 11):
        raise Unavailable("xnatctl needs Python >= 3.11")
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"xnatctl=={XNATCTL_VERSION}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            why = _last_line(done.stderr) or _last_line(done.stdout)
            raise Unavailable(f"could not install xnatctl=={XNATCTL_VERSION} from PyPI: {why}")
    marker.touch()


def _xnatctl_env(server: Sandbox, home: Path) -> dict[str, str]:
    return {
        "XNAT_URL": server.url,
        "XNAT_USER": server.user,
        "XNAT_PASS": server.password,
        "XNAT_NO_UPDATE_CHECK": "1",
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
    }


def xnatctl_rest(workers: int) -> Contender:
    def build(ctx: RunContext) -> Invocation:
        assert ctx.sandbox is not None
        cmd = [
            str(_xnatctl_exe()),
            "session",
            "upload",
            str(ctx.dcm_view or ctx.dataset.path),
            "-P",
            ctx.project,
            "-S",
            ctx.subject,
            "-E",
            ctx.label,
            "--workers",
            str(workers),
            "-o",
            "json",
        ]
        return Invocation(cmd, env=_xnatctl_env(ctx.sandbox, ctx.home))

    return Contender(
        name="xnatctl",
        summary=f"xnatctl session upload DIR -P P -S S -E E --workers {workers} "
        f"(xnatctl {XNATCTL_VERSION} from PyPI; its defaults: tar, direct archive, "
        "overwrite delete)",
        prepare=prepare_xnatctl,
        build=build,
        check=check_archived,
    )


def xnatctl_cstore(associations: int) -> Contender:
    def build(ctx: RunContext) -> Invocation:
        assert ctx.scp is not None
        if ctx.auth_sandbox is None:
            raise Unavailable("xnatctl's upload-dicom logs in to XNAT first: no server for that")
        cmd = [
            str(_xnatctl_exe()),
            "session",
            "upload-dicom",
            str(ctx.dcm_view or ctx.dataset.path),
            "--host",
            "127.0.0.1",
            "--port",
            str(ctx.scp.port),
            "--called-aet",
            ctx.scp.aet,
            "--workers",
            str(associations),
            "-o",
            "json",
        ]
        return Invocation(cmd, env=_xnatctl_env(ctx.auth_sandbox, ctx.home))

    return Contender(
        name="xnatctl",
        summary=f"xnatctl session upload-dicom DIR --host H --port N --called-aet XNAT "
        f"--workers {associations} (it logs in to XNAT over REST first, so a sandbox server "
        "runs beside storescp)",
        prepare=prepare_xnatctl,
        build=build,
        check=check_received,
    )


# --- single-association C-STORE peers ----------------------------------------------------------


def _require_dcmtk() -> None:
    if not os.access(STORESCU, os.X_OK):
        raise Unavailable(f"dcmtk is not installed ({STORESCU} missing): apt-get install dcmtk")


def dcmtk_storescu() -> Contender:
    def build(ctx: RunContext) -> Invocation:
        assert ctx.scp is not None
        cmd = [
            STORESCU,  # absolute: pynetdicom's own ``storescu`` script shadows it on PATH
            "-aet",
            "STORESCU",
            "-aec",
            ctx.scp.aet,
            "+sd",  # scan directories
            "+r",  # recursively
            "127.0.0.1",
            str(ctx.scp.port),
            str(ctx.dataset.path),
        ]
        return Invocation(cmd)

    return Contender(
        name="dcmtk-storescu",
        summary="/usr/bin/storescu -aec XNAT +sd +r HOST PORT DIR (dcmtk, one association)",
        prepare=_require_dcmtk,
        build=build,
        check=check_received,
    )


def pynetdicom_parallel(associations: int) -> Contender:
    script = Path(__file__).resolve().parent / "pynetdicom_parallel.py"

    def build(ctx: RunContext) -> Invocation:
        assert ctx.scp is not None
        cmd = [
            sys.executable,
            str(script),
            str(ctx.dataset.path),
            "127.0.0.1",
            str(ctx.scp.port),
            ctx.scp.aet,
            str(associations),
        ]
        return Invocation(cmd)

    return Contender(
        name="pynetdicom-parallel",
        summary=f"benchmarks/pynetdicom_parallel.py: pynetdicom Association x {associations} "
        "threads (what xio's own upper-layer client replaces)",
        prepare=nothing,
        build=build,
        check=check_received,
    )


def pynetdicom_storescu() -> Contender:
    def build(ctx: RunContext) -> Invocation:
        assert ctx.scp is not None
        cmd = [
            sys.executable,
            "-m",
            "pynetdicom",
            "storescu",
            "127.0.0.1",
            str(ctx.scp.port),
            str(ctx.dataset.path),
            "-r",
            "-aet",
            "PYNETDICOM",
            "-aec",
            ctx.scp.aet,
        ]
        return Invocation(cmd)

    return Contender(
        name="pynetdicom-storescu",
        summary="python -m pynetdicom storescu HOST PORT DIR -r -aec XNAT (one association)",
        prepare=nothing,
        build=build,
        check=check_received,
    )


# --- discovery ---------------------------------------------------------------------------------

# Runs in a fresh interpreter; times discovery and planning alone (imports excluded).
_DISCOVER_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from xnatio.discover import discover
from xnatio.plan import plan_batches
t0 = time.perf_counter()
manifest = discover(Path(sys.argv[1]))
t1 = time.perf_counter()
batches = plan_batches(manifest, int(sys.argv[2]))
t2 = time.perf_counter()
print(json.dumps({
    "files": len(manifest.files), "skipped": len(manifest.skipped),
    "discover_s": t1 - t0, "plan_s": t2 - t1, "batches": len(batches),
}))
"""


def discover_api() -> Contender:
    def build(ctx: RunContext) -> Invocation:
        cmd = [sys.executable, "-c", _DISCOVER_SCRIPT, str(ctx.dataset.path), str(ctx.workers)]
        return Invocation(cmd)

    def check(ctx: RunContext, m: Measured) -> Checked:
        if m.returncode != 0:
            return Checked(False, _failure(m))
        try:
            out = json.loads(_last_line(m.stdout, limit=10_000))
        except ValueError:
            return Checked(False, f"unreadable output: {_last_line(m.stdout)!r}")
        if out["files"] != ctx.dataset.files:
            return Checked(False, f"discovered {out['files']} of {ctx.dataset.files} files")
        return Checked(
            True,
            landed=out["files"],
            inner_s=out["discover_s"] + out["plan_s"],
            details={k: out[k] for k in ("discover_s", "plan_s", "batches")},
        )

    return Contender(
        name="discover+plan",
        summary="xnatio.discover.discover(DIR) then xnatio.plan.plan_batches(manifest, 42), "
        "timed in a fresh process (interpreter start and imports excluded)",
        prepare=nothing,
        build=build,
        check=check,
    )


def xio_dry_run() -> Contender:
    def build(ctx: RunContext) -> Invocation:
        cmd = [
            *_xio(),
            "upload-dicom",
            ctx.project,
            ctx.subject,
            ctx.label,
            str(ctx.dataset.path),
            "--dry-run",
            "--json",
            "-q",
            "--server",
            "http://127.0.0.1:9",  # never contacted by a dry run
        ]
        return Invocation(cmd)

    def check(ctx: RunContext, m: Measured) -> Checked:
        if m.returncode != 0:
            return Checked(False, _failure(m))
        try:
            planned = int(json.loads(m.stdout)["totals"]["files"])
        except (ValueError, KeyError, TypeError):
            return Checked(False, f"no plan in the --json output: {_last_line(m.stdout)!r}")
        if planned != ctx.dataset.files:
            return Checked(False, f"planned {planned} of {ctx.dataset.files} files")
        return Checked(True, landed=planned)

    return Contender(
        name="xio --dry-run",
        summary="xio upload-dicom P S E DIR --dry-run --json (whole command: start-up, "
        "discovery, planning, printing the plan)",
        prepare=nothing,
        build=build,
        check=check,
    )


def xio_many_dry_run() -> Contender:
    """``xio upload-many ROOT --dry-run``: discovery, grouping and the plan of many studies
    (issue 12), the memory of which issue 16 item 4 bounds."""

    def build(ctx: RunContext) -> Invocation:
        cmd = [
            *_xio(),
            "upload-many",
            str(ctx.dataset.path),
            "--project",
            ctx.project,
            "--dry-run",
            "--settle",
            "0s",
            "--json",
            "--state-dir",
            str(ctx.workdir / "state"),
        ]
        return Invocation(cmd)

    def check(ctx: RunContext, m: Measured) -> Checked:
        if m.returncode != 0:
            return Checked(False, _failure(m))
        files = studies = 0
        for line in m.stdout.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("status") == "ready":
                studies += 1
                files += int(row.get("files", 0))
        if files != ctx.dataset.files:
            return Checked(False, f"planned {files} of {ctx.dataset.files} files")
        return Checked(True, landed=files, details={"studies": studies})

    return Contender(
        name="xio upload-many --dry-run",
        summary="xio upload-many ROOT --project P --dry-run --settle 0s --json (whole command: "
        "start-up, discovery of every root, grouping by study, the plan)",
        prepare=nothing,
        build=build,
        check=check,
    )
