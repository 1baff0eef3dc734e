"""`xio login` and `xio config show`: against the sandbox over real HTTP, secrets never shown."""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from upload_helpers import TEST_PROJECTS
from xnatio.cli.main import cli

SECRET = "hunter2-very-secret"


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    runner = CliRunner()
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(cli, list(args), env=env, catch_exceptions=False)
    finally:
        os.chdir(old)


def config_path(home: Path) -> Path:
    return home / ".config" / "xnatio" / "config.toml"


def write_config(home: Path, text: str) -> Path:
    path = config_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- config show (no server needed) --------------------------------------------------------------


def test_config_show_values_and_sources_without_secrets(
    isolated_home: Path, tmp_path: Path
) -> None:
    write_config(
        isolated_home,
        f'[profiles.lab]\nserver = "https://lab.example"\nusername = "alice"\n'
        f'password = "{SECRET}"\ndicom_port = 11112\n',
    )
    (tmp_path / ".env").write_text("XNAT_DICOM_CALLED_AET=FROMDOTENV\n")
    res = run("config", "show", "--profile", "lab", env={"XNAT_VERIFY_TLS": "false"}, cwd=tmp_path)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert SECRET not in res.output
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "https://lab.example" in lines["server"] and "[profiles.lab] server" in lines["server"]
    assert (
        "<hidden>" in lines["password"] and "[profiles.lab] username/password" in lines["password"]
    )
    assert "env XNAT_VERIFY_TLS" in lines["verify_tls"]
    assert "FROMDOTENV" in lines["dicom_called_aet"] and ".env XNAT_DICOM_CALLED_AET" in out
    assert "TLS certificate checking is off" in res.stderr

    res = run("config", "show", "--profile", "lab", "--json", cwd=tmp_path)
    assert res.exit_code == 0
    assert SECRET not in res.output
    doc = json.loads(res.stdout)
    assert doc["profile"] == "lab"
    assert doc["settings"]["password"] == {
        "value": "<hidden>",
        "source": f"config {config_path(isolated_home)} [profiles.lab] username/password",
    }
    assert doc["settings"]["dicom_port"]["value"] == "11112"


def test_password_flag_is_accepted_with_a_warning(isolated_home: Path, tmp_path: Path) -> None:
    res = run("config", "show", "--server", "https://a.example", "--password", SECRET, cwd=tmp_path)
    assert res.exit_code == 0
    assert "process listings" in res.stderr
    assert SECRET not in res.output
    assert "--password" in res.stdout


def test_no_terminal_no_prompt_exit_3(isolated_home: Path, tmp_path: Path) -> None:
    res = run("login", "--server", "https://a.example", "--user", "alice", cwd=tmp_path)
    assert res.exit_code == 3
    assert res.stderr.startswith("error: no password for alice at https://a.example; tried: ")
    for source in ("--user/--password", "XNAT_TOKEN", "./.env", "profile 'default'", ".netrc"):
        assert source in res.stderr
    assert "prompt (stdin is not a terminal)" in res.stderr


def test_config_error_exit_2_and_no_secret(isolated_home: Path, tmp_path: Path) -> None:
    path = write_config(isolated_home, f'[profiles.default]\ntoken = "a:{SECRET}"\n')
    path.chmod(0o640)
    res = run("config", "show", cwd=tmp_path)
    assert res.exit_code == 2
    assert "chmod 600" in res.stderr and SECRET not in res.output
    res = run("config", "show", "--profile", "missing", cwd=tmp_path)
    assert res.exit_code == 2 and "no profile 'missing'" in res.stderr


SERVER_COMMANDS = {
    "upload-dicom": ["upload-dicom", "P", "S", "E", "{dir}"],
    "verify": ["verify", "P", "S", "E", "{dir}"],
    "upload-resource": ["upload-resource", "P", "S", "E", "R", "{dir}"],
    "login": ["login"],
    "config show": ["config", "show"],
}


@pytest.mark.parametrize("name", list(SERVER_COMMANDS))
def test_every_server_command_reads_profile_and_env_file(
    name: str, isolated_home: Path, tmp_path: Path
) -> None:
    # One settings path (xnatio.cli.options): each command that talks to a server honours
    # --profile and --env-file, so a profile that does not exist is the same error everywhere.
    args = [a.replace("{dir}", str(tmp_path)) for a in SERVER_COMMANDS[name]]
    write_config(isolated_home, '[profiles.lab]\nserver = "https://lab.example"\n')
    res = run(*args, "--profile", "missing", cwd=tmp_path)
    assert res.exit_code == 2 and "error: no profile 'missing'" in res.stderr
    missing_env = tmp_path / "nowhere.env"
    res = run(*args, "--env-file", str(missing_env), cwd=tmp_path)
    assert res.exit_code == 2 and str(missing_env) in res.stderr


# --- login against the sandbox -------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server_module = pytest.importorskip("xnatio.sandbox.server")

    with server_module.SandboxServer(
        tmp_path_factory.mktemp("xnat"), users={"admin": "admin-secret"}, projects=TEST_PROJECTS
    ) as srv:
        yield srv


