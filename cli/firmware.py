"""`chargepki manufacturer init` and `chargepki firmware …`: firmware signers, signing, verifying."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import click

from ca.authorities.manufacturer import (
    ManufacturerRequest,
    add_firmware_signer,
    channel_of,
    firmware_signers,
    get_firmware_signer,
    init_manufacturer,
    manufacturer_root,
)
from ca.clock import iso_utc
from ca.errors import InputError
from ca.firmware import digest_stream, lines, sign_firmware, verify_firmware
from ca.issuance.names import ENVIRONMENTS
from ca.keys.keyspec import ALL_KEY_TYPES
from ca.kinds import CertStatus
from cli.common import State, actor, emit_json, fmt_time, json_option, note, pass_state, table, utc_now
from cli.params import DURATION


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _write(path: Path, data: str) -> None:
    try:
        path.write_text(data, encoding="ascii")
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _digest(path: Path) -> bytes:
    try:
        with path.open("rb") as stream:
            return digest_stream(stream)
    except OSError as exc:
        raise InputError(f"cannot read the firmware file {path}: {exc.strerror or exc}") from None


# -- manufacturer -------------------------------------------------------------------------------
@click.group()
def manufacturer() -> None:
    """The manufacturer hierarchy: a root whose firmware signers sign charger firmware."""


@manufacturer.command("init")
@click.option("--org", required=True, help="The manufacturer's organisation name (subject O).")
@click.option("--environment", type=click.Choice(ENVIRONMENTS), default="production", show_default=True)
@click.option("--country", help="Two-letter country code (subject C), e.g. DE.")
@click.option("--key-type", type=click.Choice(ALL_KEY_TYPES), default="ec-p256", show_default=True)
@click.option("--validity", type=DURATION, help="Root validity (default 20 years, at most 30).")
@pass_state
def manufacturer_init(
    state: State, org: str, environment: str, country: str | None, key_type: str, validity: timedelta | None
) -> None:
    """Create the manufacturer root of one environment (key in the token) and its OCSP signer."""
    pki = state.pki(create=True)
    request = ManufacturerRequest(
        organization=org,
        environment=environment,
        country=country,
        key_type=key_type,
        ocsp_url=pki.config.ocsp_url,
        repository_url=pki.config.repository_url,
        validity=validity,
    )
    with pki.store.session() as session:
        created = init_manufacturer(state.work(session), request=request)
        click.echo(f"[{environment}] manufacturer root {created.root.name}: {created.root.subject}")
        click.echo(f"  OCSP signer {created.ocsp_signer.serial}; next: chargepki firmware signer add NAME")


# -- firmware -----------------------------------------------------------------------------------
@click.group()
def firmware() -> None:
    """Firmware signers (per release channel), signing images for OCPP SignedUpdateFirmware, verifying."""


@firmware.group("signer")
def signer_group() -> None:
    """Firmware signing certificates, directly under the manufacturer root."""


@signer_group.command("add")
@click.argument("name")
@click.option("--channel", default="stable", show_default=True, help="Release channel (stable, beta, …).")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option("--validity", type=DURATION, help="Validity (default 3 years, at most 5).")
@pass_state
def signer_add(state: State, name: str, channel: str, environment: str | None, validity: timedelta | None) -> None:
    """Issue a firmware signing certificate NAME for one channel; its key is generated in the token."""
    pki = state.pki()
    with pki.store.session() as session:
        note(manufacturer_root(session, environment))
        row = add_firmware_signer(
            state.work(session), name=name, environment=environment, channel=channel, validity=validity
        )
        click.echo(f"firmware signer {name} ({channel}): serial {row.serial}, valid until {fmt_time(row.not_after)}")


@signer_group.command("list")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@json_option
@pass_state
def signer_list(state: State, environment: str | None, as_json: bool) -> None:
    """List firmware signers, newest first (revoke one with `chargepki revoke SERIAL`)."""
    now = utc_now()
    with state.pki().store.session() as session:
        rows, found = [], []
        for signer in firmware_signers(session, environment):
            shown = signer.status if signer.status != CertStatus.VALID or signer.not_after > now else "expired"
            found.append(
                {
                    "name": signer.common_name,
                    "channel": channel_of(signer),
                    "environment": signer.authority.environment,
                    "serial": signer.serial,
                    "status": shown,
                    "not_before": iso_utc(signer.not_before),
                    "not_after": iso_utc(signer.not_after),
                }
            )
            rows.append(
                [
                    signer.common_name or "-",
                    channel_of(signer),
                    signer.authority.environment,
                    signer.serial,
                    shown,
                    fmt_time(signer.not_after),
                ]
            )
    if as_json:
        emit_json({"firmware_signers": found})
        return
    table(["NAME", "CHANNEL", "ENVIRONMENT", "SERIAL", "STATUS", "NOT AFTER"], rows)


@firmware.command("sign")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--signer", "signer_name", required=True, help="The firmware signer's NAME.")
@click.option("--environment", type=click.Choice(ENVIRONMENTS))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Prefix of the output files (default: FILE): PREFIX.json, PREFIX.sig, PREFIX.crt.",
)
@pass_state
def firmware_sign(state: State, file: Path, signer_name: str, environment: str | None, out: Path | None) -> None:
    """Sign FILE (ECDSA P-256 / SHA-256) for OCPP SignedUpdateFirmware.

    \b
    Writes PREFIX.json  {"signingCertificate": PEM, "signature": base64}: the two
                        fields of OCPP's FirmwareType, to paste into the request
           PREFIX.sig   the base64 signature (at most 800 characters)
           PREFIX.crt   the signing certificate, PEM (at most 5500 characters)
    """
    digest = _digest(file)
    pki = state.pki()
    with pki.store.session() as session:
        note(get_firmware_signer(session, signer_name, environment).authority)
        result = sign_firmware(
            session, pki.token(), signer_name, digest, environment=environment, file_name=file.name, actor=actor()
        )
    prefix = out or file
    paths = {suffix: prefix.with_name(prefix.name + suffix) for suffix in (".json", ".sig", ".crt")}
    _write(paths[".json"], json.dumps(result.ocpp(), indent=2) + "\n")
    _write(paths[".sig"], result.signature + "\n")
    _write(paths[".crt"], result.signing_certificate)
    for line in lines(result):
        click.echo(line)
    click.echo(f"wrote     {paths['.json']}, {paths['.sig']}, {paths['.crt']}")


@firmware.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--signature",
    "signature_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The base64 signature (PREFIX.sig).",
)
@click.option(
    "--certificate",
    "certificate_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The signing certificate, PEM (PREFIX.crt).",
)
@click.option(
    "--crl",
    "crl_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also check this CRL of the manufacturer root (as published by `crl publish`).",
)
@json_option
@pass_state
def firmware_verify(
    state: State, file: Path, signature_file: Path, certificate_file: Path, crl_file: Path | None, as_json: bool
) -> None:
    """Check FILE's signature, its certificate's chain to the manufacturer root, validity and revocation.

    A refusal is an error (exit status 1; with --json, {"error": …} on stdout).
    """
    digest = _digest(file)
    signature = _read(signature_file, "the signature")
    certificate = _read(certificate_file, "the signing certificate")
    crl = _read(crl_file, "the CRL") if crl_file is not None else None
    with state.pki().store.session() as session:
        verified = verify_firmware(session, digest, signature, certificate, crl=crl)
        note(verified.root)
        if as_json:
            emit_json(
                {
                    "ok": True,
                    "file": file.name,
                    "signer": verified.signer.common_name,
                    "channel": verified.channel,
                    "serial": verified.signer.serial,
                    "root": verified.root.name,
                }
            )
            return
        click.echo(
            f"OK: {file.name} signed by {verified.signer.common_name} ({verified.channel}), "
            f"serial {verified.signer.serial}, under {verified.root.name}"
        )
