"""CLI commands for the device registry, one-time secrets, registration authorities and `serve est`."""

from __future__ import annotations

import csv
import io
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.authorities.issuers import default_issuing_ca, get_authority, issuer_for
from ca.errors import InputError
from ca.issuance.csr import read_csr
from ca.issuance.flow import IssueRequest, issue, request_from_csr
from ca.issuance.names import ENVIRONMENTS
from ca.issuance.profiles import get_profile
from ca.registry.devices import (
    add_device,
    device_certificates,
    disable_device,
    enable_device,
    get_device,
    import_devices,
    list_devices,
    reset_device,
)
from ca.registry.secrets import issue_secret, issue_secrets, withdraw_secrets
from ca.status.certificates import display_status
from ca.status.revocation import REASONS
from ca.work import Work
from cli import views
from cli.common import State, actor, check_writable, emit_json, fmt_time, json_option, note, pass_state, table
from cli.params import DURATION


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        handle.write(data)


# -- devices ----------------------------------------------------------------------------------------
@click.group()
def device() -> None:
    """The device registry: only registered chargers enroll."""


@device.command("add")
@click.argument("serial")
@click.option("--model")
@click.option("--environment", type=click.Choice(ENVIRONMENTS), default="production", show_default=True)
@pass_state
def device_add(state: State, serial: str, model: str | None, environment: str) -> None:
    """Register a charger by its serial (its OCPP identity, the CN of its certificate)."""
    with state.pki().store.session() as session:
        registered = add_device(Work(session, actor()), serial=serial, model=model, environment=environment)
        click.echo(f"[{registered.environment}] registered device {registered.serial}")


@device.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--environment",
    type=click.Choice(ENVIRONMENTS),
    default="production",
    show_default=True,
    help="For rows without an environment column.",
)
@pass_state
def device_import(state: State, csv_file: Path, environment: str) -> None:
    """Register devices from a CSV with a header: serial[,model][,environment]."""
    with csv_file.open(encoding="utf-8-sig", newline="") as handle:
        rows = max(sum(1 for _ in handle) - 1, 0)
    with (
        state.pki().store.session() as session,
        csv_file.open(encoding="utf-8-sig", newline="") as handle,
        click.progressbar(length=rows, label="importing", file=sys.stderr) as bar,
    ):
        result = import_devices(
            Work(session, actor()), stream=handle, default_environment=environment, progress=bar.update
        )
    click.echo(f"accepted {result.accepted}, refused {len(result.refused)}")
    for line, reason in result.refused:
        click.echo(f"  line {line}: {reason}")
    if result.refused and not result.accepted:
        raise click.exceptions.Exit(1)


@device.command("list")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option("--limit", type=click.IntRange(min=1))
@json_option
@pass_state
def device_list(state: State, environment: str | None, limit: int | None, as_json: bool) -> None:
    """List registered devices."""
    with state.pki().store.session() as session:
        if as_json:
            emit_json(
                {"devices": [views.device(d) for d in list_devices(session, environment=environment, limit=limit)]}
            )
            return
        rows = [
            [
                d.serial,
                d.model or "-",
                d.environment,
                "enabled" if d.enabled else "disabled",
                "open" if d.enrollment_open else "closed",
            ]
            for d in list_devices(session, environment=environment, limit=limit)
        ]
    table(["SERIAL", "MODEL", "ENVIRONMENT", "STATE", "FIRST ENROLLMENT"], rows)


