"""OCPP's views of certificates: ``CertificateHashDataType`` lookups and ``GetCertificateStatus``.

OCPP names a certificate by the fields of an OCSP CertID written as text (hash algorithm
SHA256/384/512, issuer name and key hashes in hex, serial in hex without leading zeros), and
hands the CSMS an ``OCSPRequestDataType`` to turn into an OCSP response for the charger. Both are
answered here from what the OCSP side already has: the CAs' CertID hashes, the pre-signed
responses, and (in a process that holds the token) the on-demand signer for what is missing.
OCPP 2.1 also names a root by such hash data (``hashRootCertificate``: ``find_root``), and asks
for a whole chain's status (``ocsp.chain_status``, whose OCSP answers are ``OcppOcsp.answer``'s).
"""

from __future__ import annotations

import binascii
import time
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ca.errors import InputError
from ca.issuance.serials import format_serial
from ca.kinds import CaRole
from ca.ocpp_limits import SERIAL_NUMBER_CHARS
from ca.store.engine import Store
from ca.store.models import Authority, Certificate
from ocsp.certid import CertId, issuer_hashes
from ocsp.presign import Presigner
from ocsp.responder import Responder
from ocsp.signer_service import OnDemandSigner
from ocsp.source import SourceUnavailable, Stored, StoreSource

