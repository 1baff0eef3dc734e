"""netrc lookup, stored tokens (config file or keyring) and the keyring's optional presence."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from xnatio import config_file, credentials
from xnatio.errors import ConfigError

SERVER = "https://xnat.example.org"


def test_netrc_machine_default_and_netrc_env(tmp_path: Path) -> None:
    path = tmp_path / "netrc"
    path.write_text(
        "machine other.example login o password po\n"
        "machine xnat.example.org login alice password pa\n"
        "default login anon password pd\n"
    )
    path.chmod(0o600)
    entry = credentials.netrc_lookup(SERVER + ":8443/xnat", path)
    assert entry is not None and (entry.login, entry.password) == ("alice", "pa")
    entry = credentials.netrc_lookup("https://unknown.example", path)
    assert entry is not None and entry.login == "anon"
    assert credentials.netrc_lookup(SERVER, tmp_path / "missing") is None
    assert credentials.netrc_path({"NETRC": str(path), "HOME": "/nowhere"}) == path
    assert credentials.netrc_path({"HOME": str(tmp_path)}) == tmp_path / ".netrc"
    path.write_text("machine xnat.example.org login alice password pa s3cr3t-ish x\n")
    with pytest.raises(ConfigError, match=r"not valid netrc syntax \(line 1\)") as err:
        credentials.netrc_lookup(SERVER, path)
    assert "s3cr3t" not in str(err.value)


def test_token_in_config_only_for_its_server(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    where = credentials.save_token(cfg, "lab", SERVER, "al", "se")
    assert where == f"{cfg} [profiles.lab] (mode 0600)"
    assert os.stat(cfg).st_mode & 0o777 == 0o600
    prof = config_file.load_profile(cfg, "lab", required=True)
    assert prof is not None and prof.values["server"] == SERVER
    stored = credentials.load_stored_token(prof, SERVER)
    assert stored is not None and (stored.alias, stored.secret) == ("al", "se")
    assert credentials.load_stored_token(prof, "https://elsewhere.example") is None
    # a second save replaces the token, keeps the server the profile already had
    credentials.save_token(cfg, "lab", SERVER, "al2", "se2")
    assert cfg.read_text().count("token = ") == 1


class _Backend:
    def __init__(self, priority: float, fail_set: bool = False) -> None:
        self.priority = priority
        self.fail_set = fail_set
        self.store: dict[tuple[str, str], str] = {}


def _install(monkeypatch: pytest.MonkeyPatch, backend: _Backend) -> None:
    module: Any = types.ModuleType("keyring")
    module.get_keyring = lambda: backend

    def set_password(service: str, user: str, value: str) -> None:
        if backend.fail_set:
            raise RuntimeError("locked")
        backend.store[(service, user)] = value

    module.set_password = set_password
    module.get_password = lambda service, user: backend.store.get((service, user))
    monkeypatch.setitem(sys.modules, "keyring", module)


def test_keyring_absent_or_unusable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "keyring", None)  # import fails
    assert not credentials.keyring_available()
    _install(monkeypatch, _Backend(priority=0))  # the "fail" backend of a headless machine
    assert not credentials.keyring_available()
    cfg = tmp_path / "config.toml"
    assert "mode 0600" in credentials.save_token(cfg, "default", SERVER, "a", "s")


def test_keyring_used_and_falls_back_when_it_refuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = tmp_path / "config.toml"
    backend = _Backend(priority=5)
    _install(monkeypatch, backend)
    assert credentials.save_token(cfg, "p", SERVER, "a", "s") == "the system keyring"
    assert backend.store == {("xnatio", f"p@{SERVER}"): "a:s"}
    prof = config_file.load_profile(cfg, "p", required=True)
    assert prof is not None and "token" not in prof.values
    stored = credentials.load_stored_token(prof, SERVER)
    assert stored is not None and stored.where == "keyring (profile p)"

    _install(monkeypatch, _Backend(priority=5, fail_set=True))
    where = credentials.save_token(cfg, "p", SERVER, "b", "t")
    assert where.endswith("(mode 0600)")
    prof = config_file.load_profile(cfg, "p", required=True)
    assert prof is not None and "token_store" not in prof.values
    assert prof.values["token"] == "b:t"