@pytest.mark.integration
def test_login_prints_version_and_rejects_bad_password(
    sandbox: Any, isolated_home: Path, tmp_path: Path
) -> None:
    env = {"XNAT_SERVER": sandbox.url, "XNAT_USERNAME": "admin", "XNAT_PASSWORD": "admin-secret"}
    res = run("login", env=env, cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert f"Logged in to {sandbox.url} as admin (env XNAT_PASSWORD)." in res.stdout
    assert f"XNAT {sandbox.version}" in res.stdout
    assert "admin-secret" not in res.output

    res = run("login", "--json", env=env, cwd=tmp_path)
    doc = json.loads(res.stdout)
    assert doc["version"] == sandbox.version and doc["token_saved"] is False

    res = run("login", env={**env, "XNAT_PASSWORD": SECRET}, cwd=tmp_path)
    assert res.exit_code == 3
    assert "refused the credentials of user 'admin'" in res.stderr
    assert "(credentials from env XNAT_PASSWORD)" in res.stderr
    assert SECRET not in res.output


@pytest.mark.integration
def test_saved_token_0600_and_reused(sandbox: Any, isolated_home: Path, tmp_path: Path) -> None:
    res = run(
        "login",
        "--server",
        sandbox.url,
        "--user",
        "admin",
        "--profile",
        "lab",
        "--save-token",
        env={"XNAT_PASSWORD": "admin-secret"},
        cwd=tmp_path,
    )
    assert res.exit_code == 0, res.output
    path = config_path(isolated_home)
    assert "Saved an alias token in " + str(path) in res.stdout
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = path.read_text()
    assert f'server = "{sandbox.url}"' in text and "token = " in text
    assert "admin-secret" not in text

    # A later run with only the profile logs in with the stored token, and says whose it is
    # (GET /xapi/users/username), not the alias UUID it logged in with.
    token = text.split('token = "')[1].split('"')[0]
    alias = token.split(":")[0]
    res = run("login", "--profile", "lab", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert f"Logged in to {sandbox.url} as admin (an alias token from " in res.stdout
    assert "[profiles.lab] token)" in res.stdout
    assert alias not in res.output
    res = run("login", "--profile", "lab", "--json", cwd=tmp_path)
    assert json.loads(res.stdout)["username"] == "admin" and alias not in res.output
    res = run("config", "show", "--profile", "lab", "--json", cwd=tmp_path)
    doc = json.loads(res.stdout)
    assert doc["settings"]["password"]["value"] == "<hidden>"
    assert doc["settings"]["password"]["source"].endswith("[profiles.lab] token")
    assert token.split(":")[1] not in res.output

    # A revoked/expired token: exit 3 with a hint to log in again.
    assert sandbox.auth.invalidate_token(alias)
    res = run("login", "--profile", "lab", cwd=tmp_path)
    assert res.exit_code == 3
    assert "stored token may have expired" in res.stderr


class _MemoryKeyring:
    priority = 1

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, user: str) -> str | None:
        return self.store.get((service, user))

    def set_password(self, service: str, user: str, value: str) -> None:
        self.store[(service, user)] = value


@pytest.mark.integration
def test_saved_token_goes_to_a_usable_keyring(
    sandbox: Any, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `keyring` package is optional; its API (get_keyring/get/set_password) is stood in for
    by an in-memory backend so the code path runs without a desktop secret store."""
    backend = _MemoryKeyring()
    module = types.ModuleType("keyring")
    module.get_keyring = lambda: backend  # type: ignore[attr-defined]
    module.get_password = backend.get_password  # type: ignore[attr-defined]
    module.set_password = backend.set_password  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keyring", module)
    env = {"XNAT_SERVER": sandbox.url, "XNAT_USERNAME": "admin", "XNAT_PASSWORD": "admin-secret"}
    res = run("login", "--save-token", env=env, cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert "system keyring" in res.stdout
    assert list(backend.store) == [("xnatio", f"default@{sandbox.url}")]
    text = config_path(isolated_home).read_text()
    assert 'token_store = "keyring"' in text and "token =" not in text
    res = run("login", "--json", env={"XNAT_SERVER": sandbox.url}, cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["credentials_from"] == "keyring (profile default)"


@pytest.mark.integration
@pytest.mark.slow
def test_prompts_on_a_real_terminal(sandbox: Any, isolated_home: Path, tmp_path: Path) -> None:
    """With a terminal on stdin (a pseudo-terminal here) a missing password is asked for."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal, so getpass reads /dev/tty
        os.chdir(tmp_path)
        os.execvpe(
            sys.executable,
            [sys.executable, "-m", "xnatio", "login", "--server", sandbox.url, "--user", "admin"],
            {**os.environ, "HOME": str(isolated_home)},
        )
    output = b""

    def read_until(marker: bytes) -> None:
        nonlocal output
        while marker not in output:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, output
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk

    read_until(b"Password for admin at")
    os.write(fd, b"admin-secret\n")
    read_until(b"XNAT ")
    read_until(b"\n")  # rest of the version line
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "admin-secret" not in text  # not echoed
    assert "as admin (prompt)" in text