# OCPP 2.0.1 HashAlgorithmEnumType → the CertID hash (asn1crypto's names, as ``ocsp.certid`` uses them).
HASH_ALGORITHMS = {"SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
_DIGESTS = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


def parse_hash_data(hash_algorithm: str, issuer_name_hash: str, issuer_key_hash: str, serial_number: str) -> CertId:
    """OCPP's textual CertID → a ``CertId``; hex in either case, serial with or without leading zeros."""
    algorithm = HASH_ALGORITHMS.get(hash_algorithm.upper())
    if algorithm is None:
        raise InputError(
            f"hashAlgorithm must be one of {', '.join(HASH_ALGORITHMS)}, not {hash_algorithm[:16]!r}",
            code="bad_hash_algorithm",
        )
    size = _DIGESTS[algorithm].digest_size
    digests = []
    for field, value in (("issuerNameHash", issuer_name_hash), ("issuerKeyHash", issuer_key_hash)):
        try:
            digest = binascii.unhexlify(value.strip())
        except (binascii.Error, ValueError):
            raise InputError(f"{field} is not hexadecimal", code="bad_hash") from None
        if len(digest) != size:
            raise InputError(f"{field} must be {size * 2} hex digits for {hash_algorithm}", code="bad_hash")
        digests.append(digest)
    text = serial_number.strip()
    try:
        if not text or len(text) > SERIAL_NUMBER_CHARS:
            raise ValueError
        serial = int(text, 16)
    except ValueError:
        raise InputError(
            f"serialNumber must be 1-{SERIAL_NUMBER_CHARS} hex digits, not {text[:48]!r}", code="bad_serial"
        ) from None
    if serial <= 0:
        raise InputError("serialNumber must be positive", code="bad_serial")
    return CertId(algorithm, digests[0], digests[1], serial)


def find_authority(session: Session, cert_id: CertId) -> Authority | None:
    """The CA whose name and key hash to the CertID's issuer fields (a handful of CAs: hashed each time);
    an imported OEM root is not a CA of this installation."""
    query = select(Authority).where(Authority.role != CaRole.OEM_ROOT)
    for authority in session.scalars(query.order_by(Authority.id)):
        for hashed in issuer_hashes(x509.load_der_x509_certificate(authority.certificate_der)):
            if (hashed.hash_algorithm, hashed.name_hash, hashed.key_hash) == (
                cert_id.hash_algorithm,
                cert_id.issuer_name_hash,
                cert_id.issuer_key_hash,
            ):
                return authority
    return None


def find_by_hash(session: Session, cert_id: CertId) -> Certificate | None:
    """The issued certificate a CertID names: by issuer *and* serial (CAs share the serial space)."""
    authority = find_authority(session, cert_id)
    if authority is None:
        return None
    return session.scalar(
        select(Certificate).where(
            Certificate.authority_id == authority.id,
            Certificate.serial == format_serial(cert_id.serial_number),
            Certificate.status.in_(("valid", "revoked")),
        )
    )


def find_root(session: Session, cert_id: CertId, environment: str | None = None) -> Authority | None:
    """The root certificate a ``CertificateHashDataType`` names (OCPP 2.1 ``hashRootCertificate``): a
    self-signed CA of ``environment`` whose own name and key hash to the issuer fields (its issuer is
    itself) and whose serial is the serial. Any root: OCPP, V2G (own or external), manufacturer, OEM."""
    query = select(Authority).where(
        Authority.parent_id.is_(None), Authority.serial == format_serial(cert_id.serial_number)
    )
    if environment is not None:
        query = query.where(Authority.environment == environment)
    wanted = (cert_id.hash_algorithm, cert_id.issuer_name_hash, cert_id.issuer_key_hash)
    for authority in session.scalars(query.order_by(Authority.id)):
        certificate = x509.load_der_x509_certificate(authority.certificate_der)
        if certificate.issuer != certificate.subject:
            continue
        for hashed in issuer_hashes(certificate):
            if (hashed.hash_algorithm, hashed.name_hash, hashed.key_hash) == wanted:
                return authority
    return None


@dataclass(frozen=True)
class OcspAnswer:
    der: bytes
    response_status: str  # successful | unauthorized | tryLater | …
    certificate_status: str | None  # good | revoked | unknown, when successful
    next_update: datetime | None = None  # the response's nextUpdate, when successful


class _Uncached:
    """The responder's store lookups without its cache and watcher thread: this process signs on
    demand what the store lacks, and the API's volume does not call for a cache."""

    def __init__(self, source: StoreSource) -> None:
        self.source = source

    def authority_for(self, cert_id: CertId) -> int | None:
        try:
            issuers = self.source.issuers()
        except SQLAlchemyError as exc:
            raise SourceUnavailable(str(exc)) from None
        return issuers.get((cert_id.hash_algorithm, cert_id.issuer_name_hash, cert_id.issuer_key_hash))

    def response(self, authority_id: int, cert_id: CertId) -> Stored | None:
        found = self.source.response(authority_id, cert_id.serial_number, cert_id.hash_algorithm)
        return found if found is not None and found.next_update > time.time() else None

    def recall(self, request: bytes) -> Stored | None:
        """``CachedSource.recall``'s shape: nothing is remembered."""
        return None

    def lookup(self, authority_id: int, cert_id: CertId, *, request: bytes | None = None) -> tuple[Stored | None, bool]:
        """``CachedSource.lookup``'s shape: the stored response, never from a cache."""
        return self.response(authority_id, cert_id), False


class _InProcessSigner:
    """The on-demand signer called directly (it is in this process, with the token) instead of over its socket."""

    def __init__(self, signer: OnDemandSigner) -> None:
        self.signer = signer

    def sign(self, request: bytes) -> bytes:
        return self.signer.respond(request)


class OcppOcsp:
    """``GetCertificateStatus``: the pre-signed response from the store, else one signed now."""

    def __init__(self, store: Store, presigner: Presigner, *, rate: int = 100) -> None:
        self.responder = Responder(
            _Uncached(StoreSource(store)),  # type: ignore[arg-type]
            _InProcessSigner(OnDemandSigner(store, presigner, rate=rate)),  # type: ignore[arg-type]
        )

    def answer(self, cert_id: CertId) -> OcspAnswer:
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(
                cert_id.issuer_name_hash,
                cert_id.issuer_key_hash,
                cert_id.serial_number,
                _DIGESTS[cert_id.hash_algorithm],
            )
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        der = self.responder.answer(request).body
        response = ocsp.load_der_ocsp_response(der)
        status = response.response_status
        if status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return OcspAnswer(der, _camel(status.name), None)
        return OcspAnswer(der, "successful", response.certificate_status.name.lower(), response.next_update_utc)


def _camel(name: str) -> str:
    """cryptography's ``TRY_LATER`` → RFC 6960's ``tryLater``."""
    first, *rest = name.lower().split("_")
    return first + "".join(part.title() for part in rest)
