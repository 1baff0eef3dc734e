"""`xio login` (check credentials, optionally store an alias token) and `xio config show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from xnatio import config_file, credentials
from xnatio.cli.options import (
    DicomArgs,
    OutputArgs,
    ServerArgs,
    command_exit_codes,
    dicom_options,
    exit_codes_epilog,
    output_options,
    resolve_cli_settings,
    server_options,
    start_command,
)
from xnatio.errors import AuthError
from xnatio.settings import DISPLAY_FIELDS as FIELDS
from xnatio.settings import Settings

# --- xio login -----------------------------------------------------------------------------------

LOGIN_EPILOG = (
    "\b\nExamples:\n"
    "  xio login --server https://xnat.example.org --user alice\n"
    "  xio login --profile scanner --save-token  # later: xio upload-dicom --profile scanner ...\n"
    "  XNAT_PASSWORD=... xio login --server https://xnat.example.org --user alice --json\n"
    "\b\nA saved token goes to the system keyring when the 'keyring' package has a working\n"
    "backend, else into the profile of the config file (mode 0600). XNAT expires alias tokens\n"
    "after 48 hours by default: run `xio login --save-token` again to renew.\n"
) + exit_codes_epilog(codes=command_exit_codes(ok="logged in (and, with --save-token, saved)"))


def _version_of(info: dict[str, Any]) -> str:
    version = str(info.get("version") or info.get("Version") or "unknown version")
    build = info.get("buildNumber") or info.get("build")
    return f"{version} (build {build})" if build else version


@click.command("login", epilog=LOGIN_EPILOG)
@server_options
@click.option(
    "--save-token",
    is_flag=True,
    help="Issue an XNAT alias token and store it for later runs of this profile.",
)
@output_options
@click.pass_context
def login(
    ctx: click.Context,
    *,
    server: ServerArgs,
    save_token: bool,
    output: OutputArgs,
) -> None:
    """Check that the credentials work, say whose they are and print the XNAT server's version.

    Opens a session (POST /data/JSESSION), reads /xapi/users/username (with a saved alias token:
    the user who issued it, not the alias) and /xapi/siteConfig/buildInfo.
    """
    start_command(ctx, output)
    settings = resolve_cli_settings(server, output=output, profile_may_be_missing=save_token)
    url = settings.require_server()
    username, password = settings.require_credentials()
    from xnatio.xnat.client import XnatClient

    where: str | None = None
    try:
        with XnatClient(url, username=username, password=password, verify=settings.verify) as c:
            info = c.build_info()
            # With an alias token the name logged in with is the alias (a UUID): say whose it is.
            user = c.current_user() or username
            if save_token:
                alias, secret = c.issue_token()
                cfg = Path(settings.config_file or config_file.config_path())
                name = server.profile or settings.profile or config_file.DEFAULT_PROFILE
                where = credentials.save_token(cfg, name, url, alias, secret.reveal())
    except AuthError as exc:
        hint = f" (credentials from {settings.credential_source()})"
        if "token" in settings.credential_source():
            hint += "; the stored token may have expired: log in with a password and --save-token"
        raise AuthError(f"{exc}{hint}") from None
    version = _version_of(info)
    if output.json:
        doc = {
            "server": url,
            "username": user,
            "credentials_from": settings.credential_source(),
            "version": info.get("version"),
            "build_info": info,
            "token_saved": where is not None,
            "token_store": where,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    if output.quiet:
        return
    source = settings.credential_source()
    if user != username:  # an alias token: the alias is not who the user is
        source = f"an alias token from {source}"
    click.echo(f"Logged in to {url} as {user} ({source}).")
    click.echo(f"XNAT {version}")
    if where is not None:
        click.echo(f"Saved an alias token in {where}; later runs with this profile use it.")


# --- xio config ----------------------------------------------------------------------------------


@click.group("config")
def config() -> None:
    """Inspect xnatio's configuration (profiles, env files, environment, netrc)."""


SHOW_EPILOG = (
    "\b\nExamples:\n"
    "  xio config show\n"
    "  xio config show --profile scanner --json\n"
    "\b\nSecrets are never printed: a password or token shows as <hidden>, with its source.\n"
) + exit_codes_epilog(codes=command_exit_codes(ok="configuration shown", auth="", unreachable=""))


def settings_document(settings: Settings) -> dict[str, Any]:
    """What `config show` prints: values (secrets hidden) with their sources; no secret values."""
    values = settings.redacted()
    return {
        "settings": {
            name: {"value": value, "source": settings.sources.get(name, "default")}
            for name, value in values.items()
        },
        "profile": settings.profile,
        "config_file": settings.config_file,
        "credentials_tried": list(settings.tried),
        "keyring_available": credentials.keyring_available(),
        "warnings": list(settings.warnings),
    }


@config.command("show", epilog=SHOW_EPILOG)
@server_options
@dicom_options
@output_options
@click.pass_context
def show(
    ctx: click.Context,
    *,
    server: ServerArgs,
    dicom: DicomArgs,
    output: OutputArgs,
) -> None:
    """Print the resolved settings, where each value came from, and which sources were read."""
    start_command(ctx, output)
    settings = resolve_cli_settings(server, dicom, output=output)
    doc = settings_document(settings)
    if output.json:
        click.echo(json.dumps(doc, indent=2))
        return
    unset = {
        "server": "pass --server, set XNAT_SERVER or add it to a profile",
        "username": "asked on the terminal when needed",
        "password": "asked on the terminal when needed",
    }
    rows: list[tuple[str, str, str]] = []
    for name in FIELDS:
        if name in doc["settings"]:
            rows.append((name, doc["settings"][name]["value"], doc["settings"][name]["source"]))
        elif name in unset:
            rows.append((name, "(not set)", unset[name]))
    width = max(len(r[0]) for r in rows)
    vwidth = min(48, max(len(r[1]) for r in rows))
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value:<{vwidth}}  {source}")
    click.echo("")
    click.echo(f"config file: {settings.config_file}")
    click.echo(f"profile: {settings.profile or '(none)'}")
    click.echo("credential sources, in order: " + ", ".join(settings.tried))
    for w in settings.warnings:
        click.echo(f"warning: {w}", err=True)
