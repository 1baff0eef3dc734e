"""What an upload reports: the human summary, the ``--json`` result and the ``--report`` file.

The JSON result has a stable, versioned schema (``RESULT_SCHEMA``) so scripts can rely on it:
new keys may be added within a version, none are renamed or removed. Paths are reported as the
user gave them (relative to nothing, absolute if PATH was absolute).

Every file under PATH is accounted for: uploaded (or verified), skipped with a reason, or failed
with a reason. The human summary caps the lists it prints; ``--json`` lists every failed and
skipped file with its reason and every uploaded file by path; ``--report FILE`` writes one row per
file with all its fields.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from xnatio import __version__
from xnatio.errors import (
    EXIT_FILES_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    OutputError,
    UsageError,
    XnatioError,
)
from xnatio.models import (
    Batch,
    DicomFile,
    FileOutcome,
    FileTable,
    Manifest,
    Origin,
    Outcome,
    SkippedFile,
    UploadResult,
)
from xnatio.redact import printable

RESULT_SCHEMA = "xnatio.upload-result/1"
ALREADY_REASON = "already on the server"  # a file a re-run found on the server (xnatio.resume)
PLAN_SCHEMA = "xnatio.upload-plan/1"
REPORT_COLUMNS = ("path", "outcome", "reason", "sop_instance_uid", "series_uid", "size", "batch")

# How many failed / skipped files the human summary lists before "and N more".
SUMMARY_LIST_CAP = 20


def status_of(result: UploadResult) -> str:
    """``success`` (everything landed), ``pending`` (sent, XNAT has not archived it yet:
    Direct-Archive, facts 1.6), ``partial`` (some files failed) or ``failed``; ``error`` when
    the run's report could not be written (``output_error``), whatever the upload did."""
    if result.output_error:
        return "error"
    failed = result.failed
    if result.success and not failed and result.verified is not False:
        return "success"
    if result.pending and not failed:
        return "pending"
    if result.uploaded and failed:
        return "partial"
    return "failed"


def exit_code_of(result: UploadResult) -> int:
    """0 when every file that should have been sent landed, 2 when the report could not be
    written, else 1 (see ``xnatio.errors``)."""
    if result.output_error:
        return EXIT_USAGE
    return EXIT_OK if status_of(result) == "success" else EXIT_FILES_FAILED


def account_for_skipped(result: UploadResult, manifest: Manifest) -> UploadResult:
    """Add the manifest's skipped and duplicate files to ``result.files`` if the transport didn't.

    Both transports are given the manifest and may already list them; a path is never listed twice.
    """
    if not manifest.skipped and not manifest.duplicates:
        return result  # the usual case: no set of every listed path (MBs at 50,000 files)
    listed = {f.path for f in result.files}
    extra: list[FileOutcome] = []
    for s in _skipped_of(manifest):
        path = str(s.path)
        if path not in listed:
            listed.add(path)
            extra.append(
                FileOutcome(
                    path,
                    Outcome.SKIPPED,
                    reason=s.reason,
                    size=s.size,
                    sop_instance_uid=s.sop_instance_uid,
                    series_uid=s.series_uid,
                )
            )
    result.files.extend(extra)
    return result


def _skipped_of(manifest: Manifest) -> Iterable[SkippedFile]:
    yield from manifest.skipped
    yield from manifest.duplicates


def _sent_bytes(result: UploadResult) -> int:
    return sum(f.size for f in result.files if f.outcome is not Outcome.SKIPPED)


def result_to_dict(result: UploadResult, *, full: bool = False) -> dict[str, Any]:
    """The ``--json`` result. ``full=True`` gives every field of every uploaded file too."""
    data = _result_head(result)
    data["files"] = {name: list(items) for name, items in _result_files(result, full=full)}
    return data


