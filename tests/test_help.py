"""Help that fits on a screen (issue 17): ``--help`` of the big commands shows the common options
in one short list, ``--help-all`` every option under its heading with its whole text; no option
is ever lost, and every option that reads an environment variable shows it in both.
"""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from xnatio.cli.main import cli
from xnatio.cli.options import SectionedCommand, brief_help
from xnatio.cli.upload import upload_dicom
from xnatio.cli.upload_many import upload_many_command

BIG = (("upload-dicom", upload_dicom), ("upload-many", upload_many_command))
SCREEN = 50  # lines: a terminal of 120 x 50 shows the whole --help


def _help(*args: str, width: int = 120) -> str:
    res = CliRunner().invoke(cli, list(args), terminal_width=width)
    assert res.exit_code == 0, res.output
    return res.output


def _options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


@pytest.mark.parametrize("name,cmd", BIG, ids=[n for n, _ in BIG])
def test_help_fits_on_a_screen_and_help_all_has_every_option(name: str, cmd: click.Command) -> None:
    assert isinstance(cmd, SectionedCommand) and cmd.common is not None
    short = _help(name, "--help")
    every = _help(name, "--help-all")
    assert len(short.splitlines()) <= SCREEN, len(short.splitlines())
    assert len(every.splitlines()) > 2 * len(short.splitlines())
    assert "--help-all shows every one" in short
    assert "Exit codes:" in short and "Examples" in short
    flat_short, flat_every = " ".join(short.split()), " ".join(every.split())
    for option in _options(cmd):
        names = [o for o in option.opts + option.secondary_opts if o.startswith("--")]
        for flag in names:
            assert flag in flat_every, flag  # nothing is lost
        shown = option.name in cmd.common
        assert (f"{names[0]} " in flat_short) is shown, names[0]
        # Every option that reads an environment variable says which, wherever it is shown.
        for env in re.findall(r"\[env: ([A-Z_]+)", option.help or ""):
            assert f"[env: {env}" in flat_every, (names[0], env)
            if shown:
                assert f"[env: {env}" in flat_short, (names[0], env)
    # --help-all keeps the headings; --help is one list.
    assert "\nOutput:\n" in every and "\nOutput:\n" not in short


def test_upload_help_names_the_env_of_every_server_option() -> None:
    short = " ".join(_help("upload-dicom", "--help").split())
    for env in ("XNAT_SERVER", "XNAT_USERNAME", "XNAT_PASSWORD", "XNAT_CA_BUNDLE"):
        assert f"[env: {env}]" in short, env


def test_help_at_80_columns_still_lists_the_common_options() -> None:
    short = _help("upload-dicom", "--help", width=80)
    options = short[: short.index("Examples:")]  # the examples are verbatim lines
    assert all(len(line) <= 80 for line in options.splitlines()), options
    assert "--server URL" in short and "--dry-run" in short


def test_brief_help_is_the_first_sentence_with_its_environment_variable() -> None:
    text = "XNAT password. Visible in process listings: prefer XNAT_PASSWORD.  [env: XNAT_PASSWORD]"
    assert brief_help(text) == "XNAT password.  [env: XNAT_PASSWORD]"
    # Not cut inside "e.g." or a version number, only before a new sentence.
    text = "Direct-Archive (XNAT >= 1.8.3): files go e.g. to the archive. More here."
    assert brief_help(text) == "Direct-Archive (XNAT >= 1.8.3): files go e.g. to the archive."
    assert brief_help("No period at all") == "No period at all"
