"""What every command module shares: the lazily opened installation, the actor, table output."""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from ca.authorities.issuers import default_issuing_ca, get_authority
from ca.context import Pki
from ca.errors import InputError
from ca.kinds import CaStatus
from ca.store.models import Authority
from ca.work import Work
from ocsp.presign import Presigner, policy_from


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


class State:
    """Lazily opened installation, shared by the subcommands of one invocation."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._pki: Pki | None = None
        self._status: Presigner | None = None
        self.json_output = False  # --json: an error becomes a JSON document on stdout too (cli.main)

    def pki(self, *, create: bool = False) -> Pki:
        if self._pki is None:
            self._pki = Pki.open(self.home, os.environ, create=create)
        return self._pki

    def status(self) -> Presigner:
        """Pre-signs OCSP responses for every change a command makes (issue, revoke, release)."""
        if self._status is None:
            pki = self.pki()
            self._status = Presigner(pki.token(), policy_from(pki.config.ocsp))
        return self._status

    def work(self, session: Any) -> Work:
        """What a core flow works with in this command: ``session``, the token, the status signer, the user."""
        pki = self.pki()
        return Work(session=session, actor=actor(), status=self.status(), token=pki.token())

    def close(self) -> None:
        if self._pki is not None:
            self._pki.close()


pass_state = click.make_pass_decorator(State)


def utc_now() -> datetime:
    return datetime.now(UTC)


def fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def table(headers: list[str], rows: list[list[str]]) -> None:
    if not rows:
        click.echo("(none)")
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


JSON_HELP = "Print one JSON document on stdout instead (fields and exit codes: docs/cli-json.md)."


def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        state = ctx.find_object(State)
        if state is not None:
            state.json_output = True
    return value


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` (passed as ``as_json``): one JSON document on stdout, nothing else there."""
    return click.option("--json", "as_json", is_flag=True, callback=_remember_json, help=JSON_HELP)(function)


def emit_json(document: Any) -> None:
    """The command's one JSON document (UTF-8, keys in the documented order)."""
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


def pick_issuing(session: Any, ca_name: str | None, environment: str | None) -> Authority:
    if ca_name:
        return get_authority(session, ca_name)
    return default_issuing_ca(session, environment)


def note(authority: Authority) -> None:
    """Always say which environment a command acts on (stderr, so stdout stays clean PEM)."""
    state = (
        "" if authority.status == CaStatus.ACTIVE else f" ({authority.status})"
    )  # e.g. `ca chain --ca` of a revoked CA
    click.echo(f"[{authority.environment}] CA {authority.name}{state}", err=True)


def check_writable(path: Path) -> None:
    """Refuse an output file that cannot be written, before a command changes anything."""
    if path.is_dir():
        raise InputError(f"{path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{path} is not writable")
    if len(path.name.encode("utf-8", "surrogateescape")) > 255:
        raise InputError(f"the file name {path.name[:40]}… is too long")