def _result_head(result: UploadResult) -> dict[str, Any]:
    """Everything in the result but the per-file lists (which ``_result_files`` yields)."""
    uploaded = result.uploaded
    verified_count = sum(1 for f in uploaded if f.outcome is Outcome.VERIFIED)
    return {
        "schema": RESULT_SCHEMA,
        "xnatio_version": __version__,
        "upload_id": result.upload_id,
        "status": status_of(result),
        "exit_code": exit_code_of(result),
        "transport": result.transport,
        "project": result.project,
        "subject": result.subject,
        "session": result.session,
        "session_uri": result.session_uri,
        "session_uris": list(result.session_uris)
        or ([result.session_uri] if result.session_uri else []),
        "verified": result.verified,
        "totals": {
            "files": len(result.files),
            "bytes": _sent_bytes(result),
            "uploaded": len(uploaded),
            "verified": verified_count,
            "failed": sum(1 for f in result.files if f.outcome is Outcome.FAILED),
            "skipped": sum(1 for f in result.files if f.outcome is Outcome.SKIPPED),
            "uploaded_bytes": sum(f.size for f in uploaded),
        },
        "duration_s": round(result.duration, 3),
        "mb_per_s": round(result.mb_per_s, 6),
        "total_size_mb": round(result.total_size_mb, 6),
        "batches": {"total": result.batches_total, "failed": result.batches_failed},
        "studies": [
            {
                "study_uid": s.study_uid,
                "patient_id": s.patient_id,
                "files": s.file_count,
                "bytes": s.total_bytes,
            }
            for s in result.studies
        ],
        "errors": [printable(e) for e in result.errors],
        "warnings": [printable(w) for w in result.warnings],
        "notes": [printable(n) for n in result.notes],
        "pending": list(result.pending),
    }


def _result_files(result: UploadResult, *, full: bool) -> list[tuple[str, Iterator[object]]]:
    """The result's per-file lists, as generators: a 50,000-file session is written record by
    record instead of being held as 50,000 dicts plus their encoded text."""
    done = (Outcome.UPLOADED, Outcome.VERIFIED)
    files = result.files
    uploaded: Iterator[object] = (
        (_file_dict(f) for f in files if f.outcome in done)
        if full
        else (printable(f.path) for f in files if f.outcome in done)
    )
    return [
        ("failed", (_file_dict(f) for f in files if f.outcome is Outcome.FAILED)),
        ("skipped", (_file_dict(f) for f in files if f.outcome is Outcome.SKIPPED)),
        ("uploaded", uploaded),
    ]


def write_result_json(result: UploadResult, out: IO[str], *, full: bool = False) -> None:
    """Write ``result_to_json``'s text (``full``: the report's) to ``out`` piece by piece.

    The bytes are those of ``json.dumps(result_to_dict(result, full=full), indent=2)``: the
    head is encoded whole, each file record on its own, so memory does not grow with the
    number of files (json.dumps with an indent builds a list of every small chunk first).
    """
    head = _result_head(result)
    text = json.dumps(head, indent=2, ensure_ascii=False)
    out.write(text[:-2])  # up to the last value, without "\n}"
    out.write(',\n  "files": {')
    for n, (name, items) in enumerate(_result_files(result, full=full)):
        out.write(("," if n else "") + f"\n    {json.dumps(name)}: [")
        first = True
        for item in items:
            encoded = json.dumps(item, indent=2, ensure_ascii=False).replace("\n", "\n      ")
            out.write(("\n      " if first else ",\n      ") + encoded)
            first = False
        out.write("]" if first else "\n    ]")
    out.write("\n  }\n}")


def _file_dict(f: FileOutcome) -> dict[str, Any]:
    return {
        "path": printable(f.path),
        "outcome": f.outcome.value,
        "reason": printable(f.reason),
        "sop_instance_uid": f.sop_instance_uid,
        "series_uid": f.series_uid,
        "size": f.size,
        "batch": f.batch,
    }


def error_to_dict(exc: XnatioError) -> dict[str, Any]:
    """The ``--json`` result of a run that stopped on an error (usage, auth, unreachable)."""
    return {
        "schema": RESULT_SCHEMA,
        "xnatio_version": __version__,
        "status": "error",
        "exit_code": exc.exit_code,
        "error": printable(str(exc)),
    }


def result_to_json(result: UploadResult) -> str:
    out = io.StringIO()
    write_result_json(result, out)
    return out.getvalue()


