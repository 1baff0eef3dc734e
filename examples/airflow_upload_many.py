"""Airflow DAG: every study of an outbox into XNAT, one Airflow task per study (docs/scale-out.md).

Every hour, ``plan`` scans the outbox once (``xnatio.many.find_studies`` + ``build_plan``) and
returns the ready studies; ``upload`` is mapped over them (dynamic task mapping), and each mapped
task sends one study with the Python API (``xnatio.uploaders.upload_many``), recording it in the
state folder that ``xio upload-many`` and ``xio status`` use. A study already verified by an
earlier run (or by ``xio upload-many`` from cron) is skipped at once, so the DAG is safe to run
again and again.

Load on XNAT: the tasks take slots of the Airflow pool ``xnat`` (create it with
``airflow pools set xnat 8 "XNAT upload slots"``), and each task has at most ``MAX_REQUESTS``
requests in flight: the server never sees more than 8 x MAX_REQUESTS.

Retries: Airflow retries a task whose study failed or whose server was unreachable (exit codes 1
and 4 of the CLI: a rerun may succeed); a configuration or credentials error (2, 3) fails the
task at once without retries (``AirflowFailException``): it will not succeed without a change.

Credentials: never in the DAG or in Airflow variables shown in the UI. ``ENV_FILE`` is a file
only the worker's user can read (XNAT_SERVER, XNAT_USERNAME, XNAT_PASSWORD or XNAT_TOKEN), e.g.
a Kubernetes Secret mounted into the worker, or a token saved once with
``xio login --profile airflow --save-token`` (then ``resolve_settings(profile="airflow")``).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.decorators import dag, task
from airflow.exceptions import AirflowFailException

OUTBOX = "/shared/outbox"
PROJECT = "MYPROJ"
STATE_DIR = Path("/shared/xnatio-state")  # shared by every worker (one writer per study file)
ENV_FILE = "/etc/xnatio/env"  # chmod 600, readable by the worker's user only
MAX_REQUESTS = 4  # per task


@dag(
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["xnat"],
)
def xnat_upload_many() -> None:
    @task
    def plan() -> list[dict[str, Any]]:
        """The ready studies of the outbox: UID and the folders holding its files."""
        from xnatio.many import build_plan, find_studies

        found = build_plan(find_studies([OUTBOX]), project=PROJECT)
        return [
            {"study_uid": row.study_uid, "folders": [str(f) for f in row.folders]}
            for row in found.ready
        ]

    @task(pool="xnat", retries=3, retry_delay=timedelta(minutes=10), retry_exponential_backoff=True)
    def upload(study: dict[str, Any]) -> str:
        """Send one study (its folders are scanned again: only they, not the whole outbox)."""
        from xnatio.errors import EXIT_AUTH, EXIT_USAGE, XnatioError
        from xnatio.many import build_plan, find_studies
        from xnatio.settings import resolve_settings
        from xnatio.uploaders import ManyOptions, upload_many

        uid = study["study_uid"]
        try:
            settings = resolve_settings(env_file=ENV_FILE)
            found = build_plan(find_studies(study["folders"]), project=PROJECT)
            rows = tuple(row for row in found.rows if row.study_uid == uid)
            one = type(found)(rows=rows, studies={uid: found.studies[uid]})
            result = upload_many(
                settings=settings,
                plan=one,
                # A run-lock name of its own, so that study tasks never stop each other.
                options=ManyOptions(shard=uid, max_requests=MAX_REQUESTS),
                state_dir=STATE_DIR,
            )
        except XnatioError as exc:
            if exc.exit_code in (EXIT_USAGE, EXIT_AUTH):
                raise AirflowFailException(str(exc)) from None  # no retry can fix it
            raise  # unreachable server, interrupted: Airflow retries
        outcome = result.studies[0]
        if result.exit_code != 0:
            raise RuntimeError(f"study {uid}: {outcome.state}: {outcome.record.last_error}")
        return f"{outcome.record.project}/{outcome.record.subject}/{outcome.record.session}"

    upload.expand(study=plan())


xnat_upload_many()