@device.command("show")
@click.argument("serial")
@json_option
@pass_state
def device_show(state: State, serial: str, as_json: bool) -> None:
    """A device and its certificates with their states."""
    now = datetime.now(UTC)
    with state.pki().store.session() as session:
        found = get_device(session, serial)
        if as_json:
            certificates = device_certificates(session, found)
            devices = {found.id: found.serial}
            emit_json(
                {
                    **views.device(found),
                    "certificates": [views.certificate(c, now, devices) for c in certificates],
                }
            )
            return
        click.echo(f"serial:           {found.serial}")
        click.echo(f"model:            {found.model or '-'}")
        click.echo(f"environment:      {found.environment}")
        click.echo(f"state:            {'enabled' if found.enabled else 'disabled'}")
        click.echo(f"first enrollment: {'open' if found.enrollment_open else 'closed (use device reset)'}")
        click.echo(f"registered:       {fmt_time(found.created_at)}")
        rows = [
            [c.serial, c.profile, display_status(c, now), fmt_time(c.not_after), c.revocation_reason or "-"]
            for c in device_certificates(session, found)
        ]
    table(["SERIAL", "PROFILE", "STATUS", "NOT AFTER", "REASON"], rows)


@device.command("disable")
@click.argument("serial")
@click.option("--revoke", is_flag=True, help="Also revoke every certificate of the device that is still valid.")
@click.option("--reason", default="cessationOfOperation", show_default=True, help=f"One of {', '.join(REASONS)}.")
@pass_state
def device_disable(state: State, serial: str, revoke: bool, reason: str) -> None:
    """Refuse further enrollment of a device."""
    with state.pki().store.session() as session:
        found, revoked = disable_device(
            Work(session, actor(), status=state.status()), serial=serial, revoke=revoke, reason=reason
        )
        click.echo(f"[{found.environment}] disabled {found.serial}; revoked {len(revoked)} certificate(s)")


@device.command("enable")
@click.argument("serial")
@pass_state
def device_enable(state: State, serial: str) -> None:
    """Allow a disabled device to enroll again."""
    with state.pki().store.session() as session:
        found = enable_device(Work(session, actor()), serial=serial)
        click.echo(f"[{found.environment}] enabled {found.serial}")


@device.command("reset")
@click.argument("serial")
@pass_state
def device_reset(state: State, serial: str) -> None:
    """Re-open first-time enrollment for a device that already has a certificate."""
    with state.pki().store.session() as session:
        found = reset_device(Work(session, actor()), serial=serial)
        click.echo(f"[{found.environment}] first enrollment re-opened for {found.serial}")


# -- one-time secrets ------------------------------------------------------------------------------
@click.group("token")
def token_group() -> None:
    """One-time enrollment secrets (EST HTTP Basic passwords); `token doctor` checks the PKCS#11 token."""


_KEEP_OLDER = click.option(
    "--keep-older", is_flag=True, help="Leave the device's older unspent secrets valid (default: withdraw them)."
)


@token_group.command("issue")
@click.argument("serial")
@click.option("--ttl", type=DURATION, default="24h", show_default=True)
@_KEEP_OLDER
@pass_state
def token_issue(state: State, serial: str, ttl: timedelta, keep_older: bool) -> None:
    """Print a new one-time secret for a device (shown once; only its hash is kept)."""
    with state.pki().store.session() as session:
        secret = issue_secret(
            Work(session, actor()), device=get_device(session, serial), ttl=ttl, keep_older=keep_older
        )
    click.echo(secret)


@token_group.command("revoke")
@click.argument("serial", required=False)
@click.option(
    "--file",
    "secrets_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A secrets CSV (serial,secret,… as `issue-batch` writes): withdraw exactly those secrets; "
    "or one serial per line: withdraw every unspent secret of those devices.",
)
@pass_state
def token_revoke(state: State, serial: str | None, secrets_file: Path | None) -> None:
    """Withdraw one-time secrets (a leaked sheet or CSV): they are refused from now on, audited."""
    if (serial is None) == (secrets_file is None):
        raise click.UsageError("give a device SERIAL or --file, not both")
    entries = _read_secrets(secrets_file) if secrets_file is not None else [(serial or "", None)]
    with state.pki().store.session() as session:
        found = [(get_device(session, device_serial), secret) for device_serial, secret in entries]
        # all or nothing, like issue-batch
        withdrawn = withdraw_secrets(Work(session, actor()), entries=found, reason="withdrawn by an operator")
    devices = len({device_serial for device_serial, _ in entries})
    click.echo(f"withdrew {withdrawn} unspent secret(s) of {devices} device(s)")


