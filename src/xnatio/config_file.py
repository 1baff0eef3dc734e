"""Named profiles in a TOML file in the user's config directory.

The file lives at ``$XNATIO_CONFIG``, else ``$XDG_CONFIG_HOME/xnatio/config.toml``, else
``~/.config/xnatio/config.toml``. Each profile is a table::

    [profiles.default]
    server = "https://xnat.example.org"
    username = "alice"
    verify_tls = true

    [profiles.scanner]
    server = "https://xnat.example.org"
    token = "8f1e...:c0ffee..."        # written by `xio login --save-token`
    token_server = "https://xnat.example.org"

A file that holds a password or token must be private to its owner (mode 0600). xnatio refuses to
read secrets from a file other users can read, the way ssh refuses a private key with loose
permissions: a leaked XNAT password opens every project the account can see.

Writes (``xio login --save-token``) edit only the lines of one profile, so comments and the
other profiles survive, and leave the file with mode 0600.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xnatio.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Keys a profile may hold, with the type each must have.
PROFILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "server": str,
    "username": str,
    "password": str,
    "token": str,
    "token_server": str,
    "token_store": str,
    "verify_tls": bool,
    "ca_bundle": str,
    "dicom_host": str,
    "dicom_port": int,
    "dicom_called_aet": str,
    "dicom_calling_aet": str,
}
SECRET_KEYS = ("password", "token")
DEFAULT_PROFILE = "default"


NO_HOME = Path("/nonexistent")  # the home of a user who has none (Debian's convention)


def user_home(environ: Mapping[str, str] | None = None) -> Path | None:
    """``$HOME``, else the passwd entry's home; None for a user with neither (a cron job or a
    container running as a uid that has no passwd entry, with HOME unset)."""
    env = os.environ if environ is None else environ
    if env.get("HOME"):
        return Path(env["HOME"])
    try:
        return Path.home()
    except (RuntimeError, KeyError, OSError):
        return None


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the config file is (whether or not it exists); a user without a home has none."""
    env = os.environ if environ is None else environ
    if env.get("XNATIO_CONFIG"):
        return Path(env["XNATIO_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str((user_home(env) or NO_HOME) / ".config")
    return Path(base).expanduser() / "xnatio" / "config.toml"


def is_private(path: Path) -> bool:
    """True when no one but the owner can read ``path`` (always true off POSIX)."""
    if os.name != "posix":
        return True
    return not (path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


@dataclass(frozen=True)
class Profile:
    """One profile as read from the file; ``values`` holds only keys that were set."""

    name: str
    path: Path
    values: Mapping[str, Any] = field(default_factory=dict)

    def label(self, key: str) -> str:
        """Where a value came from, for ``Settings.sources``."""
        return f"config {self.path} [profiles.{self.name}] {key}"


def load_config(path: Path) -> dict[str, Any]:
    """The parsed file, or ``{}`` when it does not exist."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"config file {path}: 'profiles' must be a table")
    return dict(data)


def load_profile(path: Path, name: str, *, required: bool) -> Profile | None:
    """Read profile ``name`` from ``path``.

    ``required`` (the name was asked for by ``--profile``/``XNATIO_PROFILE``) turns a missing
    profile into an error; the implicit ``default`` profile may be absent.
    """
    data = load_config(path)
    profiles: dict[str, Any] = data.get("profiles", {})
    table = profiles.get(name)
    if table is None:
        if required:
            known = ", ".join(sorted(profiles)) or "none"
            where = path if path.exists() else f"{path} (no such file)"
            raise ConfigError(f"no profile {name!r} in {where}; profiles: {known}")
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [profiles.{name}] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        expected = PROFILE_KEYS.get(key)
        if expected is None:
            raise ConfigError(
                f"config file {path}: unknown key {key!r} in [profiles.{name}] "
                f"(known: {', '.join(PROFILE_KEYS)})"
            )
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"config file {path}: [profiles.{name}] {key} has the wrong type")
        values[key] = value
    if any(k in values for k in SECRET_KEYS) and not is_private(path):
        mode = stat.S_IMODE(path.stat().st_mode)
        raise ConfigError(
            f"config file {path} holds a password or token but other users can read it "
            f"(mode {mode:04o}); run: chmod 600 {path}"
        )
    return Profile(name=name, path=path, values=values)


# --- writing -------------------------------------------------------------------------------------


def _toml_value(value: str | bool | int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    # TOML forbids control characters in basic strings, DEL (U+007F) included: a password
    # holding one could not be saved (found by tests/test_properties.py).
    escaped = "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")


def _header_names(name: str) -> set[str]:
    return {f"profiles.{name}", f'profiles."{name}"'}


def update_profile(path: Path, name: str, updates: Mapping[str, str | bool | int | None]) -> None:
    """Set (or with ``None`` remove) keys of profile ``name``, creating file and table if needed.

    Only the affected lines change; the result is written to a temporary file with mode 0600 and
    renamed over the old one, so a crash never leaves a half-written or readable file behind.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ConfigError(f"profile names may hold letters, digits, '-' and '_' only: {name!r}")
    unknown = [k for k in updates if k not in PROFILE_KEYS]
    if unknown:
        raise ConfigError(f"unknown profile key {unknown[0]!r}")
    try:
        # Lines end at "\n" only: splitlines() would also cut a TOML string holding \x85,
        # \x1c-\x1e or U+2028 (found by tests/test_properties.py).
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        lines = []
    if lines and lines[-1] == "":
        lines.pop()
    start = end = None
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if not m:
            continue
        if start is not None:
            end = i
            break
        if m.group(1) in _header_names(name):
            start = i
    pending = dict(updates)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines.append(f"[profiles.{name}]")
        start, end = len(lines) - 1, len(lines)
    elif end is None:
        end = len(lines)
    body = lines[start + 1 : end]
    new_body: list[str] = []
    for line in body:
        m = _KEY.match(line)
        key: str | None = m.group(1).strip("\"'") if m else None
        if key is not None and key in pending:
            value = pending.pop(key)
            if value is not None:
                new_body.append(f"{key} = {_toml_value(value)}")
            continue
        new_body.append(line)
    # New keys go after the last non-blank line of the table, before any blank separator.
    insert_at = len(new_body)
    while insert_at > 0 and not new_body[insert_at - 1].strip():
        insert_at -= 1
    added = [f"{k} = {_toml_value(v)}" for k, v in pending.items() if v is not None]
    new_body[insert_at:insert_at] = added
    lines[start + 1 : end] = new_body
    text = "\n".join(lines) + "\n"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # never write a file we could not read back
        raise ConfigError(f"cannot update {path}: the file is not valid TOML ({exc})") from None
    write_private(path, text)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (directory 0700 when created), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by umask and ignored if tmp existed
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
