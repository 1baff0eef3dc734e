"""Start-up (issue 16 item 4): ``xio`` imports a command's module only when that command runs or
is listed, so ``xio upload-dicom`` does not pay for every other command's imports."""

from __future__ import annotations

import subprocess
import sys

from xnatio.cli.main import _COMMANDS, cli

_PROBE = """
import sys
from xnatio.cli.main import cli
cli.get_command(None, "upload-dicom")
others = ("xnatio.cli.upload_many", "xnatio.many.plan", "xnatio.cli.status", "xnatio.cli.demo",
          "xnatio.cli.sandbox", "xnatio.cli.verify", "xnatio.cli.config", "xnatio.cli.resource")
print(",".join(m for m in others if m in sys.modules))
print("xnatio.cli.upload" in sys.modules)
"""


def test_one_command_imports_its_own_module_only() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["", "True"]


def test_every_command_is_listed_in_order_and_found_by_name() -> None:
    assert cli.list_commands(None) == list(_COMMANDS)  # type: ignore[arg-type]
    assert list(cli.commands) == list(_COMMANDS)
    for name in _COMMANDS:
        command = cli.get_command(None, name)  # type: ignore[arg-type]
        assert command is not None and command.name == name
    assert cli.get_command(None, "no-such-command") is None  # type: ignore[arg-type]