def _read_secrets(path: Path) -> list[tuple[str, str | None]]:
    """(serial, secret) from a secrets CSV, or (serial, None) from a list of serials."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    header = [cell.strip().lower() for cell in lines[0].split(",")] if lines else []
    if "secret" not in header:
        return [(serial, None) for serial in _read_serials(path)]
    rows = [((row.get("serial") or "").strip(), (row.get("secret") or "").strip()) for row in csv.DictReader(lines)]
    if not rows or any(not serial or not secret for serial, secret in rows):
        raise InputError(f"{path}: every row needs a serial and a secret")
    return [(serial, secret) for serial, secret in rows]


@token_group.command("issue-batch")
@click.option(
    "--file",
    "serial_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="One serial per line, or a CSV with a 'serial' column.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CSV for the factory: serial,secret,expires_at (written mode 0600).",
)
@click.option("--ttl", type=DURATION, default="24h", show_default=True)
@_KEEP_OLDER
@pass_state
def token_issue_batch(state: State, serial_file: Path, out: Path, ttl: timedelta, keep_older: bool) -> None:
    """One secret per device of a batch, written to a CSV for the provisioning station."""
    serials = _read_serials(serial_file)
    check_writable(out)  # before any secret is issued: secrets that never reach the file are lost
    output = io.StringIO()
    writer = csv.writer(output)
    writer.writerow(["serial", "secret", "expires_at"])
    expires = (datetime.now(UTC) + ttl).strftime("%Y-%m-%dT%H:%M:%SZ")
    with state.pki().store.session() as session:
        devices = [get_device(session, serial) for serial in serials]
        # all or nothing: a half-written batch would confuse the factory
        issued = issue_secrets(Work(session, actor()), devices=devices, ttl=ttl, keep_older=keep_older)
    writer.writerows([serial, secret, expires] for serial, secret in zip(serials, issued, strict=True))
    _write_private(out, output.getvalue())
    click.echo(f"{len(serials)} secrets written to {out}")


def _read_serials(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if lines and "serial" in [cell.strip().lower() for cell in lines[0].split(",")]:
        reader = csv.DictReader(lines)
        serials = [(row.get("serial") or "").strip() for row in reader]
    else:
        serials = lines
    if not serials:
        raise InputError(f"{path} names no devices")
    return serials


# -- registration authorities ----------------------------------------------------------------------
@click.group()
def ra() -> None:
    """Factory registration authorities (enroll on behalf of registered devices over mTLS)."""


@ra.command("add")
@click.argument("name")
@click.option("--csr", "csr_file", type=click.File("rb"), help="The station's CSR (else a key is generated here).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True)
@click.option("--validity", type=DURATION)
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option("--ca", "ca_name")
@pass_state
def ra_add(
    state: State,
    name: str,
    csr_file: Any,
    out_dir: Path,
    validity: timedelta | None,
    environment: str | None,
    ca_name: str | None,
) -> None:
    """Issue an RA client certificate; writes NAME.pem (and NAME.key when no CSR was given)."""
    written = issue_client_certificate(
        state, "ra", name, csr_file=csr_file, out_dir=out_dir, validity=validity, environment=environment,
        ca_name=ca_name, what="RA",
    )  # fmt: skip
    click.echo(f"RA {name}: {written}")


def issue_client_certificate(
    state: State,
    profile_name: str,
    name: str,
    *,
    csr_file: Any,
    out_dir: Path,
    validity: timedelta | None,
    environment: str | None,
    ca_name: str | None,
    what: str,
) -> str:
    """A client certificate of ``profile_name`` with CN = ``name`` from an issuing CA: from a CSR, or for a
    key generated here (written 0600 next to it). Files ``NAME.pem`` (and ``NAME.key``); says what it wrote.
    ``what`` names the holder in errors (RA, admin)."""
    profile = get_profile(profile_name)
    out_dir.mkdir(parents=True, exist_ok=True)  # before anything is issued
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    for suffix in (".pem", ".key"):
        check_writable(out_dir / f"{stem}{suffix}")
    pki = state.pki()
    key = None
    with pki.store.session() as session:
        authority = get_authority(session, ca_name) if ca_name else default_issuing_ca(session, environment)
        note(authority)
        issuer = issuer_for(authority, pki.token())
        if csr_file is not None:
            request = request_from_csr(profile, read_csr(csr_file.read()), issuer, validity)
            if request.common_name != name:
                raise InputError(f"the CSR's CN {request.common_name!r} is not the {what} name {name!r}")
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            request = IssueRequest(profile, key.public_key(), name, validity=validity)
        row = issue(Work(session, actor(), status=state.status()), issuer=issuer, request=request)
        pem = x509.load_der_x509_certificate(row.der or b"").public_bytes(serialization.Encoding.PEM)
    (out_dir / f"{stem}.pem").write_bytes(pem)
    if key is not None:
        _write_private(
            out_dir / f"{stem}.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
        )
    return f"serial {row.serial}, certificate {out_dir / (stem + '.pem')}" + (
        f", key {out_dir / (stem + '.key')}" if key is not None else ""
    )


# -- serving ---------------------------------------------------------------------------------------------
@click.group()
def serve() -> None:
    """Run a service in the foreground."""


DIRECT_HELP = "Serve without the front door (nginx): the application server listens itself (tls-unique)."


def front_door_enabled(pki: Any, direct: bool) -> bool:
    """Whether this run puts nginx in front (``front_door.mode``, unless ``--direct``)."""
    return not direct and pki.config.front_door.mode == "nginx"


@serve.command("est")
@click.option("--host", help="Listen address (default: est.host in the config, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Listen port (default: est.port, 8443).")
@click.option("--workers", type=click.IntRange(min=1), help="gunicorn worker processes (default: est.workers).")
@click.option("--direct", is_flag=True, help=DIRECT_HELP)
@click.option("--unix-socket", type=click.Path(dir_okay=False, path_type=Path), hidden=True)
@pass_state
def serve_est_command(
    state: State, host: str | None, port: int | None, workers: int | None, direct: bool, unix_socket: Path | None
) -> None:
    """EST (RFC 7030) and the CSMS API over HTTPS: nginx in front of gunicorn (or gunicorn alone with --direct)."""
    from web.server import serve_est, serve_est_front_door

    pki = state.pki()
    settings = pki.config.est
    host = host or settings.host
    port = port if port is not None else settings.port
    workers = workers or settings.workers
    if unix_socket is not None:  # the application server behind the front door (started by it)
        serve_est(pki, host=host, port=port, workers=workers, unix_socket=unix_socket)
    elif front_door_enabled(pki, direct):
        serve_est_front_door(pki, host=host, port=port, workers=workers)
    else:
        serve_est(pki, host=host, port=port, workers=workers)


@serve.command("console")
@click.option("--host", help="Listen address (default: console.host in the config, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Listen port (default: console.port, 8444).")
@click.option("--workers", type=click.IntRange(min=1), help="gunicorn worker processes (default: console.workers).")
@pass_state
def serve_console_command(state: State, host: str | None, port: int | None, workers: int | None) -> None:
    """The read-only fleet console over HTTPS (admin certificate or `console login-link`)."""
    from web.console.server import serve_console

    pki = state.pki()
    settings = pki.config.console
    serve_console(
        pki, host=host or settings.host, port=port if port is not None else settings.port,
        workers=workers or settings.workers,
    )  # fmt: skip
