"""Building and signing OCSP responses (RFC 6960 §4.2) with a delegated signer's key in the token.

The response is written as DER directly (``cryptography``'s ``OCSPResponseBuilder`` takes one
SingleResponse only, and a request naming several certificates must be answered in one
response): the parts fixed per signer (ResponderID, signature algorithm, the signer's
certificate) and per CertID hash algorithm are encoded once with asn1crypto and kept; only the
times, the CertID, the status and the signature are encoded per response. Building the same
response with asn1crypto objects field by field cost ~10× the signature itself;
``tests/ocsp/test_ocsp_der.py`` checks the bytes against asn1crypto's encoding and cryptography's parser.
The signature is made by the token through the same ``cryptography`` key objects that sign
certificates, and every signature is verified before the response leaves this module.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from asn1crypto import algos as asn1_algos
from asn1crypto import crl as asn1_crl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca.errors import TokenError
from ca.keys.keyspec import public_key_signature_hash
from ca.keys.token_keys import TokenECPrivateKey, TokenRSAPrivateKey
from ca.status.revocation import REASONS
from ocsp.certid import CertId

# RFC 6960 §4.2.1 error statuses: fixed bytes, no signature (and so no key) needed.
MALFORMED_REQUEST = bytes.fromhex("30030a0101")
INTERNAL_ERROR = bytes.fromhex("30030a0102")
TRY_LATER = bytes.fromhex("30030a0103")
UNAUTHORIZED = bytes.fromhex("30030a0106")

# RFC 5280 reason names → asn1crypto's CRLReason names.
_ASN1_REASONS = {name: flag.name for name, flag in REASONS.items()}


@dataclass(frozen=True)
class SingleStatus:
    """One certificate's answer: ``good``, ``revoked`` (with time and reason) or ``unknown``."""

    cert_id: CertId
    status: str
    revoked_at: datetime | None = None
    reason: str | None = None  # RFC 5280 name; None and unspecified are left out


@dataclass(frozen=True)
class ResponseSigner:
    """A CA's delegated OCSP signer: its certificate (put in every response) and its token key."""

    authority_id: int
    serial: str
    certificate: x509.Certificate
    certificate_der: bytes
    private_key: TokenECPrivateKey | TokenRSAPrivateKey
    rsa_padding: str | None = None  # pkcs1 | pss for RSA keys

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_key_hash", x509.SubjectKeyIdentifier.from_public_key(self.certificate.public_key()).digest
        )  # type: ignore[arg-type]
        # The fixed parts of every response, encoded once: ResponderID byKey ([2] EXPLICIT OCTET
        # STRING), the signature algorithm, and certs ([0] EXPLICIT SEQUENCE OF Certificate).
        object.__setattr__(self, "_responder_id", _tlv(0xA2, _tlv(0x04, self._key_hash)))  # type: ignore[attr-defined]
        object.__setattr__(self, "_algorithm_der", self._algorithm().dump())
        object.__setattr__(self, "_certs_der", _tlv(0xA0, _tlv(0x30, self.certificate_der)))

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def _hash(self) -> hashes.HashAlgorithm:
        """The signer key's hash, by the rule every CA signature follows (P-521: SHA-512)."""
        return public_key_signature_hash(self.certificate.public_key())

    def _algorithm(self) -> asn1_algos.SignedDigestAlgorithm:
        hash_name = self._hash().name
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            return asn1_algos.SignedDigestAlgorithm({"algorithm": f"{hash_name}_ecdsa"})
        if self.rsa_padding == "pss":
            digest = asn1_algos.DigestAlgorithm({"algorithm": hash_name})
            return asn1_algos.SignedDigestAlgorithm(
                {
                    "algorithm": "rsassa_pss",
                    "parameters": {
                        "hash_algorithm": digest,
                        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": digest},
                        "salt_length": self._hash().digest_size,
                    },
                }
            )
        return asn1_algos.SignedDigestAlgorithm({"algorithm": f"{hash_name}_rsa"})

    def _sign(self, data: bytes) -> bytes:
        algorithm = self._hash()
        if isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            return self.private_key.sign(data, ec.ECDSA(algorithm))
        if self.rsa_padding == "pss":
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
            return self.private_key.sign(data, pss, algorithm)
        return self.private_key.sign(data, padding.PKCS1v15(), algorithm)

    def _verify(self, signature: bytes, data: bytes) -> None:
        key = self.certificate.public_key()
        algorithm = self._hash()
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            chosen = (
                padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
                if self.rsa_padding == "pss"
                else padding.PKCS1v15()
            )
            key.verify(signature, data, chosen, algorithm)
        else:  # pragma: no cover - signer keys are made by chargepki, EC or RSA only
            raise TokenError(f"unsupported OCSP signer key {type(key).__name__}")

    def key_hash(self) -> bytes:
        """ResponderID byKey: SHA-1 of the signer's subjectPublicKey (RFC 6960 §4.2.2.3)."""
        return self._key_hash  # type: ignore[attr-defined, no-any-return]

    def sign(self, statuses: Sequence[SingleStatus], *, this_update: datetime, next_update: datetime) -> bytes:
        """A successful OCSPResponse answering every status in one signed BasicOCSPResponse."""
        if not statuses:
            raise ValueError("an OCSP response answers at least one CertID")
        this_update = _second(this_update)
        next_update = min(_second(next_update), self.not_after)  # never outlive the signer
        produced = _generalized_time(this_update)
        # SingleResponse's thisUpdate and nextUpdate ([0] EXPLICIT), the same for every status.
        times = produced + _tlv(0xA0, _generalized_time(next_update))
        responses = b"".join(_single(status, times) for status in statuses)
        tbs_der = _tlv(
            0x30,
            self._responder_id + produced + _tlv(0x30, responses),  # type: ignore[attr-defined]
        )
        signature = self._sign(tbs_der)
        try:
            self._verify(signature, tbs_der)
        except InvalidSignature:
            raise TokenError(f"the token's OCSP signature does not verify under signer {self.serial}") from None
        basic = _tlv(
            0x30,
            tbs_der + self._algorithm_der + _tlv(0x03, b"\x00" + signature) + self._certs_der,  # type: ignore[attr-defined]
        )
        # OCSPResponse: responseStatus successful, responseBytes [0] EXPLICIT {id-pkix-ocsp-basic, OCTET STRING}.
        return _tlv(0x30, _SUCCESSFUL + _tlv(0xA0, _tlv(0x30, _ID_PKIX_OCSP_BASIC + _tlv(0x04, basic))))