def write_report(result: UploadResult, path: Path) -> None:
    """Write one row per file to ``path``: ``.csv`` as a table, anything else as JSON.

    The JSON form is the ``--json`` result with full per-file records for uploaded files too.
    The file names patients' files (and the JSON form their Patient IDs): it is written as
    :func:`write_private_file` writes, and a failure is :class:`OutputError` (exit 2).
    """
    path = Path(path)

    def csv_rows(fh: IO[str]) -> None:
        writer = csv.writer(fh)
        writer.writerow(REPORT_COLUMNS)
        for f in result.files:
            row = _file_dict(f)
            writer.writerow(["" if row[c] is None else row[c] for c in REPORT_COLUMNS])

    def json_doc(fh: IO[str]) -> None:
        write_result_json(result, fh, full=True)
        fh.write("\n")

    is_csv = path.suffix.lower() == ".csv"
    try:
        write_private_file(path, csv_rows if is_csv else json_doc, newline="" if is_csv else None)
    except OSError as exc:
        raise OutputError(
            f"cannot write report {path} ({exc.strerror or exc}); the summary above is what "
            "was done: run the same command again with another --report FILE to write it "
            "(nothing is sent twice)"
        ) from None


def write_private_file(
    path: Path, write: Callable[[IO[str]], None], *, newline: str | None = None
) -> None:
    """Write a file that holds patient data (reports, plans, ledgers): mode 0600, atomically
    (a temporary file in the same folder, then ``os.replace``), never through a symbolic link.

    A reader never sees half a report, a failure leaves what was there before, and a link
    planted at ``path`` (pointing at another user's file, or at a world-readable place) is
    refused rather than followed: ``os.replace`` would replace the link itself, but a link
    there is a sign something is wrong, so it is an error (:class:`UsageError`, exit 2).
    """
    path = Path(path)
    _refuse_link(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise UsageError(
            f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)}); "
            "reports name patients' files, so xio writes them only as regular files: "
            "remove the link or give another path"
        )


def check_report_path(path: Path) -> None:
    """Fail before any upload starts if the report could not be written at the end."""
    path = Path(path)
    _refuse_link(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"cannot write report {path}: folder {parent} does not exist")
    if path.is_dir():
        raise UsageError(f"cannot write report {path}: it is a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write report {path}: folder {parent} is not writable")


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _mb(n: int | float) -> str:
    return f"{n / 1e6:.1f} MB"


def _listing(title: str, files: Sequence[FileOutcome], cap: int) -> list[str]:
    if not files:
        return []
    lines = [f"{title} ({len(files)}):"]
    for f in files[:cap]:
        lines.append(f"  {f.path}: {f.reason or 'no reason given'}")
    if len(files) > cap:
        lines.append(f"  … and {len(files) - cap} more — use --report FILE or --json")
    return lines


