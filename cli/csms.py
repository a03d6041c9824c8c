"""CLI for the CSMS API's clients: register a CSMS, give it a certificate or a token, list, disable;
and what a CSMS installs on its stations: imported OEM roots and the InstallCertificate bundle."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from ca.authorities.issuers import default_issuing_ca, issuer_for
from ca.authorities.oem import import_oem_root, oem_roots, remove_oem_root
from ca.authorities.rotation import INSTALL_CERTIFICATE_TYPES, install_certificates
from ca.clock import iso_utc
from ca.errors import InputError
from ca.issuance.csr import read_csr
from ca.issuance.flow import IssueRequest, issue, request_from_csr
from ca.issuance.names import ENVIRONMENTS
from ca.issuance.profiles import get_profile
from ca.registry.csms import add_client, get_client, issue_token, list_clients, set_enabled
from ca.store.models import CsmsClient
from ca.work import Work
from cli import views
from cli.common import State, actor, emit_json, fmt_time, json_option, note, pass_state, table
from cli.enrollment import _write_private
from cli.params import DURATION


@click.group()
def csms() -> None:
    """CSMSs allowed to use the CSMS API (/api/v1/ on `serve est`)."""


def _issue_certificate(
    state: State, session: Session, client: CsmsClient, csr_file: Any, out_dir: Path, validity: timedelta | None
) -> str:
    """A csms-client certificate (CN = the CSMS name) from the client's environment's issuing CA."""
    profile = get_profile("csms-client")
    pki = state.pki()
    authority = default_issuing_ca(session, client.environment)
    note(authority)
    issuer = issuer_for(authority, pki.token())
    key = None
    if csr_file is not None:
        request = request_from_csr(profile, read_csr(csr_file.read()), issuer, validity)
        if request.common_name != client.name:
            raise InputError(f"the CSR's CN {request.common_name!r} is not the CSMS name {client.name!r}")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        request = IssueRequest(profile, key.public_key(), client.name, validity=validity)
    row = issue(Work(session, actor(), status=state.status()), issuer=issuer, request=request)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in client.name)
    certificate_path = out_dir / f"{stem}.pem"
    certificate_path.write_bytes(
        x509.load_der_x509_certificate(row.der or b"").public_bytes(serialization.Encoding.PEM)
    )
    written = f"serial {row.serial}, certificate {certificate_path}"
    if key is not None:
        _write_private(
            out_dir / f"{stem}.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
        )
        written += f", key {out_dir / (stem + '.key')}"
    return written


_CERTIFICATE_OPTIONS = [
    click.option(
        "--csr", "csr_file", type=click.File("rb"), help="The CSMS's CSR, CN = NAME (else a key is made here)."
    ),
    click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True),
    click.option("--validity", type=DURATION, help="Default 365d, at most 3 years."),
]


def _certificate_options(function: Any) -> Any:
    for option in reversed(_CERTIFICATE_OPTIONS):
        function = option(function)
    return function


@csms.command("add")
@click.argument("name")
@click.option(
    "--environment", type=click.Choice(ENVIRONMENTS), help="Default: est.default_environment, or the only one."
)
@click.option("--no-certificate", is_flag=True, help="Register only (authenticate with `csms token` instead).")
@_certificate_options
@pass_state
def csms_add(
    state: State,
    name: str,
    environment: str | None,
    no_certificate: bool,
    csr_file: Any,
    out_dir: Path,
    validity: timedelta | None,
) -> None:
    """Register a CSMS and issue its client certificate (NAME.pem, and NAME.key when no CSR was given)."""
    pki = state.pki()
    with pki.store.session() as session:
        environment = environment or default_issuing_ca(session, pki.config.est.default_environment).environment
        client = add_client(Work(session, actor()), name=name, environment=environment)
        message = f"[{client.environment}] CSMS {client.name} registered"
        if not no_certificate:
            message += ": " + _issue_certificate(state, session, client, csr_file, out_dir, validity)
    click.echo(message)


@csms.command("certificate")
@click.argument("name")
@_certificate_options
@pass_state
def csms_certificate(state: State, name: str, csr_file: Any, out_dir: Path, validity: timedelta | None) -> None:
    """Issue another client certificate for a registered CSMS (renewal; the old one stays valid until revoked)."""
    with state.pki().store.session() as session:
        client = get_client(session, name)
        click.echo(f"CSMS {client.name}: " + _issue_certificate(state, session, client, csr_file, out_dir, validity))


@csms.command("token")
@click.argument("name")
@click.option("--replace", is_flag=True, help="Revoke the CSMS's other tokens at the same time.")
@pass_state
def csms_token(state: State, name: str, replace: bool) -> None:
    """Print a new API token for a CSMS (shown once; only its hash is kept)."""
    with state.pki().store.session() as session:
        token = issue_token(Work(session, actor()), client=get_client(session, name), replace=replace)
    click.echo(token)


@csms.command("list")
@json_option
@pass_state
def csms_list(state: State, as_json: bool) -> None:
    """List CSMSs with their environment, state, usable tokens and current certificates."""
    with state.pki().store.session() as session:
        if as_json:
            clients = [
                {
                    "name": s.client.name,
                    "environment": s.client.environment,
                    "enabled": s.client.enabled,
                    "usable_tokens": s.tokens,
                    "current_certificates": s.certificates,
                    "registered_at": iso_utc(s.client.created_at),
                }
                for s in list_clients(session, datetime.now(UTC))
            ]
            emit_json({"csms_clients": clients})
            return
        rows = [
            [
                s.client.name,
                s.client.environment,
                "enabled" if s.client.enabled else "disabled",
                str(s.tokens),
                str(s.certificates),
                fmt_time(s.client.created_at),
            ]
            for s in list_clients(session, datetime.now(UTC))
        ]
    table(["NAME", "ENVIRONMENT", "STATE", "TOKENS", "CERTIFICATES", "REGISTERED"], rows)


@csms.command("disable")
@click.argument("name")
@click.option("--revoke", is_flag=True, help="Also revoke its certificates and tokens for good.")
@pass_state
def csms_disable(state: State, name: str, revoke: bool) -> None:
    """Refuse every further call of a CSMS (at once: credentials are checked on every call)."""
    with state.pki().store.session() as session:
        client, revoked = set_enabled(
            Work(session, actor(), status=state.status() if revoke else None), name=name, enabled=False, revoke=revoke
        )
        click.echo(f"[{client.environment}] CSMS {client.name} disabled; revoked {len(revoked)} certificate(s)")


@csms.command("enable")
@click.argument("name")
@pass_state
def csms_enable(state: State, name: str) -> None:
    """Allow a disabled CSMS again."""
    with state.pki().store.session() as session:
        client, _ = set_enabled(Work(session, actor()), name=name, enabled=True)
        click.echo(f"[{client.environment}] CSMS {client.name} enabled")


# -- what stations install: OEM roots and the InstallCertificate bundle ------------------------------
@csms.group("oem-root")
def oem_root() -> None:
    """Vehicle manufacturers' roots that stations install as OCPP 2.1 OEMRootCertificate."""


