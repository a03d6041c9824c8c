"""Building a v2 CRL (RFC 5280 §5) for one CA, in time linear in the number of entries.

``cryptography``'s builder is linear when given the whole list, but at 4–12 µs per entry it put
a 1M-entry CRL about level with ``openssl ca -gencrl`` (bench/results-crl.md). So
the builder makes only the entry-less CRL (version, signature algorithm, issuer, dates, AKI, CRL
number: everything whose exact encoding depends on the key and the library), the entries are
written by ``crl.der`` and spliced into that TBSCertList, and the result is signed again in the
token. The first signature (never published) is the price of letting ``cryptography`` choose the
AlgorithmIdentifier and the header encoding: the entry-less CRL took 0.6 ms (EC P-256) to 5.4 ms
(RSA-4096) in SoftHSM2 here, against seconds for the entries of a large CRL.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from cryptography import x509

from ca.authorities.issuers import Issuer
from crl import der


class RevokedEntry(NamedTuple):
    """One CRL entry (a tuple, so rows read from the store can be handed over as they are)."""

    serial: int
    revoked_at: datetime
    reason: str | None = None  # RFC 5280 name; None or "unspecified" → no reasonCode (§5.3.1)
    invalidity_date: datetime | None = None


def empty_crl(issuer: Issuer, *, this_update: datetime, next_update: datetime, number: int) -> bytes:
    """The CRL without entries, built and signed (in the token) by ``cryptography``'s builder."""
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
    )
    return issuer.sign_crl(builder)


def build(
    issuer: Issuer, entries: Iterable[der.Entry], *, this_update: datetime, next_update: datetime, number: int
) -> tuple[bytes, int]:
    """(DER of the full CRL signed in the token and verified, number of entries)."""
    revoked, count = der.revoked_certificates(entries)
    template = empty_crl(issuer, this_update=this_update, next_update=next_update, number=number)
    if not count:
        return template, 0
    tbs, algorithm = der.split_certificate_list(template)
    tbs = der.splice_entries(tbs, revoked)
    del revoked  # the CRL is tens of MB at 1M entries: keep one copy at a time
    crl = issuer.check_crl(der.certificate_list(tbs, algorithm, issuer.sign_tbs(tbs)))
    return crl, count


def build_crl(
    issuer: Issuer, entries: Iterable[der.Entry], *, this_update: datetime, next_update: datetime, number: int
) -> bytes:
    """The DER of a full CRL signed in the token by ``issuer`` (verified before it is returned).

    ``entries`` are ``RevokedEntry`` or tuples of the same shape, where the serial may also be the
    store's hex text and the dates UTC text ``YYYY-MM-DD HH:MM:SS`` (``crl.der.Entry``).
    """
    return build(issuer, entries, this_update=this_update, next_update=next_update, number=number)[0]
