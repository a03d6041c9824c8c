"""Signing firmware images and verifying them, in the shape OCPP ``SignedUpdateFirmware`` carries.

OCPP's ``FirmwareType`` holds ``signingCertificate`` (PEM, at most 5500 characters) and
``signature`` (base64, at most 800 characters): an ECDSA P-256 signature with SHA-256 over the
firmware file, which charging stations verify before installing. The file is hashed here while
it streams (images are large) and the token signs the digest; every signature is checked
against the signer's certificate before it is handed out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.manufacturer import ROLE, channel_of, get_firmware_signer
from ca.clock import Clock, utcnow
from ca.errors import InputError, PolicyError
from ca.keys.pkcs11_token import Token
from ca.keys.token_keys import token_private_key
from ca.kinds import CertStatus
from ca.ocpp_limits import FIRMWARE_CERTIFICATE_CHARS, FIRMWARE_SIGNATURE_CHARS
from ca.store.models import Authority, Certificate

_CHUNK = 1 << 20


def digest_stream(stream: BinaryIO) -> bytes:
    """SHA-256 of a firmware image, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.digest()


@dataclass(frozen=True)
class FirmwareSignature:
    signature: str  # base64 of the DER ECDSA-Sig-Value
    signing_certificate: str  # PEM
    firmware_sha256: str
    signer: Certificate

    def ocpp(self) -> dict[str, str]:
        """The two fields of OCPP's FirmwareType that carry the signature."""
        return {"signingCertificate": self.signing_certificate, "signature": self.signature}


def _current(signer: Certificate, now: datetime, what: str) -> None:
    if signer.status == CertStatus.REVOKED:
        raise PolicyError(f"{what} is revoked ({signer.revocation_reason}, {signer.revoked_at:%Y-%m-%d %H:%M:%SZ})")
    if signer.status != CertStatus.VALID:
        raise PolicyError(f"{what} was never issued ({signer.status})")
    if signer.not_after <= now:
        raise PolicyError(f"{what} expired on {signer.not_after:%Y-%m-%d}")
    if signer.not_before > now:
        raise PolicyError(f"{what} is not valid before {signer.not_before:%Y-%m-%d %H:%M:%SZ}")


def sign_firmware(
    session: Session,
    token: Token,
    name: str,
    digest: bytes,
    *,
    environment: str | None,
    file_name: str,
    actor: str,
    now: Clock = utcnow,
) -> FirmwareSignature:
    """Sign a firmware image's SHA-256 with the named signer's token key; audited."""
    if len(digest) != 32:
        raise InputError("the firmware digest must be a SHA-256 (32 bytes)")
    signer = get_firmware_signer(session, name, environment)
    _current(signer, now(), f"firmware signer {name!r} (serial {signer.serial})")
    if not signer.key_label:
        raise PolicyError(f"firmware signer {name!r} has no key in this installation's token")
    certificate = x509.load_der_x509_certificate(signer.der or b"")
    public_key = certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    key = token_private_key(token, signer.key_label, public_key)
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    try:
        public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        raise PolicyError(f"the token's signature does not verify under firmware signer {name!r}") from None
    result = FirmwareSignature(
        signature=base64.b64encode(signature).decode("ascii"),
        signing_certificate=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        firmware_sha256=digest.hex(),
        signer=signer,
    )
    if len(result.signature) > FIRMWARE_SIGNATURE_CHARS or len(result.signing_certificate) > FIRMWARE_CERTIFICATE_CHARS:
        raise PolicyError(
            "the signature or certificate exceeds OCPP's FirmwareType limits "
            f"({FIRMWARE_SIGNATURE_CHARS} / {FIRMWARE_CERTIFICATE_CHARS} characters)"
        )
    audit.record(
        session,
        "firmware.signed",
        actor=actor,
        subject=signer.serial,
        now=now,
        details={"signer": name, "channel": channel_of(signer), "file": file_name[-200:], "sha256": digest.hex()},
    )
    session.commit()
    return result


# -- verification --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verified:
    signer: Certificate
    channel: str
    root: Authority


def read_signature(text: bytes) -> bytes:
    """OCPP's base64 signature (whitespace allowed), within 800 characters, as DER."""
    compact = b"".join(text.split())
    if not compact:
        raise InputError("the signature is empty")
    if len(compact) > FIRMWARE_SIGNATURE_CHARS:
        raise InputError(f"the signature is {len(compact)} characters; OCPP allows at most {FIRMWARE_SIGNATURE_CHARS}")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("the signature is not base64 (OCPP carries it base64-encoded)") from None


