"""`chargepki v2g …`: the ISO 15118 Plug & Charge hierarchy and SECC certificates."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authorities.issuers import chain
from ca.authorities.v2g import V2gHierarchy, V2gRequest, current_sub_ca_2, import_sub_ca_1, init_v2g, request_sub_ca_1
from ca.enrollment.secc import issue_secc
from ca.errors import InputError
from ca.issuance.names import ENVIRONMENTS
from ca.issuance.profiles import ISO15118_2, V2G_VERSIONS
from ca.kinds import CaStatus
from ca.work import Work
from cli.common import State, actor, note, pass_state
from cli.params import DURATION


@click.group()
def v2g() -> None:
    """ISO 15118 Plug & Charge: V2G root, CPO Sub-CA 1 and 2, SECC certificates.

    An environment can hold an ISO 15118-2 hierarchy (secp256r1) and an ISO 15118-20 one
    (secp521r1) side by side; every command acts on the one --iso names (default 15118-2).
    """


def _iso_option(func: Any) -> Any:
    return click.option(
        "--iso",
        type=click.Choice(list(V2G_VERSIONS)),
        default=ISO15118_2,
        show_default=True,
        help="The ISO 15118 version: 15118-2 (secp256r1, ECDSA-SHA256) or 15118-20 (secp521r1, ECDSA-SHA512).",
    )(func)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _report(hierarchy: V2gHierarchy) -> None:
    click.echo(f"[{hierarchy.sub_ca_2.environment}] V2G hierarchy (ISO {hierarchy.iso})")
    root = hierarchy.root
    held = " (external: its key is not here)" if root.status == CaStatus.EXTERNAL else ""
    click.echo(f"  V2G root      {root.name}: {root.subject}{held}")
    if hierarchy.sub_ca_1 is not None:
        click.echo(f"  CPO Sub-CA 1  {hierarchy.sub_ca_1.name}: {hierarchy.sub_ca_1.subject}")
    else:
        click.echo("  CPO Sub-CA 1  none: Sub-CA 2 is directly under the root")
    click.echo(f"  CPO Sub-CA 2  {hierarchy.sub_ca_2.name}: {hierarchy.sub_ca_2.subject}")
    click.echo(f"  OCSP signers  {', '.join(signer.serial for signer in hierarchy.ocsp_signers)}")
    label, iso = ("v2g", "") if hierarchy.iso == ISO15118_2 else ("v2g20", f" --iso {hierarchy.iso}")
    click.echo(f"  SECC certificates: EST label {hierarchy.sub_ca_2.name} (or {label}), or `chargepki v2g issue{iso}`")


@v2g.command("init")
@_iso_option
@click.option(
    "--without-sub-ca-1",
    is_flag=True,
    help="ISO 15118-20 only: no CPO Sub-CA 1, Sub-CA 2 directly under the V2G root (with an external "
    "root, the CSR is then Sub-CA 2's).",
)
@click.option("--org", help="The CPO's organisation name (subject O).")
@click.option("--environment", type=click.Choice(ENVIRONMENTS), default="production", show_default=True)
@click.option("--country", help="Two-letter country code (subject C), e.g. DE.")
@click.option("--ocsp-url", help="OCSP URL written into the sub-CA and SECC certificates (default: urls.ocsp).")
@click.option("--crl-url", help="Base URL of published CRLs and CA certificates (default: urls.repository).")
@click.option("--root-validity", type=DURATION, help="V2G root validity (default 20 years, at most 40).")
@click.option("--sub-ca-1-validity", type=DURATION, help="CPO Sub-CA 1 validity (default and maximum 4 years).")
@click.option("--sub-ca-2-validity", type=DURATION, help="CPO Sub-CA 2 validity (default 1 year, at most 2).")
@click.option(
    "--external-root-csr",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Generate the CPO Sub-CA 1 key (Sub-CA 2's with --without-sub-ca-1) in the token and write "
    "its CSR here for an external V2G root.",
)
@click.option(
    "--import-subca1",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The certificate the external V2G root returned for that CSR (PEM; the root may follow it).",
)
@click.option(
    "--v2g-root",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The external V2G root certificate, when not in the --import-subca1 file.",
)
@pass_state
def v2g_init(
    state: State,
    iso: str,
    without_sub_ca_1: bool,
    org: str | None,
    environment: str,
    country: str | None,
    ocsp_url: str | None,
    crl_url: str | None,
    root_validity: timedelta | None,
    sub_ca_1_validity: timedelta | None,
    sub_ca_2_validity: timedelta | None,
    external_root_csr: Path | None,
    import_subca1: Path | None,
    v2g_root: Path | None,
) -> None:
    """Create the V2G hierarchy of one environment and ISO 15118 version, keys in the token, each CA
    with its OCSP signer.

    \b
    Own root:       chargepki v2g init --org CPO [--iso 15118-20 [--without-sub-ca-1]]
    External root:  chargepki v2g init --org CPO --external-root-csr sub-ca-1.csr
                    (have the V2G root sign it, then)
                    chargepki v2g init --import-subca1 sub-ca-1.pem [--v2g-root root.pem]
                    (ISO 15118-20: --iso 15118-20 in both steps)
    """
    if external_root_csr is not None and import_subca1 is not None:
        raise InputError("--external-root-csr and --import-subca1 are two separate steps; give one")
    if v2g_root is not None and import_subca1 is None:
        raise InputError("--v2g-root goes with --import-subca1")
    if org is None and import_subca1 is None:
        raise InputError("--org is required (the CPO's organisation name)")
    if root_validity is not None and (external_root_csr is not None or import_subca1 is not None):
        raise InputError("--root-validity does not apply to an external V2G root")
    if without_sub_ca_1 and iso == ISO15118_2:
        raise InputError("--without-sub-ca-1 is for ISO 15118-20 (--iso 15118-20): ISO 15118-2 requires Sub-CA 1")
    if without_sub_ca_1 and import_subca1 is not None:
        raise InputError("--without-sub-ca-1 goes with --external-root-csr: the import follows that CSR")
    if without_sub_ca_1 and sub_ca_1_validity is not None:
        raise InputError("--sub-ca-1-validity does not apply with --without-sub-ca-1")
    pki = state.pki(create=True)
    request = V2gRequest(
        organization=org or "",
        environment=environment,
        country=country,
        ocsp_url=ocsp_url or pki.config.ocsp_url,
        repository_url=crl_url or pki.config.repository_url,
        root_validity=root_validity,
        sub_ca_1_validity=sub_ca_1_validity,
        sub_ca_2_validity=sub_ca_2_validity,
        iso=iso,
        sub_ca_1=not without_sub_ca_1,
    )
    iso_flag = "" if iso == ISO15118_2 else f" --iso {iso}"
    with pki.store.session() as session:
        if external_root_csr is not None:
            csr = request_sub_ca_1(state.work(session), request=request)
            try:
                external_root_csr.write_bytes(csr)
            except OSError as exc:
                raise InputError(f"cannot write {external_root_csr}: {exc.strerror or exc}") from None
            which = "CPO Sub-CA 2" if without_sub_ca_1 else "CPO Sub-CA 1"
            click.echo(f"[{environment}] {which} key generated in the token; CSR written to {external_root_csr}")
            click.echo(
                f"  next: chargepki v2g init{iso_flag} --environment {environment} --import-subca1 CERT "
                "[--v2g-root ROOT]"
            )
            return
        if import_subca1 is not None:
            certificate = _read(import_subca1, "the Sub-CA 1 certificate")
            root = _read(v2g_root, "the V2G root certificate") if v2g_root is not None else None
            hierarchy = import_sub_ca_1(
                state.work(session), request=request, certificate_data=certificate, root_data=root
            )
        else:
            hierarchy = init_v2g(state.work(session), request=request)
        _report(hierarchy)


@v2g.command("issue")
@_iso_option
@click.option("--csr", "csr_file", required=True, type=click.File("rb"), help="The SECC's PKCS#10 request.")
@click.option("--secc-id", required=True, help="The SECC ID (EVSE ID), which must be the CSR's CN.")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option("--device", "device_serial", help="The charging station (registered serial) the SECC belongs to.")
@click.option("--validity", type=DURATION, help="Validity (default 60 days, at most 90).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the PEM chain here (else stdout).")
@pass_state
def v2g_issue(
    state: State,
    iso: str,
    csr_file: Any,
    secc_id: str,
    environment: str | None,
    device_serial: str | None,
    validity: timedelta | None,
    out: Path | None,
) -> None:
    """Issue an SECC certificate under the CPO Sub-CA 2 of the --iso hierarchy; prints it followed by
    the sub-CAs (Sub-CA 2, then Sub-CA 1 when the hierarchy has one; never the root)."""
    pki = state.pki()
    token = pki.token()
    with pki.store.session() as session:
        authority = current_sub_ca_2(session, environment, iso)
        note(authority)
        row = issue_secc(
            Work(session, actor(), status=state.status(), token=token),
            environment=authority.environment,
            csr=csr_file.read(),
            secc_id=secc_id,
            device_serial=device_serial,
            validity=validity,
            iso=iso,
        )
        # The sub-CAs; the root is the EV's trust anchor.
        sub_cas = [ca.certificate_der for ca in chain(session, authority) if ca.parent_id is not None]
        members = [row.der or b"", *sub_cas]
        pem = "".join(
            x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode() for der in members
        )
        serial = row.serial
    if out is not None:
        out.write_text(pem, encoding="ascii")
        click.echo(f"issued SECC certificate {serial} for {secc_id} to {out}", err=True)
    else:
        click.echo(pem, nl=False)
        click.echo(f"issued SECC certificate {serial} for {secc_id}", err=True)
