"""Configuration and credentials, resolved once at the CLI edge and passed down.

Each value is taken from the first source that has it, highest first:

1. command-line flags (the keyword arguments of :func:`resolve_settings`);
2. the environment: ``XNAT_SERVER``, ``XNAT_USERNAME``, ``XNAT_PASSWORD``, ``XNAT_TOKEN``
   (``alias:secret``, sent as Basic credentials), ``XNAT_VERIFY_TLS``, ``XNAT_CA_BUNDLE``,
   ``XNAT_DICOM_HOST/PORT/CALLED_AET/CALLING_AET``;
3. an env file: ``--env-file FILE``, else ``./.env`` when present (``KEY=VALUE`` lines with the
   same names; read, never exported into ``os.environ``);
4. a profile of the TOML config file (``--profile``, else ``XNATIO_PROFILE``, else ``default``),
   including a token stored there or in the keyring by ``xio login --save-token``;
5. ``~/.netrc`` (or ``$NETRC``), the ``machine`` entry of the server's host;
6. an interactive prompt, only when stdin is a terminal and credentials are needed.

Credentials that belong together stay together: a token (``alias:secret``), a netrc entry or a
profile's username+password pair is used only when no higher source already chose a different
user name, so ``--user bob`` is never combined with alice's stored token. Within one level a
token is preferred to a username, except in flags/environment where ``XNAT_USERNAME`` +
``XNAT_PASSWORD`` come first.

Every value remembers where it came from (``Settings.sources``) so ``xio config show`` and error
messages can say so; the value of a secret is never shown.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from xnatio import config_file, credentials, defaults
from xnatio.errors import AuthError, ConfigError

log = logging.getLogger(__name__)


class Secret:
    """A password or token that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('<hidden>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: str, *, name: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


DISPLAY_FIELDS = (
    "server",
    "username",
    "password",
    "verify_tls",
    "ca_bundle",
    "dicom_host",
    "dicom_port",
    "dicom_called_aet",
    "dicom_calling_aet",
)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a command needs to reach XNAT (REST) or its DICOM receiver (C-STORE)."""

    server: str | None = None
    username: str | None = None
    password: Secret | None = None
    verify_tls: bool = True
    ca_bundle: str | None = None
    dicom_host: str | None = None
    dicom_port: int = defaults.DICOM_PORT
    dicom_called_aet: str = defaults.CALLED_AET
    dicom_calling_aet: str = defaults.CALLING_AET
    # field name -> where its value came from ("--server", "env XNAT_SERVER", "default", ...)
    sources: Mapping[str, str] = field(default_factory=dict)
    # every source consulted for credentials, in order, for the "no credentials" message
    tried: tuple[str, ...] = ()
    # the profile that was read, or the one asked for when it may be missing (login creates it)
    profile: str | None = None
    config_file: str | None = None  # where the config file is (read or not)
    # things worth telling the user (plain http, TLS checks off); shown by `xio config show`,
    # while the HTTP client logs its own plain-http warning when it is created
    warnings: tuple[str, ...] = ()
    # credentials asked for interactively by require_credentials(), asked once per Settings
    _prompted: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def verify(self) -> bool | str:
        """The ``verify`` argument for requests: False, True, or the CA bundle path."""
        if not self.verify_tls:
            return False
        return self.ca_bundle or True

    def require_server(self) -> str:
        if not self.server:
            raise ConfigError(
                "no XNAT server given: pass --server URL, set XNAT_SERVER, "
                "or add server to a profile of " + (self.config_file or "the config file")
            )
        return self.server

    def require_credentials(self, *, interactive: bool | None = None) -> tuple[str, str]:
        """(username, password); asks on the terminal if stdin is one, else raises AuthError.

        The AuthError names every source that was tried. ``interactive=False`` never asks.
        """
        if self.username and self.password:
            return self.username, self.password.reveal()
        if "password" in self._prompted:
            return self._prompted["username"], self._prompted["password"]
        ask = credentials.stdin_is_terminal() if interactive is None else interactive
        if ask:
            where = self.server or "XNAT"
            user = self.username or credentials.prompt_username(where)
            password = credentials.prompt_password(user, where) if user else ""
            if user and password:
                self._prompted.update(username=user, password=password)
                return user, password
        tried = list(self.tried) or ["--user/--password", "XNAT_USERNAME/XNAT_PASSWORD"]
        tried.append("interactive prompt" if ask else "prompt (stdin is not a terminal)")
        missing = "username" if not self.username else "password"
        who = f" for {self.username}" if self.username else ""
        raise AuthError(
            f"no {missing}{who} at {self.server or 'the server'}; tried: {', '.join(tried)}"
        )

    def credential_source(self) -> str:
        """Where the password or token came from, in words (never the value)."""
        if "password" in self._prompted:
            return "prompt"
        return self.sources.get("password", "nowhere")

    def redacted(self) -> dict[str, str]:
        """The resolved values with secrets hidden, for display."""
        out: dict[str, str] = {}
        for name in DISPLAY_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            out[name] = "<hidden>" if isinstance(value, Secret) else str(value)
        return out


def normalise_server(url: str) -> str:
    """Accept ``host``, ``host:port`` or a URL; return ``scheme://host[:port][/path]`` w/o slash."""
    url = url.strip()
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Never echo it: the URL holds a password. Credentials in URLs end up in shell history,
        # logs and every error message that names the server.
        raise ConfigError(
            "the server URL must not hold credentials (user:password@); "
            "use --user and XNAT_PASSWORD, a profile, or ~/.netrc"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) server URL: {url!r}")
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name, an IPv4 or a bracketed/bare IPv6 address) is this machine:
    plain http to it exposes no credentials. The one test of it (settings and XnatClient)."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- env files -----------------------------------------------------------------------------------