def read_signing_certificate(text: bytes) -> x509.Certificate:
    """OCPP's PEM signing certificate, within 5500 characters, exactly one certificate."""
    if len(text.strip()) > FIRMWARE_CERTIFICATE_CHARS:
        raise InputError(f"the signing certificate exceeds OCPP's {FIRMWARE_CERTIFICATE_CHARS} characters")
    if not text.lstrip().startswith(b"-----BEGIN CERTIFICATE-----"):
        raise InputError("the signing certificate is not a PEM certificate")
    try:
        certificates = x509.load_pem_x509_certificates(text)
    except ValueError:
        raise InputError("the signing certificate is not a readable PEM certificate") from None
    if len(certificates) != 1:
        raise InputError(f"expected one signing certificate, found {len(certificates)}")
    return certificates[0]


def _issuing_root(session: Session, certificate: x509.Certificate) -> Authority:
    """The manufacturer root that signed ``certificate`` directly (OCPP: no intermediate)."""
    roots = session.scalars(select(Authority).where(Authority.role == ROLE))
    for root in roots:
        root_certificate = x509.load_der_x509_certificate(root.certificate_der)
        if root_certificate.subject != certificate.issuer:
            continue
        try:
            certificate.verify_directly_issued_by(root_certificate)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return root
    raise PolicyError("the signing certificate is not issued directly by a manufacturer root of this installation")


def _check_signer_certificate(certificate: x509.Certificate) -> None:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or ExtendedKeyUsageOID.CODE_SIGNING not in usage:
        raise PolicyError("the signing certificate is not a code-signing certificate")
    try:
        if certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise PolicyError("the signing certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise PolicyError("the signing certificate's key is not ECDSA P-256")


def _check_crl(crl_data: bytes, root: Authority, serial: int, now: datetime) -> None:
    """A CRL given by the operator must be the root's, current, and must not list the signer."""
    try:
        crl = (
            x509.load_pem_x509_crl(crl_data)
            if crl_data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_crl(crl_data)
        )
    except ValueError:
        raise InputError("the CRL file holds no readable CRL") from None
    root_certificate = x509.load_der_x509_certificate(root.certificate_der)
    if crl.issuer != root_certificate.subject or not crl.is_signature_valid(root_certificate.public_key()):  # type: ignore[arg-type]
        raise PolicyError(f"the CRL is not signed by the manufacturer root {root.name}")
    if crl.next_update_utc is not None and crl.next_update_utc <= now:
        raise PolicyError(f"the CRL is out of date (nextUpdate {crl.next_update_utc:%Y-%m-%d %H:%M:%SZ})")
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    if entry is not None:
        raise PolicyError(f"the signing certificate is revoked on the CRL ({entry.revocation_date_utc:%Y-%m-%d})")


def verify_firmware(
    session: Session,
    digest: bytes,
    signature_text: bytes,
    certificate_text: bytes,
    *,
    crl: bytes | None = None,
    now: Clock = utcnow,
) -> Verified:
    """Check a firmware signature as a charging station would, plus revocation: the signature over
    the image, the certificate (codeSigning, P-256) directly under a manufacturer root of this
    installation, both current, and the signer not revoked in the store (and on ``crl``, if given)."""
    signature = read_signature(signature_text)
    certificate = read_signing_certificate(certificate_text)
    _check_signer_certificate(certificate)
    public_key = certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    try:
        public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        raise PolicyError("the signature does not match this firmware file and signing certificate") from None
    root = _issuing_root(session, certificate)
    moment = now()
    if not root.not_before <= moment < root.not_after:
        raise PolicyError(f"the manufacturer root {root.name} is not valid now")
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex()
    stored = session.scalar(select(Certificate).where(Certificate.fingerprint_sha256 == fingerprint))
    if stored is None:  # signed by our root but not recorded: never trust it
        raise PolicyError("the signing certificate is not recorded in this installation")
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    _current(stored, moment, f"the signing certificate ({names[0].value if names else stored.serial})")
    if crl is not None:
        _check_crl(crl, root, certificate.serial_number, moment)
    return Verified(stored, channel_of(stored), root)


def lines(result: FirmwareSignature) -> Iterable[str]:
    """What an operator reads after signing."""
    yield f"signer    {result.signer.common_name} ({channel_of(result.signer)}), serial {result.signer.serial}"
    yield f"sha256    {result.firmware_sha256}"
    yield f"signature {len(result.signature)} base64 characters (OCPP limit {FIRMWARE_SIGNATURE_CHARS})"
    yield f"cert      {len(result.signing_certificate)} PEM characters (OCPP limit {FIRMWARE_CERTIFICATE_CHARS})"
