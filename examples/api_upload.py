"""Upload a session from Python with a progress callback, then inspect the per-file outcomes.

    XNAT_SERVER=https://xnat.example.org XNAT_USERNAME=me XNAT_PASSWORD=... \
        python examples/api_upload.py PROJECT SUBJECT SESSION /path/to/dicom

The CLI is a thin layer over this same API.
"""

from __future__ import annotations

import os
import sys

from xnatio.models import Outcome, ProgressEvent
from xnatio.uploaders import upload_dicom_parallel_rest


def on_progress(event: ProgressEvent) -> None:
    # Called from worker threads: keep it quick. Progress may go backwards after a retry.
    if event.total:
        print(f"\r{event.phase.value:>8}: {event.current}/{event.total} {event.message}", end="")


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__)
        return 2
    project, subject, session, path = sys.argv[1:]
    result = upload_dicom_parallel_rest(
        server=os.environ["XNAT_SERVER"],
        username=os.environ["XNAT_USERNAME"],
        password=os.environ["XNAT_PASSWORD"],
        verify_tls=True,
        source_dir=path,
        project=project,
        subject=subject,
        session=session,
        num_batches=42,
        upload_workers=42,
        archive_workers=5,
        archive_format="tar",
        progress_callback=on_progress,
    )
    print()
    print(
        f"success={result.success} files={result.total_files} "
        f"{result.total_size_mb:.1f} MB in {result.duration:.1f} s"
    )
    for f in result.files:
        if f.outcome in (Outcome.FAILED, Outcome.SKIPPED):
            print(f"{f.outcome.value:>8}  {f.path}: {f.reason}")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
