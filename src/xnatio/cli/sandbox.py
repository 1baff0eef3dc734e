"""`xio sandbox` (the local XNAT-compatible server) and the hidden `xio synth` generator."""

from __future__ import annotations

from pathlib import Path

import click

from xnatio.synth import EXTRAS, generate_session


@click.command()
def sandbox() -> None:
    """Run a local XNAT-compatible server (for tests, demos and benchmarks)."""
    raise click.ClickException("the sandbox server is not built yet")


@click.command(hidden=True)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--series", default=3, show_default=True, help="Number of series.")
@click.option("--instances", default=20, show_default=True, help="Instances per series.")
@click.option("--modality", type=click.Choice(["MR", "CT"]), default="MR", show_default=True)
@click.option("--patient-id", default="SYNTH001", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed: same seed, same UIDs.")
@click.option(
    "--extra",
    "extras",
    multiple=True,
    type=click.Choice(sorted(EXTRAS)),
    help="Add an odd file (repeatable).",
)
def synth(
    out_dir: Path,
    series: int,
    instances: int,
    modality: str,
    patient_id: str,
    seed: int,
    extras: tuple[str, ...],
) -> None:
    """Write a synthetic DICOM session into OUT_DIR (for tests, demos and benchmarks)."""
    s = generate_session(
        out_dir,
        series=series,
        instances=instances,
        modality=modality,
        patient_id=patient_id,
        seed=seed,
        extras=extras,
    )
    click.echo(
        f"wrote {s.file_count} files ({s.total_bytes / 1e6:.1f} MB) of study {s.study_uid} "
        f"in {len(s.series)} series to {s.root}"
    )
