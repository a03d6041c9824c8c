"""The keyless OCSP responder: request bytes in, response bytes and caching facts out.

It holds no key and no token. Answers come from the pre-signed store (through the cache);
what the store cannot answer (unknown serials, several CertIDs, a hash not signed ahead, a
response past its nextUpdate) goes to the on-demand signer over a local socket.
"""

from __future__ import annotations

from datetime import UTC
from typing import NamedTuple

from cryptography.x509 import ocsp

from ocsp.requests import MalformedRequest, read_request
from ocsp.signer_service import SignerClient, SignerUnavailable
from ocsp.signing import MALFORMED_REQUEST, TRY_LATER, UNAUTHORIZED
from ocsp.source import CachedSource, SourceUnavailable, Stored, stored

# OCSPResponseStatus (RFC 6960 §4.2.1) by its ENUMERATED value, as the metrics name them.
_STATUS_NAMES = {
    0: "successful",
    1: "malformed_request",
    2: "internal_error",
    3: "try_later",
    5: "sig_required",
    6: "unauthorized",
}


class Answer(NamedTuple):  # a tuple, not a dataclass: one is made per request (bench/ocsp_paths.py)
    body: bytes
    cache: Stored | None = None  # None: an error status, not to be cached
    source: str = "none"  # cache | store | signer | none (an error status made here)

    @property
    def status(self) -> str:
        """The responseStatus, read from the DER's first bytes (SEQUENCE, then ENUMERATED of length 1);
        an answer with caching facts is a successful response (``Stored``)."""
        if self.cache is not None:
            return "successful"
        body = self.body
        if len(body) < 5 or body[0] != 0x30:
            return "unknown"
        start = 2 if body[1] < 0x80 else 2 + (body[1] & 0x7F)
        if body[start : start + 2] != b"\x0a\x01" or len(body) <= start + 2:
            return "unknown"
        return _STATUS_NAMES.get(body[start + 2], "unknown")


MALFORMED = Answer(MALFORMED_REQUEST)
UNAUTHORIZED_ANSWER = Answer(UNAUTHORIZED)
TRY_LATER_ANSWER = Answer(TRY_LATER)


class Responder:
    def __init__(self, source: CachedSource, signer: SignerClient | None) -> None:
        self.source = source
        self.signer = signer

    def answer(self, der: bytes) -> Answer:
        recalled = self.source.recall(der)
        if recalled is not None:  # the same bytes were answered from the cache before
            return Answer(recalled.der, recalled, "cache")
        try:
            cert_ids, repeatable = read_request(der)
        except MalformedRequest:
            return MALFORMED
        try:
            authorities = [self.source.authority_for(cert_id) for cert_id in cert_ids]
            if None in authorities:
                return UNAUTHORIZED_ANSWER  # RFC 6960 §2.3: not a CA this responder serves
            if len(cert_ids) == 1:
                found, hit = self.source.lookup(
                    authorities[0],  # type: ignore[arg-type]
                    cert_ids[0],
                    request=der if repeatable else None,
                )
                if found is not None:
                    return Answer(found.der, found, "cache" if hit else "store")
        except SourceUnavailable:
            return TRY_LATER_ANSWER
        return self._on_demand(der)

    def _on_demand(self, der: bytes) -> Answer:
        if self.signer is None:
            return UNAUTHORIZED_ANSWER  # RFC 5019 §2.2.3: what a responder without a signer may say
        try:
            body = self.signer.sign(der)
        except SignerUnavailable:
            return TRY_LATER_ANSWER
        return Answer(body, _cache_facts(body), "signer")


def _cache_facts(body: bytes) -> Stored | None:
    """Caching headers for an on-demand response: its thisUpdate and earliest nextUpdate."""
    try:
        response = ocsp.load_der_ocsp_response(body)
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return None
        singles = list(response.responses)
        this_update = min(single.this_update_utc for single in singles)
        next_updates = [single.next_update_utc for single in singles if single.next_update_utc is not None]
    except ValueError:
        return None
    if not next_updates:
        return None
    return stored(body, this_update.astimezone(UTC), min(next_updates))
