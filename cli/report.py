"""`chargepki report …`: expiring certificates, the inventory, campaign progress (ca/reports.py), each
as a table, CSV or JSON, to stdout or a file, optionally with a detached signature (ca/audit/exports.py)."""

from __future__ import annotations

import shlex
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from ca.audit.exports import sign_export
from ca.issuance.names import ENVIRONMENTS
from ca.issuance.profiles import PROFILES
from ca.reports import FORMATS, Report, campaigns, expiring, inventory, render
from cli.common import State, actor, check_writable, pass_state, utc_now
from cli.params import DURATION


@click.group()
def report() -> None:
    """Operations reports as a table, CSV or JSON; --out FILE --sign adds a signature openssl verifies."""


_OUTPUT_OPTIONS = [
    click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True),
    click.option(
        "--out",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write the report to FILE (else stdout, where nothing else is printed).",
    ),
    click.option(
        "--sign",
        is_flag=True,
        help="With --out: sign FILE's exact bytes with the audit key in the token; writes FILE.sig (DER "
        "ECDSA-SHA256) and FILE.pem (the public key) and prints the openssl command that verifies them.",
    ),
]


def _output_options(function: Any) -> Any:
    for option in reversed(_OUTPUT_OPTIONS):
        function = option(function)
    return function


def _prepare(state: State, fmt: str, out: Path | None, sign: bool) -> None:
    """Refuse what cannot be delivered before any work (or signature) is done."""
    if sign and out is None:
        raise click.UsageError("--sign needs --out FILE: the signature goes to FILE.sig, the public key to FILE.pem")
    if out is not None:
        for path in (out, *((_sibling(out, ".sig"), _sibling(out, ".pem")) if sign else ())):
            check_writable(path)
    elif fmt == "json":
        state.json_output = True  # stdout is the JSON document: an error becomes one too


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _deliver(state: State, made: Report, fmt: str, out: Path | None, sign: bool) -> None:
    data = render(made, fmt)
    if out is None:
        click.echo(data, nl=False)  # bytes: written as they are, the same bytes --out would hold
        return
    signed = None
    if sign:  # before anything is written: a failed signature leaves no unsigned FILE behind
        pki = state.pki()
        with pki.store.session() as session:
            signed = sign_export(
                session,
                pki.token(),
                data,
                actor=actor(),
                subject=f"report {made.kind}",
                details={"file": out.name, "format": fmt},
            )
    out.write_bytes(data)
    click.echo(f"wrote {out} ({len(data)} bytes)")
    if signed is not None:
        signature, public_key = _sibling(out, ".sig"), _sibling(out, ".pem")
        signature.write_bytes(signed.signature)
        public_key.write_bytes(signed.public_key_pem)
        click.echo(f"signed by the audit key {signed.key_sha256} (the key of `audit verify`'s checkpoints)")
        click.echo(f"  signature {signature}, public key {public_key}, export SHA-256 {signed.sha256}")
        command = ["openssl", "dgst", "-sha256", "-verify", str(public_key), "-signature", str(signature), str(out)]
        click.echo(f"verify: {shlex.join(command)}")


@report.command("expiring")
@click.option("--within", type=DURATION, default="30d", show_default=True, help="How far ahead to look.")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option("--profile", type=click.Choice(list(PROFILES)))
@_output_options
@pass_state
def report_expiring(
    state: State,
    within: timedelta,
    environment: str | None,
    profile: str | None,
    fmt: str,
    out: Path | None,
    sign: bool,
) -> None:
    """Valid certificates that expire within --within, soonest first, with their CA and device.

    Certificates a re-enrollment already superseded (revoked at the end of their grace period) are left out.
    """
    _prepare(state, fmt, out, sign)
    with state.pki().store.session() as session:
        made = expiring(session, utc_now(), within=within, environment=environment, profile=profile)
    _deliver(state, made, fmt, out, sign)


@report.command("inventory")
@click.option("--environment", type=click.Choice(ENVIRONMENTS), help="Only this environment.")
@_output_options
@pass_state
def report_inventory(state: State, environment: str | None, fmt: str, out: Path | None, sign: bool) -> None:
    """Counts: devices per environment, model and state; certificates per environment, CA, profile,
    device model and status (valid, expired, revoked, hold, pending, aborted).

    CSV puts both in one table with a `kind` column (device or certificate).
    """
    _prepare(state, fmt, out, sign)
    with state.pki().store.session() as session:
        made = inventory(session, utc_now(), environment=environment)
    _deliver(state, made, fmt, out, sign)


@report.command("campaign")
@click.argument("name", required=False)
@_output_options
@pass_state
def report_campaign(state: State, name: str | None, fmt: str, out: Path | None, sign: bool) -> None:
    """Progress of re-enrollment campaigns: every campaign, or NAME (its number or the CA it moves
    devices off) with each of its devices, re-enrolled, pending or failed and why.

    CSV holds the campaigns, or with NAME the devices.
    """
    _prepare(state, fmt, out, sign)
    with state.pki().store.session() as session:
        made = campaigns(session, utc_now(), name=name)
    _deliver(state, made, fmt, out, sign)