@oem_root.command("add")
@click.argument("certificate_file", metavar="FILE", type=click.File("rb"))
@click.option(
    "--environment", type=click.Choice(ENVIRONMENTS), help="Default: est.default_environment, or the only one."
)
@pass_state
def oem_root_add(state: State, certificate_file: Any, environment: str | None) -> None:
    """Import an OEM root (PEM or DER): self-signed, CA:TRUE, valid now; listed in the environment's
    InstallCertificate bundle (`csms install-certificates`, GET /api/v1/install-certificates)."""
    pki = state.pki()
    with pki.store.session() as session:
        environment = environment or default_issuing_ca(session, pki.config.est.default_environment).environment
        data = certificate_file.read()
        root = import_oem_root(Work(session, actor()), environment=environment, certificate_data=data)
        until = fmt_time(root.not_after)
        click.echo(f"[{root.environment}] OEM root {root.name} imported: {root.subject} (until {until})")


@oem_root.command("list")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@json_option
@pass_state
def oem_root_list(state: State, environment: str | None, as_json: bool) -> None:
    """List the imported OEM roots (removed ones show as retired)."""
    with state.pki().store.session() as session:
        if as_json:
            emit_json({"oem_roots": [views.authority(a) for a in oem_roots(session, environment)]})
            return
        rows = [
            [
                a.name,
                a.environment,
                a.key_type,
                fmt_time(a.not_after),
                "removed" if a.status == "retired" else "in bundle",
                a.subject,
            ]
            for a in oem_roots(session, environment)
        ]
    table(["NAME", "ENVIRONMENT", "KEY", "NOT AFTER", "STATE", "SUBJECT"], rows)


@oem_root.command("remove")
@click.argument("name")
@pass_state
def oem_root_remove(state: State, name: str) -> None:
    """Take an OEM root out of the bundle (kept as retired for the record; stations delete it themselves)."""
    with state.pki().store.session() as session:
        root = remove_oem_root(Work(session, actor()), name=name)
        click.echo(f"[{root.environment}] OEM root {root.name} removed from the bundle")


@csms.command("install-certificates")
@click.option(
    "--environment", type=click.Choice(ENVIRONMENTS), help="Default: est.default_environment, or the only one."
)
@click.option(
    "--ocpp",
    type=click.Choice(INSTALL_CERTIFICATE_TYPES),
    default="2.1",
    show_default=True,
    help="2.0.1 leaves OEM roots out (its InstallCertificate has no OEMRootCertificate).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON here (default: stdout).")
@pass_state
def csms_install_certificates(state: State, environment: str | None, ocpp: str, out: Path | None) -> None:
    """The roots a station of the environment should hold, as a JSON list of InstallCertificateRequest
    payloads: CSMS roots, ISO 15118-2/-20 V2G roots, the manufacturer root, OEM roots."""
    pki = state.pki()
    with pki.store.session() as session:
        environment = environment or default_issuing_ca(session, pki.config.est.default_environment).environment
        bundle = install_certificates(session, environment, ocpp=ocpp)
        text = json.dumps([entry.payload for entry in bundle], indent=2) + "\n"
        summary = ", ".join(f"{entry.certificate_type} {entry.authority.name}" for entry in bundle)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        click.echo(f"[{environment}] {len(bundle)} InstallCertificate payload(s) in {out}: {summary}", err=True)
