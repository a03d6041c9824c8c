"""``chargepki``: initialise, issue, list, revoke and audit from a terminal.

Every command opens the home (``--home`` / ``CHARGEPKI_HOME``), calls one core function and
prints the result. Errors become one line on stderr and a non-zero exit, never a traceback
(``CHARGEPKI_DEBUG=1`` shows it for developers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.exc import SQLAlchemyError

from ca import audit
from ca.audit import checkpoints
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.issuers import chain, get_authority, issuer_for, list_authorities
from ca.authorities.manufacturer import manufacturer_root
from ca.authorities.rotation import check_can_issue, environment_certificates, rotate_issuing_ca
from ca.authorities.v2g import current_sub_ca_2
from ca.config import DEFAULT_OCSP_URL, DEFAULT_REPOSITORY_URL, resolve_home, save_urls
from ca.context import Pki
from ca.errors import ChargepkiError, one_line
from ca.issuance.csr import read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.names import ENVIRONMENTS
from ca.issuance.profiles import PROFILES, V2G_VERSIONS, Profile, check_issuer_role, get_profile
from ca.keys.keyspec import ALL_KEY_TYPES
from ca.kinds import CaRole, CertStatus
from ca.status.certificates import STATUSES, display_status, get_certificate, list_certificates
from ca.status.revocation import REASONS, ca_impact, parse_reason, revoke, unhold
from ca.store.models import Authority
from ca.work import Work
from cli import views
from cli.common import (
    State,
    actor,
    check_writable,
    emit_json,
    fmt_time,
    json_option,
    note,
    pass_state,
    pick_issuing,
    table,
    utc_now,
)
from cli.console import console
from cli.crl import crl
from cli.csms import csms
from cli.doctor import token_doctor
from cli.enrollment import device, ra, serve, token_group
from cli.firmware import firmware, manufacturer
from cli.ocsp import ocsp
from cli.params import DURATION, UTC_DATETIME
from cli.report import report
from cli.rotation import ca_rollover_root, ca_rotate, campaign
from cli.v2g import v2g


class ChargepkiGroup(click.Group):
    """Turns every expected failure into ``Error: <one line>`` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ChargepkiError as exc:
            raise _failure(ctx, exc.code, str(exc)) from None
        except SQLAlchemyError as exc:
            raise _failure(ctx, "database", f"database error: {one_line(exc)}") from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except UnicodeError as exc:  # an argument or file that is not UTF-8 (found by fuzzing)
            message = f"not valid UTF-8 text ({exc.reason} at position {exc.start})"
            raise _failure(ctx, "bad_request", message) from None
        except OSError as exc:  # a path that cannot be read or written: the operator's to fix, not a crash
            where = f"{exc.filename}: " if exc.filename else ""
            raise _failure(ctx, "io", f"{where}{exc.strerror or exc}") from None
        except Exception as exc:
            if os.environ.get("CHARGEPKI_DEBUG"):
                raise
            message = f"internal error ({type(exc).__name__}: {exc}); set CHARGEPKI_DEBUG=1 for details"
            raise _failure(ctx, "internal", message) from None


def _failure(ctx: click.Context, code: str, message: str) -> click.ClickException:
    """``Error: <message>`` on stderr and exit status 1; under ``--json`` also ``{"error": …}`` on stdout,
    so a script reading stdout always gets one JSON document (docs/cli-json.md)."""
    state = ctx.obj if isinstance(ctx.obj, State) else None
    if state is not None and state.json_output:
        emit_json({"error": {"code": code, "message": message}})
    return click.ClickException(message)


@click.group(cls=ChargepkiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State directory (default: $CHARGEPKI_HOME or ./var).",
)
@click.version_option(package_name="chargepki")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """chargepki: a private PKI for fleets of EV chargers."""
    state = State(resolve_home(home, os.environ))
    ctx.obj = state
    ctx.call_on_close(state.close)


