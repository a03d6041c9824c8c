"""Building a v2 CRL (RFC 5280 §5) for one CA, in time linear in the number of entries.

`CertificateRevocationListBuilder.add_revoked_certificate` copies the list on every call
(quadratic: DESIGN.md measured 40k entries in 3.7 s, 1M never finishing); handing the whole
list to the builder's constructor is linear, so that is what this does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from ca.authorities import Issuer
from ca.revocation import REASONS


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime
    reason: str | None = None  # RFC 5280 name; None or "unspecified" → no reasonCode (§5.3.1)
    invalidity_date: datetime | None = None


def _entry(entry: RevokedEntry) -> x509.RevokedCertificate:
    extensions: list[x509.Extension[x509.ExtensionType]] = []
    if entry.reason is not None and entry.reason != "unspecified":
        reason = x509.CRLReason(REASONS[entry.reason])
        extensions.append(x509.Extension(reason.oid, False, reason))
    if entry.invalidity_date is not None:
        invalidity = x509.InvalidityDate(entry.invalidity_date.replace(tzinfo=None))
        extensions.append(x509.Extension(invalidity.oid, False, invalidity))
    return x509.RevokedCertificateBuilder(entry.serial, entry.revoked_at, extensions).build()


def build_crl(
    issuer: Issuer, entries: Iterable[RevokedEntry], *, this_update: datetime, next_update: datetime, number: int
) -> bytes:
    """The DER of a full CRL signed in the token by ``issuer`` (verified before it is returned)."""
    if issuer.certificate is None:
        raise ValueError("a CRL issuer needs its certificate (AKI, issuer name)")
    ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    crl_number = x509.CRLNumber(number)
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.certificate.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=[x509.Extension(aki.oid, False, aki), x509.Extension(crl_number.oid, False, crl_number)],
        revoked_certificates=[_entry(entry) for entry in entries],
    )
    return issuer.sign_crl(builder)
