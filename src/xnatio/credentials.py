"""Where credentials live outside flags and the environment: netrc, keyring, stored tokens, prompt.

Stored tokens are XNAT alias tokens (``GET /data/services/tokens/issue`` returns ``alias`` and
``secret``; XNAT accepts them as HTTP Basic ``alias:secret`` and expires them after 48 hours by
default). ``xio login --save-token`` puts one in the system keyring when the optional ``keyring``
package has a working backend, else in the profile of the config file (mode 0600). A token is
stored with the server it was issued by and is only ever sent back to that server.
"""

from __future__ import annotations

import getpass
import logging
import netrc
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from xnatio import config_file
from xnatio.errors import ConfigError

log = logging.getLogger(__name__)

KEYRING_SERVICE = "xnatio"


@dataclass(frozen=True)
class NetrcEntry:
    login: str
    password: str
    path: Path


def netrc_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$NETRC`` (as curl and requests honour it), else ``~/.netrc``."""
    env = os.environ if environ is None else environ
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    return (config_file.user_home(env) or config_file.NO_HOME) / ".netrc"


def netrc_lookup(server: str, path: Path) -> NetrcEntry | None:
    """The ``machine`` entry for the server's host name (or ``default``), if any."""
    host = urlsplit(server).hostname or ""
    if not path.is_file():
        return None
    try:
        parsed = netrc.netrc(str(path))
    except netrc.NetrcParseError as exc:
        # Not exc.msg: it quotes the offending token, which may be a password.
        raise ConfigError(
            f"cannot read {path}: not valid netrc syntax (line {exc.lineno})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    auth = parsed.authenticators(host)
    if not auth or not auth[2]:
        return None
    if not config_file.is_private(path):
        # Same rule as Python's own netrc module applies to ~/.netrc, and as we apply to the
        # config file: a password other users can read is not used.
        raise ConfigError(
            f"{path} holds a password for {host} but other users can read it; run: chmod 600 {path}"
        )
    return NetrcEntry(login=auth[0], password=auth[2], path=path)


# --- keyring (optional) --------------------------------------------------------------------------


def _keyring() -> Any | None:
    """The ``keyring`` module when installed and backed by a real store, else None."""
    try:
        import keyring  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
        # The fail/null backends (no Secret Service, no Keychain...) have priority <= 0.
        if float(getattr(backend, "priority", 0)) <= 0:
            return None
    except Exception as exc:  # keyring backends raise all kinds of errors on broken setups
        log.debug("keyring unusable: %s", exc)
        return None
    return keyring


def keyring_available() -> bool:
    return _keyring() is not None


def _keyring_user(profile: str, server: str) -> str:
    return f"{profile}@{server}"


def keyring_get_token(profile: str, server: str) -> str | None:
    kr = _keyring()
    if kr is None:
        return None
    try:
        value = kr.get_password(KEYRING_SERVICE, _keyring_user(profile, server))
    except Exception as exc:
        log.debug("keyring lookup failed: %s", exc)
        return None
    return str(value) if value else None


# --- stored tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredToken:
    alias: str
    secret: str
    where: str  # "keyring" or "config <path> [profiles.NAME]"


def split_token(value: str, *, name: str) -> tuple[str, str]:
    """``alias:secret`` -> (alias, secret); the secret is never part of the error."""
    alias, sep, secret = value.partition(":")
    if not sep or not alias or not secret:
        raise ConfigError(f"{name} must look like ALIAS:SECRET")
    return alias, secret


def load_stored_token(profile: config_file.Profile, server: str) -> StoredToken | None:
    """The token ``xio login --save-token`` stored for this profile and server, if any."""
    values = profile.values
    if values.get("token_server", server).rstrip("/") != server:
        return None  # issued by another server: never send it here
    if values.get("token_store") == "keyring":
        raw = keyring_get_token(profile.name, server)
        if raw:
            alias, secret = split_token(raw, name="the keyring token")
            return StoredToken(alias, secret, f"keyring (profile {profile.name})")
    if values.get("token"):
        alias, secret = split_token(str(values["token"]), name=profile.label("token"))
        return StoredToken(alias, secret, profile.label("token"))
    return None


def save_token(path: Path, profile: str, server: str, alias: str, secret: str) -> str:
    """Store a token for ``profile`` and ``server``; return where it went (for the user).

    The profile also gets ``server`` when it has none, so ``--profile NAME`` alone finds it later.
    """
    existing = config_file.load_profile(path, profile, required=False)
    updates: dict[str, str | bool | int | None] = {"token_server": server}
    if existing is None or "server" not in existing.values:
        updates["server"] = server
    kr = _keyring()
    if kr is not None:
        try:
            kr.set_password(KEYRING_SERVICE, _keyring_user(profile, server), f"{alias}:{secret}")
        except Exception as exc:
            log.warning("could not store the token in the keyring (%s); using %s", exc, path)
        else:
            updates.update(token_store="keyring", token=None)
            config_file.update_profile(path, profile, updates)
            return "the system keyring"
    updates.update(token=f"{alias}:{secret}", token_store=None)
    config_file.update_profile(path, profile, updates)
    return f"{path} [profiles.{profile}] (mode 0600)"


# --- prompt --------------------------------------------------------------------------------------


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, AttributeError):  # closed or replaced stdin
        return False


def prompt_username(server: str) -> str:
    sys.stderr.write(f"Username for {server}: ")
    sys.stderr.flush()
    return sys.stdin.readline().strip()


def prompt_password(username: str, server: str) -> str:
    # getpass reads from /dev/tty with echo off and writes the prompt there, not to stdout.
    return getpass.getpass(f"Password for {username} at {server}: ")
