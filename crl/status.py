"""A certificate's status as the CA's current published CRL says it (``crl publish`` writes
``<publication directory>/<CA name>.crl``).

What a relying party would do with the file, done once per published CRL: the CRL must be the
CA's (issuer name, signature by the CA's key) and current (nextUpdate still ahead); then a
serial is revoked if it is listed. OCPP 2.1's GetCertificateChainStatus with ``source=CRL`` is
answered from here (``ocsp.chain_status``).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm


class CrlUnusable(Exception):
    """The published CRL cannot vouch for anything: missing, unreadable, not the CA's, or stale."""


@dataclass(frozen=True)
class CrlStatus:
    revoked: bool
    reason: str | None  # RFC 5280 name when revoked and the CRL says why
    this_update: datetime
    next_update: datetime
    number: int | None


@dataclass(frozen=True)
class CheckedCrl:
    crl: x509.CertificateRevocationList
    next_update: datetime
    number: int | None


def check_crl(der: bytes, issuer: x509.Certificate) -> CheckedCrl:
    """Parse ``der`` and check it is ``issuer``'s CRL, signed by its key; ``CrlUnusable`` otherwise."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        raise CrlUnusable("the published CRL is not a readable DER CRL") from None
    if crl.issuer != issuer.subject:
        raise CrlUnusable("the published CRL names another issuer")
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CrlUnusable("the published CRL's signature does not verify with the CA's key")
    if crl.next_update_utc is None:
        raise CrlUnusable("the published CRL has no nextUpdate")
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    return CheckedCrl(crl, crl.next_update_utc, number)


class PublishedCrls:
    """The CAs' published CRLs, each checked once per content and kept while the file is unchanged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked: dict[str, tuple[bytes, CheckedCrl]] = {}  # CA name → (SHA-256 of the DER, checked CRL)

    def status(self, name: str, der: bytes | None, issuer: x509.Certificate, serial: int, now: datetime) -> CrlStatus:
        """What CA ``name``'s CRL ``der`` (the published file's bytes; None: none published) says about
        ``serial``; ``CrlUnusable`` when it cannot say anything (missing, not the CA's, past nextUpdate)."""
        if der is None:
            raise CrlUnusable(f"no CRL of {name} is published")
        digest = hashlib.sha256(der).digest()
        with self._lock:
            cached = self._checked.get(name)
        if cached is not None and cached[0] == digest:
            checked = cached[1]
        else:
            checked = check_crl(der, issuer)
            with self._lock:
                self._checked[name] = (digest, checked)
        if checked.next_update <= now:
            raise CrlUnusable(f"the published CRL of {name} is stale (nextUpdate {checked.next_update:%Y-%m-%d %H:%M})")
        entry = checked.crl.get_revoked_certificate_by_serial_number(serial)
        reason = None
        if entry is not None:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
            except x509.ExtensionNotFound:
                reason = None
        return CrlStatus(
            revoked=entry is not None,
            reason=reason,
            this_update=checked.crl.last_update_utc,
            next_update=checked.next_update,
            number=checked.number,
        )