_SUCCESSFUL = bytes.fromhex("0a0100")  # ENUMERATED 0
_ID_PKIX_OCSP_BASIC = bytes.fromhex("06092b0601050507300101")  # OID 1.3.6.1.5.5.7.48.1.1
_GOOD = bytes.fromhex("8000")  # [0] IMPLICIT NULL
_UNKNOWN = bytes.fromhex("8200")  # [2] IMPLICIT NULL


def _length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element (a single-octet tag; lengths in definite form)."""
    return bytes((tag,)) + _length(len(content)) + content


def _generalized_time(moment: datetime) -> bytes:
    """GeneralizedTime YYYYMMDDHHMMSSZ (the caller has dropped the fractions and made it UTC)."""
    return _tlv(
        0x18,
        f"{moment.year:04d}{moment.month:02d}{moment.day:02d}{moment.hour:02d}"
        f"{moment.minute:02d}{moment.second:02d}Z".encode(),
    )


def _integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("a certificate serial number is positive")
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@functools.cache
def _hash_algorithm(name: str) -> bytes:
    """A CertID's AlgorithmIdentifier as asn1crypto writes it (e.g. sha1 with NULL parameters)."""
    return asn1_algos.DigestAlgorithm({"algorithm": name}).dump()


@functools.cache
def _reason(name: str) -> bytes:
    """revocationReason [0] EXPLICIT CRLReason."""
    return _tlv(0xA0, asn1_crl.CRLReason(_ASN1_REASONS[name]).dump())


def _second(moment: datetime) -> datetime:
    """GeneralizedTime without fractions (RFC 5280 §4.1.2.5.2 habits, and what clients expect)."""
    return moment.astimezone(UTC).replace(microsecond=0)


def _single(status: SingleStatus, times: bytes) -> bytes:
    """One SingleResponse: CertID, status, then ``times`` (thisUpdate, nextUpdate) already encoded."""
    cert_id = status.cert_id
    if status.status == "good":
        cert_status = _GOOD
    elif status.status == "unknown":
        cert_status = _UNKNOWN
    elif status.status == "revoked":
        if status.revoked_at is None:
            raise ValueError("a revoked status needs its revocation time")
        info = _generalized_time(_second(status.revoked_at))
        if status.reason is not None and status.reason != "unspecified":
            info += _reason(status.reason)
        cert_status = _tlv(0xA1, info)  # [1] IMPLICIT RevokedInfo
    else:
        raise ValueError(f"unknown certificate status {status.status!r}")
    encoded_id = _tlv(
        0x30,
        _hash_algorithm(cert_id.hash_algorithm)
        + _tlv(0x04, cert_id.issuer_name_hash)
        + _tlv(0x04, cert_id.issuer_key_hash)
        + _integer(cert_id.serial_number),
    )
    return _tlv(0x30, encoded_id + cert_status + times)


def etag(der: bytes) -> str:
    """A strong validator for HTTP caches: the response's own SHA-1 (RFC 5019 §6.2 suggests it)."""
    return '"' + hashlib.sha1(der).hexdigest() + '"'
