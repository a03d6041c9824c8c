"""Building and signing OCSP responses (RFC 6960 §4.2) with a delegated signer's key in the token.

asn1crypto assembles the ``ResponseData`` because ``cryptography``'s ``OCSPResponseBuilder``
takes one SingleResponse only, and a request naming several certificates must be answered in
one response. The signature is made by the token through the same ``cryptography`` key
objects that sign certificates, and every response is parsed back and its signature verified
before it leaves this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from asn1crypto import algos as asn1_algos
from asn1crypto import core as asn1_core
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca.errors import TokenError
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
        # Parsed once: re-parsing the certificate for every response cost most of the signing time.
        object.__setattr__(self, "_asn1_certificate", asn1_x509.Certificate.load(self.certificate_der))
        object.__setattr__(
            self, "_key_hash", x509.SubjectKeyIdentifier.from_public_key(self.certificate.public_key()).digest
        )  # type: ignore[arg-type]

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def _hash(self) -> hashes.HashAlgorithm:
        key = self.certificate.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1":
            return hashes.SHA384()
        return hashes.SHA256()

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
        tbs = asn1_ocsp.ResponseData(
            {
                "responder_id": asn1_ocsp.ResponderId(name="by_key", value=self.key_hash()),
                "produced_at": this_update,
                "responses": [_single(status, this_update, next_update) for status in statuses],
            }
        )
        tbs_der = tbs.dump()
        signature = self._sign(tbs_der)
        try:
            self._verify(signature, tbs_der)
        except InvalidSignature:
            raise TokenError(f"the token's OCSP signature does not verify under signer {self.serial}") from None
        basic = asn1_ocsp.BasicOCSPResponse(
            {
                "tbs_response_data": tbs,
                "signature_algorithm": self._algorithm(),
                "signature": signature,
                "certs": [self._asn1_certificate],  # type: ignore[attr-defined]
            }
        )
        return asn1_ocsp.OCSPResponse(
            {
                "response_status": "successful",
                "response_bytes": {"response_type": "basic_ocsp_response", "response": basic},
            }
        ).dump()


def _second(moment: datetime) -> datetime:
    """GeneralizedTime without fractions (RFC 5280 §4.1.2.5.2 habits, and what clients expect)."""
    return moment.astimezone(UTC).replace(microsecond=0)


def _single(status: SingleStatus, this_update: datetime, next_update: datetime) -> asn1_ocsp.SingleResponse:
    cert_id = status.cert_id
    if status.status == "good":
        cert_status = asn1_ocsp.CertStatus(name="good", value=asn1_core.Null())
    elif status.status == "unknown":
        cert_status = asn1_ocsp.CertStatus(name="unknown", value=asn1_core.Null())
    elif status.status == "revoked":
        if status.revoked_at is None:
            raise ValueError("a revoked status needs its revocation time")
        info: dict[str, object] = {"revocation_time": _second(status.revoked_at)}
        if status.reason is not None and status.reason != "unspecified":
            info["revocation_reason"] = _ASN1_REASONS[status.reason]
        cert_status = asn1_ocsp.CertStatus(name="revoked", value=asn1_ocsp.RevokedInfo(info))
    else:
        raise ValueError(f"unknown certificate status {status.status!r}")
    return asn1_ocsp.SingleResponse(
        {
            "cert_id": {
                "hash_algorithm": {"algorithm": cert_id.hash_algorithm},
                "issuer_name_hash": cert_id.issuer_name_hash,
                "issuer_key_hash": cert_id.issuer_key_hash,
                "serial_number": cert_id.serial_number,
            },
            "cert_status": cert_status,
            "this_update": this_update,
            "next_update": next_update,
        }
    )


def etag(der: bytes) -> str:
    """A strong validator for HTTP caches: the response's own SHA-1 (RFC 5019 §6.2 suggests it)."""
    return '"' + hashlib.sha1(der).hexdigest() + '"'
