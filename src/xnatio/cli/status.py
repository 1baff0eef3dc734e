"""`xio status`: what the ``xio upload-many`` ledger holds, for whoever comes in next morning.

Reads every study file of the state folder (every shard's, on a shared file system), writes
nothing, needs no server.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import click

from xnatio.cli.options import OutputArgs, output_options, start_command
from xnatio.errors import EXIT_FILES_FAILED, EXIT_OK
from xnatio.many import ledger as states
from xnatio.many.ledger import Ledger, StudyRecord, default_state_dir

# Worst first: what needs a person comes at the top.
_ORDER = {
    states.QUARANTINED: 0,
    states.FAILED: 1,
    states.SENDING: 2,
    states.WAITING: 3,
    states.PLANNED: 4,
    states.VERIFIED: 5,
}


def state_dir_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        metavar="DIR",
        help="The upload-many state folder (the ledger: one small file per study).  "
        "[env: XNATIO_STATE_DIR; default: $XDG_STATE_HOME/xnatio/many]",
    )(f)


def when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def why(record: StudyRecord) -> str:
    if record.state in (states.FAILED, states.QUARANTINED):
        return "; ".join(t for t in (record.last_error, record.reason) if t)
    return record.reason


def status_table(records: list[StudyRecord]) -> str:
    """Counts per state, then one line per study (worst first, then oldest)."""
    counts = Counter(r.state for r in records)
    if not records:
        return "no studies"
    head = ", ".join(f"{counts[s]} {s}" for s in states.STATES if counts[s])
    lines = [f"{len(records)} studies: {head}"]
    rows = [("STATE", "PROJECT/SUBJECT/SESSION", "PATIENT", "FILES", "UPDATED", "TRIES", "REASON")]
    for r in sorted(records, key=lambda r: (_ORDER.get(r.state, 9), r.updated)):
        rows.append(
            (
                r.state,
                f"{r.project}/{r.subject}/{r.session}",
                r.patient_id,
                str(r.files),
                when(r.updated),
                str(r.attempts),
                why(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def status_doc(path: Path, records: list[StudyRecord]) -> dict[str, object]:
    counts = Counter(r.state for r in records)
    return {
        "state_dir": str(path),
        "totals": {s: counts[s] for s in states.STATES} | {"studies": len(records)},
        "studies": [asdict(r) for r in records],
    }


@click.command(
    "status",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="\n\b\nExamples:\n  xio status\n  xio status --state-dir /shared/xnatio-state --json\n"
    "\n\b\nExit codes:\n    0  every study verified or waiting\n"
    "    1  some study failed, is quarantined, or is not sent yet\n"
    "    2  the state folder cannot be read\n",
)
@state_dir_option
@output_options
@click.pass_context
def status(ctx: click.Context, *, state_dir: Path | None, output: OutputArgs) -> None:
    """Show what `xio upload-many` did: every study of the state folder with its labels, state
    (planned, sending, verified, failed, quarantined, waiting), when, files, tries and reason.

    Reads the ledger only (every shard's, when the folder is shared): no server is asked.
    """
    start_command(ctx, output)
    ledger = Ledger(state_dir or default_state_dir())
    records = ledger.records()
    bad = any(r.state not in (states.VERIFIED, states.WAITING) for r in records)
    if output.json:
        click.echo(json.dumps(status_doc(ledger.path, records), indent=2, ensure_ascii=False))
    elif not output.quiet or bad:
        click.echo(status_table(records), err=bad and output.quiet)
    ctx.exit(EXIT_FILES_FAILED if bad else EXIT_OK)