# -- init / run / db ----------------------------------------------------------------------------
def _init_options(func: Any) -> Any:
    options = [
        click.option("--country", help="Two-letter country code for the subject (e.g. DE)."),
        click.option("--environment", type=click.Choice(ENVIRONMENTS), default="production", show_default=True),
        click.option("--key-type", type=click.Choice(ALL_KEY_TYPES), default="ec-p256", show_default=True),
        click.option(
            "--rsa-padding",
            type=click.Choice(["pkcs1", "pss"]),
            default="pkcs1",
            show_default=True,
            help="Signature padding for RSA CA keys.",
        ),
        click.option(
            "--ocsp-url",
            help=f"OCSP responder URL written into certificates (AIA); saved in the home's config for later "
            f"hierarchies (default: the config's, else {DEFAULT_OCSP_URL}).",
        ),
        click.option(
            "--crl-url",
            help="Base URL of the published CRLs (<base>/<ca>.crl) and CA certificates (<base>/<ca>.crt); saved "
            f"like --ocsp-url (default: the config's, else {DEFAULT_REPOSITORY_URL}).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _initialise(state: State, pki: Pki, request: HierarchyRequest) -> None:
    with pki.store.session() as session:
        hierarchy = init_hierarchy(state.work(session), request=request)
        click.echo(f"[{request.environment}] initialised in {pki.config.home}")
        click.echo(f"  root CA      {hierarchy.root.name}: {hierarchy.root.subject}")
        click.echo(f"  issuing CA   {hierarchy.issuing.name}: {hierarchy.issuing.subject}")
        click.echo(
            f"  OCSP signers serial {hierarchy.ocsp_signer.serial} (issuing CA), "
            f"{hierarchy.root_ocsp_signer.serial} (root)"
        )


@cli.command()
@click.option("--org", required=True, help="Organisation name (subject O of every certificate).")
@_init_options
@pass_state
def init(
    state: State,
    org: str,
    country: str | None,
    environment: str,
    key_type: str,
    rsa_padding: str,
    ocsp_url: str | None,
    crl_url: str | None,
) -> None:
    """Create the CA hierarchy of one environment: root, issuing CA and OCSP signer, keys in the token."""
    pki = state.pki(create=True)
    urls = (ocsp_url or pki.config.ocsp_url, crl_url or pki.config.repository_url)
    request = HierarchyRequest(
        organization=org,
        environment=environment,
        country=country,
        key_type=key_type,
        rsa_padding=rsa_padding,
        ocsp_url=urls[0],
        repository_url=urls[1],
    )
    _initialise(state, pki, request)
    if (ocsp_url or crl_url) and urls != (pki.config.ocsp_url, pki.config.repository_url):
        save_urls(pki.config, *urls)  # `v2g init`, `manufacturer init` and `run` use them from now on
        click.echo(f"  URLs saved in {pki.config.config_path}: OCSP {urls[0]}, repository {urls[1]}")


@cli.command()
@click.option(
    "--org",
    envvar="CHARGEPKI_ORG",
    default="chargepki Demo CPO",
    show_default=True,
    help="Organisation for the first-run hierarchy ($CHARGEPKI_ORG).",
)
@click.option("--setup-only", is_flag=True, help="Do the first-run set-up and exit without serving.")
@pass_state
def run(state: State, org: str, setup_only: bool) -> None:
    """First-run set-up on the embedded defaults, then serve EST, OCSP and CRLs in the foreground (`make run`)."""
    pki = state.pki(create=True)
    with pki.store.session() as session:
        authorities = list_authorities(session)
    if not authorities:
        urls = {"ocsp_url": pki.config.ocsp_url, "repository_url": pki.config.repository_url}
        _initialise(state, pki, HierarchyRequest(organization=org, **urls))
    else:
        click.echo(f"home {pki.config.home} is initialised:")
        for authority in authorities:
            click.echo(f"  [{authority.environment}] {authority.name}: {authority.subject}")
    if setup_only:
        return
    from cli.enrollment import front_door_enabled
    from web.server import serve_est, serve_est_front_door

    settings = pki.config.est
    home = str(pki.config.home)
    # OCSP (with its signer and refresher), the CRL publisher and the fleet console run beside EST,
    # stopped with it.
    children = [
        subprocess.Popen([sys.executable, "-m", "cli.main", "--home", home, "serve", "ocsp"]),
        subprocess.Popen([sys.executable, "-m", "cli.main", "--home", home, "crl", "publish", "--watch"]),
    ]
    if pki.config.console.enabled:
        children.append(subprocess.Popen([sys.executable, "-m", "cli.main", "--home", home, "serve", "console"]))
    click.echo(
        f"EST: https://{settings.server_names[0]}:{settings.port}/.well-known/est/ (trust anchor: chargepki ca chain)",
        err=True,
    )
    if pki.config.console.enabled:
        click.echo(
            f"console: https://{settings.server_names[0]}:{pki.config.console.port}/ "
            "(log in: chargepki console login-link --name YOU)",
            err=True,
        )
    try:
        serve = serve_est_front_door if front_door_enabled(pki, direct=False) else serve_est
        serve(pki, host=settings.host, port=settings.port, workers=settings.workers)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@pass_state
def db_upgrade(state: State) -> None:
    """Apply Alembic migrations up to the newest schema."""
    pki = state.pki(create=False)
    pki.store.upgrade()
    click.echo(f"schema at revision {pki.store.current_revision()}")


# -- CAs --------------------------------------------------------------------------------------
@cli.group()
def ca() -> None:
    """Certificate authorities."""


@ca.command("list")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@json_option
@pass_state
def ca_list(state: State, environment: str | None, as_json: bool) -> None:
    """List the CAs, their keys and validity."""
    with state.pki().store.session() as session:
        if as_json:
            emit_json({"authorities": [views.authority(a) for a in list_authorities(session, environment)]})
            return
        rows = [
            [a.name, a.role, a.environment, a.key_type, fmt_time(a.not_after), a.status, a.subject]
            for a in list_authorities(session, environment)
        ]
    table(["NAME", "ROLE", "ENVIRONMENT", "KEY", "NOT AFTER", "STATUS", "SUBJECT"], rows)


@ca.command("chain")
@click.option("--ca", "ca_name", help="CA name (default: the active issuing CA).")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Every CA of the environment still in service and the root link certificates (what EST cacerts serves).",
)
@pass_state
def ca_chain(state: State, ca_name: str | None, environment: str | None, everything: bool) -> None:
    """Print the PEM chain: the CA, then its parents up to the root."""
    with state.pki().store.session() as session:
        authority = pick_issuing(session, ca_name, environment)
        note(authority)
        if everything:
            ders = environment_certificates(session, authority.environment)
        else:
            ders = [member.certificate_der for member in chain(session, authority)]
        for der in ders:
            certificate = x509.load_der_x509_certificate(der)
            click.echo(certificate.public_bytes(serialization.Encoding.PEM).decode(), nl=False)


# -- issuance ---------------------------------------------------------------------------------
@cli.command("issue")
@click.option("--csr", "csr_file", required=True, type=click.File("rb"), help="PKCS#10 request, PEM or DER.")
@click.option(
    "--profile",
    "profile_name",
    required=True,
    help=f"One of: {', '.join(n for n, p in PROFILES.items() if p.from_csr)}.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the PEM here (else stdout).")
@click.option("--validity", type=DURATION, help="Validity such as 365d or 12h (default: the profile's).")
@click.option("--ca", "ca_name", help="Issuing CA (default: the active issuing CA).")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@pass_state
def issue_command(
    state: State,
    csr_file: Any,
    profile_name: str,
    out: Path | None,
    validity: timedelta | None,
    ca_name: str | None,
    environment: str | None,
) -> None:
    """Issue a certificate for a CSR under the issuing CA, checked against the profile."""
    profile = get_profile(profile_name)
    csr = read_csr(csr_file.read())
    if out is not None:
        check_writable(out)  # before anything is issued: a failing command changes nothing
    pki = state.pki()
    with pki.store.session() as session:
        authority = _issuer_of(session, profile, ca_name, environment)
        check_issuer_role(profile, authority.role, authority.name)
        note(authority)
        check_can_issue(session, authority)
        issuer = issuer_for(authority, pki.token())
        request = request_from_csr(profile, csr, issuer, validity)
        row = issue(Work(session, actor(), status=state.status()), issuer=issuer, request=request)
        pem = x509.load_der_x509_certificate(row.der or b"").public_bytes(serialization.Encoding.PEM).decode()
        serial = row.serial
    if out is not None:
        out.write_text(pem, encoding="ascii")
        click.echo(f"issued serial {serial} to {out}", err=True)
    else:
        click.echo(pem, nl=False)
        click.echo(f"issued serial {serial}", err=True)


def _issuer_of(session: Any, profile: Profile, ca_name: str | None, environment: str | None) -> Authority:
    """--ca, else the CA of the environment that issues this profile (OCPP issuing CA, CPO Sub-CA 2…)."""
    if ca_name or "issuing" in profile.issuer_roles:
        return pick_issuing(session, ca_name, environment)
    for version in V2G_VERSIONS.values():
        if version.sub_ca_2 in profile.issuer_roles:
            return current_sub_ca_2(session, environment, version.iso)
    return manufacturer_root(session, environment)


# -- certificates -----------------------------------------------------------------------------
@cli.group()
def cert() -> None:
    """Issued certificates."""


@cert.command("list")
@click.option("--status", type=click.Choice(STATUSES))
@click.option(
    "--expiring-within",
    type=click.IntRange(min=0),
    metavar="DAYS",
    help="Only valid certificates that expire within DAYS days.",
)
@click.option("--profile", type=click.Choice(list(PROFILES)))
@click.option("--ca", "ca_name", help="Only certificates issued by this CA.")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@json_option
@pass_state
def cert_list(
    state: State,
    status: str | None,
    expiring_within: int | None,
    profile: str | None,
    ca_name: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List certificates, soonest expiring first."""
    now = utc_now()
    with state.pki().store.session() as session:
        authority = get_authority(session, ca_name) if ca_name else None
        window = timedelta(days=expiring_within) if expiring_within is not None else None
        found = list_certificates(
            session, now, status=status, expiring_within=window, profile=profile, authority=authority, limit=limit
        )
        if as_json:
            devices = views.device_serials(session, found)
            emit_json({"certificates": [views.certificate(c, now, devices) for c in found]})
            return
        rows = [[c.serial, c.profile, display_status(c, now), fmt_time(c.not_after), c.subject] for c in found]
    table(["SERIAL", "PROFILE", "STATUS", "NOT AFTER", "SUBJECT"], rows)


@cert.command("show")
@click.argument("serial")
@json_option
@pass_state
def cert_show(state: State, serial: str, as_json: bool) -> None:
    """Show one certificate (serial in hex) and its PEM."""
    now = utc_now()
    with state.pki().store.session() as session:
        certificate = get_certificate(session, serial)
        if as_json:
            emit_json(views.certificate_detail(certificate, now, views.device_serials(session, [certificate])))
            return
        fields = [
            ("serial", certificate.serial),
            ("subject", certificate.subject),
            ("issuer", f"{certificate.authority.name} ({certificate.authority.environment})"),
            ("profile", certificate.profile),
            ("status", display_status(certificate, now)),
            ("not before", fmt_time(certificate.not_before)),
            ("not after", fmt_time(certificate.not_after)),
            ("sha256", certificate.fingerprint_sha256 or "-"),
        ]
        if certificate.status == CertStatus.REVOKED:
            fields += [
                ("revoked at", fmt_time(certificate.revoked_at)),
                ("reason", certificate.revocation_reason or "-"),
            ]
            if certificate.invalidity_date:
                fields.append(("invalidity date", fmt_time(certificate.invalidity_date)))
        for name, value in fields:
            click.echo(f"{name + ':':<17}{value}")
        if certificate.der:
            pem = x509.load_der_x509_certificate(certificate.der).public_bytes(serialization.Encoding.PEM)
            click.echo(pem.decode(), nl=False)


# -- revocation -------------------------------------------------------------------------------
@cli.command("revoke")
@click.argument("serial")
@click.option("--reason", required=True, help=f"RFC 5280 reason: {', '.join(REASONS)}.")
@click.option(
    "--invalidity-date",
    type=UTC_DATETIME,
    help="When the key is known or suspected to have been compromised (ISO 8601).",
)
@click.option("--yes", is_flag=True, help="Revoke a CA's certificate without asking.")
@click.option("--rotate", is_flag=True, help="Revoking an issuing CA: create its successor at once (`ca rotate`).")
@pass_state
def revoke_command(
    state: State, serial: str, reason: str, invalidity_date: datetime | None, yes: bool, rotate: bool
) -> None:
    """Revoke a certificate (certificateHold can be released later with `unhold`).

    A CA's certificate stops that CA, and every CA under it, from signing anything again: the
    command says how many live certificates that strands and asks first (--yes does not).
    """
    reason = parse_reason(reason)
    pki = state.pki()
    with pki.store.session() as session:
        impact = ca_impact(session, get_certificate(session, serial), utc_now())
        if impact is None and rotate:
            raise click.UsageError("--rotate applies to the certificate of an issuing CA")
        if impact is not None:
            authority = impact.authorities[0]
            if rotate and authority.role != CaRole.ISSUING:
                raise click.UsageError(f"--rotate rotates issuing CAs; {authority.name} is a {authority.role} CA")
            names = ", ".join(a.name for a in impact.authorities)
            click.echo(
                f"{serial} is the certificate of CA {authority.name}: {names} will never sign again, "
                f"stranding {impact.stranded} live certificate(s) issued under it.",
                err=True,
            )
            if not yes:
                click.confirm("Revoke it?", abort=True, err=True)
        certificate = revoke(
            Work(session, actor(), status=state.status()), serial=serial, reason=reason, invalidity_date=invalidity_date
        )
        note(certificate.authority)
        click.echo(f"revoked {certificate.serial} ({certificate.revocation_reason})")
        if impact is not None and rotate:
            rotation = rotate_issuing_ca(state.work(session), ca_name=impact.authorities[0].name)
            click.echo(f"rotated: new certificates come from {rotation.issuing.name} ({rotation.issuing.subject})")


@cli.command("unhold")
@click.argument("serial")
@pass_state
def unhold_command(state: State, serial: str) -> None:
    """Release a certificate from certificateHold."""
    with state.pki().store.session() as session:
        certificate = unhold(Work(session, actor(), status=state.status()), serial=serial)
        note(certificate.authority)
        click.echo(f"released {certificate.serial} from hold")


# -- audit ------------------------------------------------------------------------------------
@cli.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log."""


@audit_group.command("verify")
@json_option
@pass_state
def audit_verify(state: State, as_json: bool) -> None:
    """Check the hash chain and every signed checkpoint; exit 1 naming the first broken entry."""
    pki = state.pki()
    with pki.store.session() as session:
        result = audit.verify(session)
        signed = checkpoints.verify(session, pki.token, pki.config.home) if result.ok else None
    problem = result.problem if not result.ok else (signed.problem if signed is not None else None)
    broken = result.broken_seq if not result.ok else (signed.broken_seq if signed is not None else None)
    if as_json:
        emit_json(
            {
                "ok": problem is None,
                "entries": result.entries,
                "checkpoints": signed.checkpoints if signed is not None else None,
                "problem": problem,
                "broken_seq": broken,
            }
        )
    if problem is not None:
        click.echo(f"Error: audit log broken: {problem}", err=True)
        raise click.exceptions.Exit(1)
    if not as_json:
        assert signed is not None
        click.echo(f"audit log intact: {result.entries} entries, {signed.checkpoints} signed checkpoints")


@audit_group.command("checkpoint")
@pass_state
def audit_checkpoint(state: State) -> None:
    """Sign the chain head with the audit key in the token (also appended to audit-checkpoints.jsonl)."""
    pki = state.pki()
    with pki.store.session() as session:
        made = checkpoints.checkpoint(session, pki.token(), pki.config.home)
    assert made is not None
    click.echo(f"checkpoint of entry {made.seq} ({made.hash}) signed by audit key {made.key_sha256[:16]}…")


@audit_group.command("show")
@click.option("--action", help="Only this action, e.g. certificate.issued.")
@click.option("--subject", help="Only entries about this subject (e.g. a serial).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@pass_state
def audit_show(state: State, action: str | None, subject: str | None, limit: int, as_json: bool) -> None:
    """List the newest audit entries, oldest first."""
    with state.pki().store.session() as session:
        if as_json:
            entries = audit.events(session, action=action, subject=subject, limit=limit)
            emit_json({"entries": [views.audit_entry(e) for e in entries]})
            return
        rows = [
            [str(e.seq), fmt_time(e.at), e.actor, e.action, e.subject or "-", e.details]
            for e in audit.events(session, action=action, subject=subject, limit=limit)
        ]
    table(["SEQ", "AT", "ACTOR", "ACTION", "SUBJECT", "DETAILS"], rows)


for group in (device, token_group, ra, serve, crl, ocsp, csms, v2g, manufacturer, firmware, campaign, report, console):
    cli.add_command(group)
token_group.add_command(token_doctor)
ca.add_command(ca_rotate)
ca.add_command(ca_rollover_root)


def main() -> None:
    cli.main(prog_name="chargepki")


if __name__ == "__main__":
    sys.exit(main())
