"""Settings resolution: each source beats the next, pairs stay together, secrets never show."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xnatio import config_file
from xnatio.errors import AuthError, ConfigError
from xnatio.settings import Secret, parse_env_file, resolve_settings

SERVER = "https://xnat.example.org"


def write_config(home: Path, text: str, mode: int = 0o600) -> Path:
    path = home / ".config" / "xnatio" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def write_netrc(home: Path, text: str, mode: int = 0o600) -> Path:
    path = home / ".netrc"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def all_sources(isolated_home: Path, tmp_path: Path) -> dict[str, object]:
    """Every source sets server/username/password to a value naming the source."""
    write_config(
        isolated_home,
        '[profiles.default]\nserver = "https://profile.example"\n'
        'username = "u-profile"\npassword = "p-profile"\n',
    )
    write_netrc(isolated_home, "machine netrc.example login u-profile password p-netrc\n")
    (tmp_path / ".env").write_text(
        "XNAT_SERVER=https://dotenv.example\nXNAT_USERNAME=u-dotenv\nXNAT_PASSWORD=p-dotenv\n"
    )
    env = {
        "XNAT_SERVER": "https://env.example",
        "XNAT_USERNAME": "u-env",
        "XNAT_PASSWORD": "p-env",
        "HOME": str(isolated_home),
    }
    flags = {"server": "https://flag.example", "username": "u-flag", "password": "p-flag"}
    return {"env": env, "flags": flags, "cwd": tmp_path}


def resolve(all_sources: dict[str, object], drop: set[str]) -> tuple[str | None, str | None, str]:
    env = dict(all_sources["env"]) if "env" not in drop else {"HOME": os.environ["HOME"]}  # type: ignore[call-overload]
    flags = dict(all_sources["flags"]) if "flags" not in drop else {}  # type: ignore[call-overload]
    cwd = all_sources["cwd"]
    assert isinstance(cwd, Path)
    if "dotenv" in drop:
        (cwd / ".env").unlink()
    if "profile" in drop:
        config_file.config_path(env).unlink()
    s = resolve_settings(environ=env, cwd=cwd, **flags)
    return s.server, s.username, s.password.reveal() if s.password else ""


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (set(), ("https://flag.example", "u-flag", "p-flag")),
        ({"flags"}, ("https://env.example", "u-env", "p-env")),
        ({"flags", "env"}, ("https://dotenv.example", "u-dotenv", "p-dotenv")),
        ({"flags", "env", "dotenv"}, ("https://profile.example", "u-profile", "p-profile")),
    ],
)
def test_each_source_beats_the_next(
    all_sources: dict[str, object], drop: set[str], expected: tuple[str, str, str]
) -> None:
    assert resolve(all_sources, drop) == expected


def test_netrc_then_no_tty_refuses(isolated_home: Path, tmp_path: Path) -> None:
    env = {"HOME": str(isolated_home), "XNAT_SERVER": "https://netrc.example"}
    write_netrc(isolated_home, "machine netrc.example login u-netrc password p-netrc\n")
    s = resolve_settings(environ=env, cwd=tmp_path)
    assert (s.username, s.password) == ("u-netrc", Secret("p-netrc"))
    assert s.sources["password"] == f"netrc {isolated_home / '.netrc'}"

    (isolated_home / ".netrc").unlink()
    s = resolve_settings(environ=env, cwd=tmp_path)
    assert s.username is None and s.password is None
    with pytest.raises(AuthError) as err:
        s.require_credentials(interactive=False)
    msg = str(err.value)
    for source in ("--user/--password", "XNAT_USERNAME", "./.env", "profile", ".netrc", "prompt"):
        assert source in msg
    assert "stdin is not a terminal" in msg
    # need_credentials at resolve time does the same (stdin is not a terminal under pytest)
    with pytest.raises(AuthError, match="stdin is not a terminal"):
        resolve_settings(environ=env, cwd=tmp_path, need_credentials=True)


def test_prompt_only_when_interactive(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    monkeypatch.setattr(
        "xnatio.credentials.prompt_password", lambda u, s: asked.append(u) or "typed"
    )
    env = {"HOME": str(isolated_home)}
    s = resolve_settings(
        server=SERVER,
        username="alice",
        environ=env,
        cwd=tmp_path,
        need_credentials=True,
        interactive=True,
    )
    assert (s.username, s.password, s.sources["password"]) == ("alice", Secret("typed"), "prompt")
    assert asked == ["alice"]


def test_token_pairs_and_user_flag(isolated_home: Path, tmp_path: Path) -> None:
    env = {"HOME": str(isolated_home), "XNAT_SERVER": SERVER, "XNAT_TOKEN": "al1as:s3cret"}
    s = resolve_settings(environ=env, cwd=tmp_path)
    assert (s.username, s.password) == ("al1as", Secret("s3cret"))
    assert s.sources["username"] == "env XNAT_TOKEN"
    # an explicit other user is never combined with the token's secret
    s = resolve_settings(username="bob", environ=env, cwd=tmp_path)
    assert (s.username, s.password) == ("bob", None)
    # netrc for bob fills the password; a netrc entry for someone else does not
    write_netrc(isolated_home, "machine xnat.example.org login carol password p-carol\n")
    assert resolve_settings(username="bob", environ=env, cwd=tmp_path).password is None
    write_netrc(isolated_home, "machine xnat.example.org login bob password p-bob\n")
    assert resolve_settings(username="bob", environ=env, cwd=tmp_path).password == Secret("p-bob")
    with pytest.raises(ConfigError, match="ALIAS:SECRET"):
        resolve_settings(environ={**env, "XNAT_TOKEN": "nocolon"}, cwd=tmp_path)


def test_env_file_parsing(tmp_path: Path) -> None:
    path = tmp_path / "x.env"
    path.write_text(
        "# a comment\n\n"
        "export XNAT_SERVER=https://a.example  # trailing comment\n"
        "XNAT_USERNAME='it''s'\n"
        'XNAT_PASSWORD="with space # not a comment"\n'
        "XNAT_DICOM_PORT = 11112\n"
        "EMPTY=\n"
    )
    assert parse_env_file(path) == {
        "XNAT_SERVER": "https://a.example",
        "XNAT_USERNAME": "its",
        "XNAT_PASSWORD": "with space # not a comment",
        "XNAT_DICOM_PORT": "11112",
        "EMPTY": "",
    }
    path.write_text("XNAT_SERVER\n")
    with pytest.raises(ConfigError, match=r"x.env:1: expected KEY=VALUE"):
        parse_env_file(path)


def test_env_file_flag_beats_dotenv_and_is_not_exported(
    isolated_home: Path, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("XNAT_SERVER=https://dotenv.example\n")
    other = tmp_path / "other.env"
    other.write_text("XNAT_SERVER=https://other.example\nXNAT_DICOM_PORT=4242\n")
    env = {"HOME": str(isolated_home)}
    s = resolve_settings(environ=env, cwd=tmp_path, env_file=other)
    assert (s.server, s.dicom_port) == ("https://other.example", 4242)
    assert s.sources["server"] == f"env file {other} XNAT_SERVER"
    assert "XNAT_SERVER" not in os.environ
    s = resolve_settings(environ=env, cwd=tmp_path)
    assert s.server == "https://dotenv.example"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_settings(environ=env, cwd=tmp_path, env_file=tmp_path / "missing.env")


def test_profile_selection(isolated_home: Path, tmp_path: Path) -> None:
    write_config(
        isolated_home,
        '[profiles.default]\nserver = "https://default.example"\n\n'
        '[profiles.lab]\nserver = "https://lab.example"\nverify_tls = false\n'
        "dicom_port = 11112\n",
    )
    env = {"HOME": str(isolated_home)}
    assert resolve_settings(environ=env, cwd=tmp_path).server == "https://default.example"
    s = resolve_settings(environ={**env, "XNATIO_PROFILE": "lab"}, cwd=tmp_path)
    assert (s.server, s.verify_tls, s.dicom_port, s.profile) == (
        "https://lab.example",
        False,
        11112,
        "lab",
    )
    assert s.sources["verify_tls"].endswith("[profiles.lab] verify_tls")
    (tmp_path / ".env").write_text("XNATIO_PROFILE=lab\n")
    assert resolve_settings(environ=env, cwd=tmp_path).profile == "lab"
    assert resolve_settings(environ=env, cwd=tmp_path, profile="default").profile == "default"
    with pytest.raises(ConfigError, match=r"no profile 'nope'.*profiles: default, lab"):
        resolve_settings(environ=env, cwd=tmp_path, profile="nope")
    # XDG_CONFIG_HOME moves the file
    (tmp_path / ".env").unlink()
    xdg = tmp_path / "xdg"
    (xdg / "xnatio").mkdir(parents=True)
    (xdg / "xnatio" / "config.toml").write_text('[profiles.default]\nserver = "https://xdg.ex"\n')
    s = resolve_settings(environ={**env, "XDG_CONFIG_HOME": str(xdg)}, cwd=tmp_path)
    assert s.server == "https://xdg.ex"


def test_readable_config_with_secret_is_refused(isolated_home: Path, tmp_path: Path) -> None:
    path = write_config(
        isolated_home, '[profiles.default]\nserver = "https://a.example"\npassword = "pw"\n', 0o644
    )
    env = {"HOME": str(isolated_home)}
    with pytest.raises(ConfigError, match=r"other users can read it \(mode 0644\).*chmod 600") as e:
        resolve_settings(environ=env, cwd=tmp_path)
    assert "pw" not in str(e.value).replace("password", "")
    path.chmod(0o600)
    assert resolve_settings(environ=env, cwd=tmp_path).password == Secret("pw")
    # without secrets a readable file is fine
    write_config(isolated_home, '[profiles.default]\nserver = "https://a.example"\n', 0o644)
    assert resolve_settings(environ=env, cwd=tmp_path).server == "https://a.example"
    # so is netrc: refused when readable
    write_netrc(isolated_home, "machine a.example login u password p\n", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        resolve_settings(environ=env, cwd=tmp_path)


def test_bad_config_values(isolated_home: Path, tmp_path: Path) -> None:
    env = {"HOME": str(isolated_home)}
    write_config(isolated_home, "[profiles.default]\nserver = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_settings(environ=env, cwd=tmp_path)
    write_config(isolated_home, '[profiles.default]\nsrever = "x"\n')
    with pytest.raises(ConfigError, match="unknown key 'srever'"):
        resolve_settings(environ=env, cwd=tmp_path)
    write_config(isolated_home, '[profiles.default]\ndicom_port = "x"\n')
    with pytest.raises(ConfigError, match="wrong type"):
        resolve_settings(environ=env, cwd=tmp_path)
    with pytest.raises(ConfigError, match="XNAT_VERIFY_TLS"):
        resolve_settings(environ={"HOME": str(tmp_path), "XNAT_VERIFY_TLS": "maybe"}, cwd=tmp_path)


def test_tls_and_plain_http_warning(isolated_home: Path, tmp_path: Path) -> None:
    env = {"HOME": str(isolated_home)}
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    s = resolve_settings(server=SERVER, environ=env, cwd=tmp_path)
    assert s.verify is True
    s = resolve_settings(server=SERVER, ca_bundle=str(bundle), environ=env, cwd=tmp_path)
    assert s.verify == str(bundle)
    s = resolve_settings(server=SERVER, environ={**env, "XNAT_VERIFY_TLS": "0"}, cwd=tmp_path)
    assert s.verify is False and s.warnings
    s = resolve_settings(
        server="http://xnat.example.org", username="u", password="p", environ=env, cwd=tmp_path
    )
    assert any("unencrypted" in w for w in s.warnings)
    s = resolve_settings(
        server="http://127.0.0.1:8080", username="u", password="p", environ=env, cwd=tmp_path
    )
    assert s.warnings == ()
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_settings(
            server=SERVER, ca_bundle=str(tmp_path / "nope.pem"), environ=env, cwd=tmp_path
        )


def test_secrets_never_in_repr_or_redacted(isolated_home: Path, tmp_path: Path) -> None:
    s = resolve_settings(
        server=SERVER, username="u", password="hunter2-secret", environ={}, cwd=tmp_path
    )
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.redacted())
    assert s.redacted()["password"] == "<hidden>"
    with pytest.raises(ConfigError, match="must not hold credentials") as err:
        resolve_settings(server="https://u:hunter2@xnat.example.org", environ={}, cwd=tmp_path)
    assert "hunter2" not in str(err.value)


def test_update_profile_keeps_comments_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "c" / "config.toml"
    config_file.update_profile(path, "a", {"server": "https://a", "verify_tls": False})
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = path.read_text()
    path.write_text("# keep me\n" + text + '\n[profiles.b]\nserver = "https://b" # b\n')
    path.chmod(0o600)
    config_file.update_profile(path, "a", {"token": 'x:"y', "verify_tls": None})
    config_file.update_profile(path, "b", {"username": "bob"})
    text = path.read_text()
    assert text.startswith("# keep me\n") and "verify_tls" not in text
    a = config_file.load_profile(path, "a", required=True)
    b = config_file.load_profile(path, "b", required=True)
    assert a is not None and b is not None
    assert dict(a.values) == {"server": "https://a", "token": 'x:"y'}
    assert dict(b.values) == {"server": "https://b", "username": "bob"}
