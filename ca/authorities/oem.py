"""Vehicle manufacturers' (OEM) roots that the chargers of an environment should trust.

ISO 15118 Plug & Charge lets a vehicle manufacturer provision the EV's contract certificates under
its own root; a charger verifies them against that root, which the CSMS installs with OCPP 2.1's
``InstallCertificate(certificateType=OEMRootCertificate)``. chargepki holds no key of it and
answers for nothing under it: like an external V2G root, an imported OEM root is an ``Authority``
with status ``external`` (role ``oem-root``), stored only to be handed out in the environment's
InstallCertificate bundle (``ca.authorities.rotation.install_certificates``) and in root-rollover
files. It is in no chain, no CRL, no OCSP answer, and never trusted for TLS client certificates.

``import_oem_root`` checks what a station would check before trusting it (one certificate,
self-signed with a signature that verifies, CA:TRUE, keyCertSign when keyUsage is present, valid
now, a known key type, within OCPP 2.1's InstallCertificate size); ``remove_oem_root`` marks it
retired, which takes it out of the bundle.
"""

from __future__ import annotations

import re
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.factory import _row
from ca.authorities.issuers import default_issuing_ca
from ca.authorities.v2g import load_certificates
from ca.clock import Clock
from ca.errors import ConflictError, InputError, NotFoundError, PolicyError
from ca.issuance.names import check_environment
from ca.keys.keyspec import KEY_SPECS, describe_public_key
from ca.kinds import CaRole, CaStatus
from ca.ocpp_limits import INSTALL_CERTIFICATE_CHARS_21
from ca.store.models import Authority
from ca.work import Work

ROLE = CaRole.OEM_ROOT


def oem_root_problems(certificate: x509.Certificate, now: datetime) -> list[str]:
    """Why a station should not install ``certificate`` as an OEM root (empty: nothing)."""
    problems = []
    if certificate.issuer != certificate.subject:
        problems.append("it is not self-signed (issuer and subject differ)")
    else:
        try:
            certificate.verify_directly_issued_by(certificate)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            problems.append("its self-signature does not verify")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            problems.append("basicConstraints says CA:FALSE")
    except x509.ExtensionNotFound:
        problems.append("it has no basicConstraints (CA:TRUE is required)")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            problems.append("its keyUsage lacks keyCertSign")
    except x509.ExtensionNotFound:
        pass  # RFC 5280 §4.2.1.3: a CA certificate without keyUsage may sign certificates
    if certificate.not_valid_after_utc <= now:
        problems.append(f"it expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    elif certificate.not_valid_before_utc > now:
        problems.append(f"it is not valid before {certificate.not_valid_before_utc:%Y-%m-%d}")
    key_type = describe_public_key(certificate.public_key())
    if key_type not in KEY_SPECS:
        problems.append(f"its key ({key_type}) is none of {', '.join(KEY_SPECS)}")
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    limit = INSTALL_CERTIFICATE_CHARS_21
    if len(pem) > limit:
        problems.append(f"its PEM has {len(pem)} characters, more than InstallCertificate's {limit}")
    return problems


def _next_name(session: Session, environment: str) -> str:
    pattern = re.compile(rf"{re.escape(environment)}-oem-root-(\d+)")
    names = session.scalars(select(Authority.name).where(Authority.environment == environment))
    numbers = [int(match.group(1)) for name in names if (match := pattern.fullmatch(name))]
    return f"{environment}-oem-root-{max(numbers, default=0) + 1}"


def import_oem_root(work: Work, *, environment: str, certificate_data: bytes) -> Authority:
    """Store an OEM root (PEM or DER, one certificate) for ``environment``'s chargers, audited.

    Refused: anything but exactly one certificate (``InputError``), a certificate a station should
    not trust as a root (``PolicyError``, code ``bad_oem_root``), the same certificate twice in one
    environment (``ConflictError``).
    """
    environment = default_issuing_ca(work.session, check_environment(environment)).environment  # a known one
    certificates = load_certificates(certificate_data, "the OEM root file")
    if len(certificates) != 1:
        raise InputError(f"expected one OEM root certificate, found {len(certificates)}")
    (certificate,) = certificates
    problems = oem_root_problems(certificate, work.now())
    if problems:
        raise PolicyError(f"not usable as an OEM root: {'; '.join(problems)}", code="bad_oem_root")
    der = certificate.public_bytes(serialization.Encoding.DER)
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex()
    organizations = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    named = organizations or common_names
    try:
        with work.transaction() as session:
            for existing in session.scalars(
                select(Authority).where(Authority.environment == environment, Authority.role == ROLE)
            ):
                if existing.certificate_der == der and existing.status == CaStatus.EXTERNAL:
                    raise ConflictError(f"this OEM root is already imported in {environment} as {existing.name}")
            row = _row(
                work,
                certificate,
                name=_next_name(session, environment),
                role=ROLE,
                environment=environment,
                organization=str(named[0].value)[:64] if named else "-",
                country=None,
                parent=None,
                key_label="",
                key_type=describe_public_key(certificate.public_key()),
                rsa_padding=None,
                ocsp_url="",
                repository_url="",
                status=CaStatus.EXTERNAL,
            )
            session.add(row)
            session.flush()
            audit.record(
                session,
                "oem_root.imported",
                actor=work.actor,
                subject=row.name,
                now=work.now,
                details={
                    "environment": environment,
                    "subject": row.subject,
                    "serial": row.serial,
                    "sha256": fingerprint,
                    "not_after": row.not_after.isoformat(),
                },
            )
    except IntegrityError:
        raise ConflictError("another OEM root was imported at the same time; run it again") from None
    return row


def oem_roots(session: Session, environment: str | None = None, *, now: Clock | None = None) -> list[Authority]:
    """The imported OEM roots (of ``environment``), oldest first; with ``now`` only the unexpired
    ones still in service (what a station should install)."""
    query = select(Authority).where(Authority.role == ROLE)
    if environment is not None:
        query = query.where(Authority.environment == environment)
    if now is not None:
        query = query.where(Authority.status == CaStatus.EXTERNAL, Authority.not_after > now())
    return list(session.scalars(query.order_by(Authority.environment, Authority.id)))


def remove_oem_root(work: Work, *, name: str) -> Authority:
    """Take an OEM root out of its environment's bundle (marked retired, kept for the record), audited."""
    with work.transaction() as session:
        root = session.scalar(select(Authority).where(Authority.name == name, Authority.role == ROLE))
        if root is None:
            known = ", ".join(a.name for a in oem_roots(session)) or "none"
            raise NotFoundError(f"no OEM root named {name!r} (known: {known})")
        if root.status != CaStatus.EXTERNAL:
            raise ConflictError(f"OEM root {root.name} was already removed")
        root.status = CaStatus.RETIRED
        audit.record(
            session,
            "oem_root.removed",
            actor=work.actor,
            subject=root.name,
            now=work.now,
            details={"environment": root.environment, "serial": root.serial},
        )
    return root