def summary_text(result: UploadResult, *, cap: int = SUMMARY_LIST_CAP) -> str:
    """The end-of-run summary for people: totals first, then what failed and why."""
    uploaded, failed, skipped = result.uploaded, result.failed, result.skipped
    to_send = len(uploaded) + len(failed)
    dest = "/".join(x for x in (result.project, result.subject, result.session) if x) or "XNAT"
    sent = sum(f.size for f in uploaded)
    # The rate is this run's: files an earlier run sent (resume) took no time now.
    sent_now = sum(f.size for f in uploaded if f.sent_now)
    if sent_now == 0:
        speed = "nothing new to send"
    elif result.duration > 0:
        speed = f"{sent_now / 1e6 / result.duration:.1f} MB/s"
    else:
        speed = "-"
    status = status_of(result)
    already = sum(1 for f in uploaded if f.origin is Origin.SERVER)
    if status == "success" and already == len(uploaded) and uploaded:
        head = f"All {_files(already)} already on the server at {dest}: nothing sent"
    elif status == "pending":
        head = (
            f"Sent {len(uploaded)} of {_files(to_send)} ({_mb(sent)}) to {dest}, not yet "
            f"archived: XNAT archives a Direct-Archive upload once the session has been idle "
            f"for its interval (facts 1.6); run `xio verify {result.project} {result.subject} "
            f"{result.session} PATH --wait-for 900` later"
        )
    elif status == "success":
        head = (
            f"Uploaded {len(uploaded)} of {_files(to_send)} ({_mb(sent)}) to {dest} "
            f"in {result.duration:.1f} s ({speed}) over {result.transport}"
        )
    elif status == "partial":
        head = (
            f"Partly uploaded: {len(uploaded)} of {_files(to_send)} ({_mb(sent)}) reached {dest}, "
            f"{len(failed)} failed, in {result.duration:.1f} s over {result.transport}"
        )
    else:
        head = (
            f"Upload failed: {len(uploaded)} of {_files(to_send)} reached {dest} "
            f"({result.duration:.1f} s over {result.transport})"
        )
    lines = [head]
    details = [f"failed {len(failed)}", f"skipped {len(skipped)}"]
    if result.batches_total:
        details.append(f"batches {result.batches_total} ({result.batches_failed} failed)")
    if result.verified is not None:
        details.append("verified on the server" if result.verified else "VERIFICATION FAILED")
    lines.append("  " + ", ".join(details))
    if already and already < len(uploaded):
        lines.append(f"  {_files(already)} already on the server (not sent again)")
    # Not failures, but they change what "verified" means (e.g. counted, bytes not compared).
    lines.extend(f"  {w[:1].upper()}{w[1:]}" for w in result.warnings)
    lines.extend(f"  Note: {n}" for n in result.notes)
    lines.extend(f"  not yet archived: {u}" for u in result.pending)
    for s in result.studies:
        lines.append(f"  study {s.study_uid} (patient {s.patient_id}): {_files(s.file_count)}")
    uris = result.session_uris or ([result.session_uri] if result.session_uri else [])
    if len(uris) == 1:
        lines.append(f"  session: {uris[0]}")
    elif uris:
        # Several studies: each became its own session (SESSION, SESSION_2, ...).
        lines.append(f"  sessions ({len(uris)}, one per study):")
        lines.extend(f"    {u}" for u in uris)
    if result.upload_id:
        lines.append(f"  upload id: {result.upload_id}")
    # Errors that only repeat a failed file's line are shown once, in the failed list below.
    per_file = {f"{f.path}: {f.reason}" for f in failed}
    errors = [e for e in result.errors if e and e not in per_file]
    if errors:
        lines.append(f"Errors ({len(errors)}):")
        lines.extend(f"  {e}" for e in errors[:cap])
        if len(errors) > cap:
            lines.append(f"  … and {len(errors) - cap} more — use --json")
    lines += _listing("Failed files", failed, cap)
    lines += _listing("Skipped files", skipped, cap)
    # Local paths may hold bytes that are not UTF-8: shown as \xNN, never an encoding error.
    return printable("\n".join(lines))


def _series_of(files: Sequence[DicomFile]) -> list[str]:
    """The distinct Series Instance UIDs of ``files``, sorted (from the columns of a table)."""
    if isinstance(files, FileTable):
        codes, values = files.codes("series_uid")
        return sorted({values[c] for c in set(codes)})
    return sorted({f.series_uid for f in files})


def plan_to_dict(manifest: Manifest, batches: Sequence[Batch]) -> dict[str, Any]:
    """The ``--dry-run --json`` result: what would be sent, in which batches, and what not."""
    return {
        "schema": PLAN_SCHEMA,
        "status": "dry-run",
        "root": printable(str(manifest.root)),
        "totals": {
            "files": len(manifest.files),
            "bytes": manifest.total_bytes,
            "series": len(set(manifest.files.codes("series_uid")[0])),
            "batches": len(batches),
            "skipped": len(manifest.skipped),
            "duplicates": len(manifest.duplicates),
        },
        "studies": [
            {
                "study_uid": s.study_uid,
                "patient_id": s.patient_id,
                "files": s.file_count,
                "bytes": s.total_bytes,
            }
            for s in manifest.studies()
        ],
        "batches": [
            {
                "index": b.index,
                "files": len(b.files),
                "bytes": b.total_bytes,
                "series": _series_of(b.files),
            }
            for b in batches
        ],
        "skipped": [
            {"path": printable(str(s.path)), "reason": printable(s.reason)}
            for s in _skipped_of(manifest)
        ],
    }