def parse_env_file(path: Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines: ``#`` comments, blank lines, ``export KEY=...``, quoted values.

    Single quotes are literal; double quotes and bare values follow shell quoting (a bare value
    ends at `` #``). Nothing is exported into ``os.environ``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}") from None
    out: dict[str, str] = {}
    # Lines end at "\n" only, as for the shell: str.splitlines() would also cut at \x1c-\x1e,
    # \x85, U+2028 ... inside a quoted value (found by tests/test_properties.py).
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum():  # "_" alone is a name too
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE")
        try:
            parts = shlex.split(value, comments=True, posix=True)
        except ValueError:
            raise ConfigError(f"{path}:{lineno}: unbalanced quotes in {key}") from None
        out[key] = " ".join(parts)
    return out


# --- resolution ----------------------------------------------------------------------------------

# Setting name -> environment variable (also the key in env files).
_ENV_NAMES = {
    "server": "XNAT_SERVER",
    "username": "XNAT_USERNAME",
    "password": "XNAT_PASSWORD",
    "token": "XNAT_TOKEN",
    "verify_tls": "XNAT_VERIFY_TLS",
    "ca_bundle": "XNAT_CA_BUNDLE",
    "dicom_host": "XNAT_DICOM_HOST",
    "dicom_port": "XNAT_DICOM_PORT",
    "dicom_called_aet": "XNAT_DICOM_CALLED_AET",
    "dicom_calling_aet": "XNAT_DICOM_CALLING_AET",
}
_FLAG_NAMES = {
    "server": "--server",
    "username": "--user",
    "password": "--password",
    "token": "--token",
    "verify_tls": "--verify-tls/--no-verify-tls",
    "ca_bundle": "--ca-bundle",
    "dicom_host": "--dicom-host",
    "dicom_port": "--dicom-port",
    "dicom_called_aet": "--dicom-called-aet",
    "dicom_calling_aet": "--dicom-calling-aet",
}

# One source's values: name -> (value, where it came from).
_Layer = dict[str, tuple[Any, str]]


def _env_layer(env: Mapping[str, str], label: str) -> _Layer:
    return {name: (env[var], f"{label} {var}") for name, var in _ENV_NAMES.items() if env.get(var)}


class _Credentials:
    """Walks the sources high to low, keeping pairs (token, netrc entry) together."""

    def __init__(self) -> None:
        self.username: str | None = None
        self.password: str | None = None
        self.sources: dict[str, str] = {}

    def loose(self, layer: _Layer) -> None:
        if self.username is None and "username" in layer:
            self.username, self.sources["username"] = layer["username"]
        if self.password is None and "password" in layer:
            self.password, self.sources["password"] = layer["password"]

    def pair(self, user: str, secret: str, where: str) -> bool:
        if self.password is not None or self.username not in (None, user):
            return False
        if self.username is None:
            self.username, self.sources["username"] = user, where
        self.password, self.sources["password"] = secret, where
        return True

    def token(self, layer: _Layer) -> None:
        if "token" in layer:
            raw, where = layer["token"]
            alias, secret = credentials.split_token(str(raw), name=where)
            self.pair(alias, secret, where)

    @property
    def complete(self) -> bool:
        return self.username is not None and self.password is not None


def resolve_settings(
    *,
    server: str | None = None,
    username: str | None = None,
    password: str | None = None,
    verify_tls: bool | None = None,
    ca_bundle: str | None = None,
    dicom_host: str | None = None,
    dicom_port: int | None = None,
    dicom_called_aet: str | None = None,
    dicom_calling_aet: str | None = None,
    environ: Mapping[str, str] | None = None,
    token: str | None = None,
    env_file: str | Path | None = None,
    profile: str | None = None,
    read_dotenv: bool = True,
    use_netrc: bool = True,
    cwd: Path | None = None,
    need_credentials: bool = False,
    interactive: bool | None = None,
    profile_may_be_missing: bool = False,
) -> Settings:
    """Resolve settings from flags (the keyword arguments) and every source below them.

    ``need_credentials`` asks for missing credentials on the terminal (only when stdin is one,
    or ``interactive``) and otherwise raises :class:`AuthError` naming every source tried.
    Without it, missing credentials are left as None (``Settings.require_credentials`` asks later).
    A profile named by ``profile``/``XNATIO_PROFILE`` must exist unless ``profile_may_be_missing``
    (``xio login --save-token`` creates it).
    """
    env = os.environ if environ is None else environ
    flags: _Layer = {}
    given = {
        "server": server,
        "username": username,
        "password": password,
        "token": token,
        "verify_tls": verify_tls,
        "ca_bundle": ca_bundle,
        "dicom_host": dicom_host,
        "dicom_port": dicom_port,
        "dicom_called_aet": dicom_called_aet,
        "dicom_calling_aet": dicom_calling_aet,
    }
    for name, value in given.items():
        if value is not None:
            flags[name] = (value, _FLAG_NAMES[name])
    env_layer = _env_layer(env, "env")

    # Env file: explicit, else ./.env when present.
    file_env: dict[str, str] = {}
    env_file_layer: _Layer = {}
    dotenv_label = None
    if env_file is not None:
        path = Path(env_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"env file {path} does not exist")
        file_env, dotenv_label = parse_env_file(path), f"env file {path}"
    elif read_dotenv:
        path = (cwd or Path.cwd()) / ".env"
        if path.is_file():
            file_env, dotenv_label = parse_env_file(path), f"env file {path}"
    if dotenv_label:
        env_file_layer = _env_layer(file_env, dotenv_label)

    # Profile: --profile > XNATIO_PROFILE (environment, then env file) > "default" if present.
    cfg_path = config_file.config_path(env)
    requested = profile or env.get("XNATIO_PROFILE") or file_env.get("XNATIO_PROFILE")
    if requested:
        prof = config_file.load_profile(cfg_path, requested, required=not profile_may_be_missing)
    else:
        prof = config_file.load_profile(cfg_path, config_file.DEFAULT_PROFILE, required=False)
    profile_layer: _Layer = {}
    if prof is not None:
        profile_layer = {
            k: (v, prof.label(k))
            for k, v in prof.values.items()
            if k not in ("token", "token_server", "token_store")
        }

    layers = [flags, env_layer, env_file_layer, profile_layer]
    sources: dict[str, str] = {}

    def pick(name: str) -> Any:
        for layer in layers:
            if name in layer:
                value, sources[name] = layer[name]
                return value
        return None

    srv = pick("server")
    server_url = normalise_server(str(srv)) if srv else None

    # Credentials, level by level.
    creds = _Credentials()
    tried: list[str] = []
    tried.append("--user/--password")
    creds.loose(flags)
    creds.token(flags)
    tried.append("env XNAT_USERNAME/XNAT_PASSWORD/XNAT_TOKEN")
    creds.loose(env_layer)
    creds.token(env_layer)
    if dotenv_label:
        tried.append(dotenv_label)
        creds.loose(env_file_layer)
        creds.token(env_file_layer)
    else:
        tried.append("./.env (none)")
    if prof is not None:
        tried.append(f"profile {prof.name!r} of {cfg_path}")
        stored = credentials.load_stored_token(prof, server_url) if server_url else None
        if stored is not None:
            creds.pair(stored.alias, stored.secret, stored.where)
        pv = prof.values
        if "username" in pv and "password" in pv:
            creds.pair(pv["username"], pv["password"], prof.label("username/password"))
        creds.loose(profile_layer)
    else:
        tried.append(f"profile 'default' of {cfg_path} (none)")
    if use_netrc and server_url and not creds.complete:
        npath = credentials.netrc_path(env)
        tried.append(str(npath))
        entry = credentials.netrc_lookup(server_url, npath)
        if entry is not None:
            creds.pair(entry.login, entry.password, f"netrc {entry.path}")
    sources.update(creds.sources)

    tls = True
    tls_value = pick("verify_tls")
    if isinstance(tls_value, bool):
        tls = tls_value
    elif tls_value is not None:
        tls = parse_bool(str(tls_value), name=sources["verify_tls"])

    bundle = pick("ca_bundle")
    if bundle is not None:
        bundle = str(Path(str(bundle)).expanduser())
        if not Path(bundle).is_file():
            raise ConfigError(f"CA bundle {bundle} ({sources['ca_bundle']}) does not exist")

    dhost = pick("dicom_host")
    if dhost is None and server_url:
        dhost = urlsplit(server_url).hostname
        sources["dicom_host"] = f"host of {sources['server']}"
    dport_v = pick("dicom_port")
    try:
        dport = int(dport_v) if dport_v is not None else defaults.DICOM_PORT
    except ValueError:
        raise ConfigError(f"DICOM port must be a number, not {dport_v!r}") from None
    called = pick("dicom_called_aet")
    calling = pick("dicom_calling_aet")

    warnings: list[str] = []
    if server_url and creds.password is not None:
        host = urlsplit(server_url).hostname or ""
        if server_url.startswith("http://") and not is_loopback(host):
            warnings.append(
                f"credentials will be sent unencrypted over plain http to {host}; use https://"
            )
    if not tls:
        warnings.append(f"TLS certificate checking is off ({sources['verify_tls']})")

    settings = Settings(
        server=server_url,
        username=creds.username,
        password=Secret(creds.password) if creds.password else None,
        verify_tls=tls,
        ca_bundle=bundle,
        dicom_host=str(dhost) if dhost else None,
        dicom_port=dport,
        dicom_called_aet=str(called or defaults.CALLED_AET),
        dicom_calling_aet=str(calling or defaults.CALLING_AET),
        sources=sources,
        tried=tuple(tried),
        profile=prof.name if prof else requested,
        config_file=str(cfg_path),
        warnings=tuple(warnings),
    )
    if need_credentials and not (settings.username and settings.password):
        user, secret = settings.require_credentials(interactive=interactive)
        sources = {**sources, "password": "prompt"}
        if not creds.username:
            sources["username"] = "prompt"
        settings = replace(settings, username=user, password=Secret(secret), sources=sources)
    return settings
