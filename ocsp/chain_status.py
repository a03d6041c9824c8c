"""OCPP 2.1 GetCertificateChainStatus (M07): the status of up to four certificates of a chain, each
from OCSP or from a CRL, with when to ask again.

A charging station needs it during an ISO 15118-20 TLS handshake: for each certificate (named by
its ``CertificateHashDataType``) it says which source it wants. Both are answered from what this
CA already publishes, never from a side channel:

- ``OCSP``: ``OcppOcsp.answer`` (the pre-signed response, else one signed now): Good, Revoked or
  Unknown as the response says, ``nextUpdate`` the response's;
- ``CRL``: the CA's current published CRL (``crl.status``): Revoked when it lists the serial, else
  Good, ``nextUpdate`` the CRL's; a serial the CA never issued is Unknown, as OCSP says.

``Failed`` (with ``nextUpdate`` ``FAILED_RETRY`` ahead) when the source cannot answer: a CA whose
key is elsewhere (an external V2G root answers for itself), no current CRL published, the OCSP
signer unavailable. An issuer that is no CA of this installation refuses the whole request
(``NotFoundError`` ``unknown_issuer``) before anything is looked up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.errors import NotFoundError
from ca.issuance.serials import format_serial
from ca.kinds import CaStatus, CertStatus
from ca.store.models import Authority, Certificate
from crl.status import CrlUnusable, PublishedCrls
from ocsp.certid import CertId
from ocsp.ocpp import OcppOcsp, find_authority
from ocsp.wsgi import read_published

SOURCES = ("CRL", "OCSP")  # CertificateStatusSourceEnumType
FAILED_RETRY = timedelta(minutes=1)  # nextUpdate of a Failed entry: ask again soon, not at once
_OCSP_STATUSES = {"good": "Good", "revoked": "Revoked", "unknown": "Unknown"}  # → CertificateStatusEnumType


@dataclass(frozen=True)
class StatusRequest:
    """One ``CertificateStatusRequestInfoType``: the certificate and where its status should come from
    (its ``urls`` are the station's copy of the certificate's AIA/CDP; this CA is that source)."""

    source: str  # OCSP | CRL
    cert_id: CertId


@dataclass(frozen=True)
class EntryStatus:
    """One ``CertificateStatusType`` (without the hash data, which the caller echoes)."""

    source: str
    status: str  # Good | Revoked | Unknown | Failed
    next_update: datetime
    detail: str  # for the audit entry: why Failed, or the CA asked


class ChainStatus:
    """Answers GetCertificateChainStatus in a process that holds the token (the CSMS API's workers)."""

    def __init__(self, ocsp: OcppOcsp, repository: Path) -> None:
        self.ocsp = ocsp
        self.repository = repository  # the CRL publication directory (``crl publish``'s default)
        self.crls = PublishedCrls()

    def answer(self, session: Session, requests: list[StatusRequest], now: datetime) -> list[EntryStatus]:
        issuers = []
        for number, request in enumerate(requests, 1):
            authority = find_authority(session, request.cert_id)
            if authority is None:
                raise NotFoundError(
                    f"certificateStatusRequests[{number}]: no CA of this installation has these issuer hashes",
                    code="unknown_issuer",
                )
            issuers.append(authority)
        session.commit()  # end the read: the on-demand OCSP signer writes in a session of its own (SQLite: one writer)
        return [
            self._ocsp(request, issuer, now) if request.source == "OCSP" else self._crl(session, request, issuer, now)
            for request, issuer in zip(requests, issuers, strict=True)
        ]

    def _ocsp(self, request: StatusRequest, issuer: Authority, now: datetime) -> EntryStatus:
        answer = self.ocsp.answer(request.cert_id)
        if answer.response_status != "successful" or answer.certificate_status is None:
            why = "its key is elsewhere" if issuer.status == CaStatus.EXTERNAL else f"OCSP {answer.response_status}"
            return _failed("OCSP", now, f"{issuer.name}: {why}")
        next_update = answer.next_update or now
        return EntryStatus("OCSP", _OCSP_STATUSES[answer.certificate_status], next_update, issuer.name)

    def _crl(self, session: Session, request: StatusRequest, issuer: Authority, now: datetime) -> EntryStatus:
        if issuer.status == CaStatus.EXTERNAL:
            return _failed("CRL", now, f"{issuer.name}: its key is elsewhere, it publishes no CRL here")
        found = read_published(self.repository, f"{issuer.name}.crl")
        certificate = x509.load_der_x509_certificate(issuer.certificate_der)
        serial = request.cert_id.serial_number
        try:
            status = self.crls.status(issuer.name, found[0] if found else None, certificate, serial, now)
        except CrlUnusable as exc:
            return _failed("CRL", now, str(exc))
        if status.revoked:
            return EntryStatus("CRL", "Revoked", status.next_update, f"{issuer.name} CRL {status.number}")
        issued = session.scalar(
            select(Certificate.id).where(
                Certificate.authority_id == issuer.id,
                Certificate.serial == format_serial(serial),
                Certificate.status.in_((CertStatus.VALID, CertStatus.REVOKED)),
            )
        )
        session.commit()  # end the read
        state = "Good" if issued is not None else "Unknown"
        return EntryStatus("CRL", state, status.next_update, f"{issuer.name} CRL {status.number}")


def _failed(source: str, now: datetime, detail: str) -> EntryStatus:
    return EntryStatus(source, "Failed", now + FAILED_RETRY, detail)
