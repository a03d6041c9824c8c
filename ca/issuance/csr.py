"""PKCS#10 requests: parse PEM or DER, prove possession, read what the requester asks for."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from ca.errors import InputError, PolicyError

MAX_CSR_BYTES = 16 * 1024


@dataclass(frozen=True)
class CsrRequest:
    """The parts of a verified CSR that the CA considers; everything else is ignored."""

    public_key: CertificatePublicKeyTypes
    common_name: str
    organization: str | None
    dns_names: tuple[str, ...]
    csr: x509.CertificateSigningRequest


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Load a PEM or DER CSR; anything else is an ``InputError`` naming what was wrong."""
    if not data:
        raise InputError("the CSR is empty", code="bad_csr")
    if len(data) > MAX_CSR_BYTES:
        raise InputError(f"the CSR is larger than {MAX_CSR_BYTES} bytes", code="bad_csr")
    stripped = data.strip()
    try:
        if stripped.startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(stripped)
        return x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError (found by fuzzing)
        kind = "PEM" if stripped.startswith(b"-----BEGIN") else "DER"
        raise InputError(f"malformed CSR ({kind}): {_first_line(exc)}", code="bad_csr") from None


def _single(name: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if len(values) > 1:
        raise PolicyError(f"the CSR subject has more than one {label}", code="bad_subject")
    if not values:
        return None
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# What cryptography raises for malformed or unsupported parts of a parsed CSR; several are no
# ValueError (found by fuzzing: each became an HTTP 500 before).
_MALFORMED = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def read_csr(data: bytes) -> CsrRequest:
    """Parse and verify the CSR's self-signature (proof of possession of the private key).

    Every part later code reads (key, subject, attributes, extensions) is parsed here, so
    malformed input is refused by this function and nowhere later.
    """
    csr = load_csr(data)
    try:
        public_key = csr.public_key()
    except UnsupportedAlgorithm:
        raise PolicyError("the CSR's public key type is not supported", code="key_not_allowed") from None
    except _MALFORMED as exc:
        raise InputError(f"malformed CSR public key: {_first_line(exc)}") from None
    try:
        signature_ok = csr.is_signature_valid
    except UnsupportedAlgorithm:
        raise PolicyError("the CSR's signature algorithm is not supported", code="key_not_allowed") from None
    except _MALFORMED as exc:
        raise InputError(f"malformed CSR signature: {_first_line(exc)}", code="bad_csr") from None
    if not signature_ok:
        raise PolicyError(
            "the CSR signature is invalid (no proof of possession of the private key)", code="bad_csr_signature"
        )
    try:
        subject = csr.subject
        common_name = _single(subject, NameOID.COMMON_NAME, "CN")
        organization = _single(subject, NameOID.ORGANIZATION_NAME, "O")
    except _MALFORMED as exc:
        raise InputError(f"malformed CSR subject: {_first_line(exc)}", code="bad_csr") from None
    try:
        list(csr.attributes)  # read later for challengePassword (tls-unique)
    except _MALFORMED as exc:
        raise InputError(f"malformed CSR attributes: {_first_line(exc)}", code="bad_csr") from None
    if not common_name:
        raise PolicyError("the CSR subject has no CN", code="bad_subject")
    dns_names: tuple[str, ...] = ()
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    except _MALFORMED as exc:
        raise InputError(f"malformed CSR extensions: {_first_line(exc)}", code="bad_csr") from None
    return CsrRequest(public_key, common_name, organization, dns_names, csr)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
