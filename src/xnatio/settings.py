"""Configuration and credentials, resolved once at the CLI edge and passed down.

Precedence, highest first: command-line flags > environment (``XNAT_SERVER``, ``XNAT_USERNAME``,
``XNAT_PASSWORD``, ``XNAT_VERIFY_TLS``, ``XNAT_DICOM_*``). Every value remembers where it came from
(``Settings.sources``) so ``xio config show`` and error messages can say so without showing secrets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from xnatio.errors import AuthError, ConfigError


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


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a command needs to reach XNAT (REST) or its DICOM receiver (C-STORE)."""

    server: str | None = None
    username: str | None = None
    password: Secret | None = None
    verify_tls: bool = True
    ca_bundle: str | None = None
    dicom_host: str | None = None
    dicom_port: int = 8104
    dicom_called_aet: str = "XNAT"
    dicom_calling_aet: str = "XNATIO"
    # field name -> where its value came from ("--server", "env XNAT_SERVER", "default", ...)
    sources: Mapping[str, str] = field(default_factory=dict)
    # every source consulted for credentials, in order, for the "no credentials" message
    tried: tuple[str, ...] = ()

    def require_server(self) -> str:
        if not self.server:
            raise ConfigError("no XNAT server given: pass --server URL or set XNAT_SERVER")
        return self.server

    def require_credentials(self) -> tuple[str, str]:
        """(username, password); raises AuthError naming every source that was tried."""
        if self.username and self.password:
            return self.username, self.password.reveal()
        tried = ", ".join(self.tried) or "--user/--password flags, XNAT_USERNAME/XNAT_PASSWORD"
        missing = "username" if not self.username else "password"
        raise AuthError(f"no {missing} found for {self.server or 'the server'} (tried {tried})")

    def redacted(self) -> dict[str, str]:
        """The resolved values with secrets hidden, for display."""
        out: dict[str, str] = {}
        for name in (
            "server",
            "username",
            "password",
            "verify_tls",
            "ca_bundle",
            "dicom_host",
            "dicom_port",
            "dicom_called_aet",
            "dicom_calling_aet",
        ):
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
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) server URL: {url!r}")
    return url.rstrip("/")


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
) -> Settings:
    """Resolve settings from flags (the keyword arguments) and the environment."""
    env = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    tried: list[str] = []

    def pick(name: str, flag_value: object, flag: str, env_var: str | None) -> str | None:
        if flag_value is not None:
            sources[name] = flag
            return str(flag_value)
        if env_var and env.get(env_var):
            sources[name] = f"env {env_var}"
            return env[env_var]
        return None

    srv = pick("server", server, "--server", "XNAT_SERVER")
    tried.append("--user/--password")
    tried.append("XNAT_USERNAME/XNAT_PASSWORD")
    user = pick("username", username, "--user", "XNAT_USERNAME")
    pw = pick("password", password, "--password", "XNAT_PASSWORD")

    tls: bool = True
    if verify_tls is not None:
        tls, sources["verify_tls"] = verify_tls, "--verify-tls/--no-verify-tls"
    elif env.get("XNAT_VERIFY_TLS"):
        tls = parse_bool(env["XNAT_VERIFY_TLS"], name="XNAT_VERIFY_TLS")
        sources["verify_tls"] = "env XNAT_VERIFY_TLS"

    server_url = normalise_server(srv) if srv else None
    dhost = pick("dicom_host", dicom_host, "--dicom-host", "XNAT_DICOM_HOST")
    if dhost is None and server_url:
        dhost = urlsplit(server_url).hostname
        sources["dicom_host"] = f"host of {sources['server']}"
    dport_s = pick("dicom_port", dicom_port, "--dicom-port", "XNAT_DICOM_PORT")
    try:
        dport = int(dport_s) if dport_s is not None else 8104
    except ValueError:
        raise ConfigError(f"DICOM port must be a number, not {dport_s!r}") from None
    called = pick(
        "dicom_called_aet", dicom_called_aet, "--dicom-called-aet", "XNAT_DICOM_CALLED_AET"
    )
    calling = pick(
        "dicom_calling_aet", dicom_calling_aet, "--dicom-calling-aet", "XNAT_DICOM_CALLING_AET"
    )
    return Settings(
        server=server_url,
        username=user,
        password=Secret(pw) if pw else None,
        verify_tls=tls,
        ca_bundle=pick("ca_bundle", ca_bundle, "--ca-bundle", None),
        dicom_host=dhost,
        dicom_port=dport,
        dicom_called_aet=called or "XNAT",
        dicom_calling_aet=calling or "XNATIO",
        sources=sources,
        tried=tuple(tried),
    )
