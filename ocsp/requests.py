"""Reading OCSP requests (RFC 6960 §4.1) from a POST body or a GET path (RFC 5019 §5).

The common case, one CertID, is parsed by ``cryptography`` (Rust, a few µs). It refuses
requests naming several certificates, so those, and only those, go through asn1crypto.

A request without extensions (no nonce: RFC 5019 clients, TLS stacks fetching a staple) is the
same bytes every time it is sent for the same certificate, so the responder may remember its
answer by those bytes (``ocsp.source.CachedSource.recall``); a nonce makes every request unique,
and remembering those would only push the others out. Nor is a request longer than
``REMEMBERED_REQUEST_BYTES`` remembered: one CertID is at most ~190 bytes (SHA-512), and a client
padding its requests (a long requestorName) must not fill a worker's memory with them.
"""

from __future__ import annotations

import base64
import binascii
from typing import NamedTuple
from urllib.parse import unquote

from asn1crypto import ocsp as asn1_ocsp
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509 import ocsp

from ocsp.certid import HASH_ALGORITHMS, CertId

MAX_REQUEST_BYTES = 16 * 1024  # a CertID is ~100 bytes; this is hundreds of them
MAX_CERT_IDS = 64
REMEMBERED_REQUEST_BYTES = 512


class MalformedRequest(ValueError):
    """Not an OCSP request we can read: answered with ``malformedRequest``, never an exception."""


class Request(NamedTuple):
    cert_ids: list[CertId]
    repeatable: bool  # one CertID, no extensions, short: worth remembering by its bytes


def parse_request(der: bytes) -> list[CertId]:
    """The CertIDs of a DER OCSPRequest, in order; extensions (nonces) are ignored by design."""
    return read_request(der).cert_ids


def read_request(der: bytes) -> Request:
    """The CertIDs of a DER OCSPRequest, and whether its bytes identify it (see the module's doc)."""
    if not der:
        raise MalformedRequest("empty request")
    if len(der) > MAX_REQUEST_BYTES:
        raise MalformedRequest("request too large")
    try:
        request = ocsp.load_der_ocsp_request(der)
    except (ValueError, NotImplementedError):  # NotImplementedError: several CertIDs
        return Request(_parse_several(der), False)
    try:
        algorithm = request.hash_algorithm.name
    except UnsupportedAlgorithm:
        raise MalformedRequest("unsupported CertID hash algorithm") from None
    cert_id = _cert_id(algorithm, request.issuer_name_hash, request.issuer_key_hash, request.serial_number)
    try:
        repeatable = len(der) <= REMEMBERED_REQUEST_BYTES and len(request.extensions) == 0
    except (ValueError, x509.DuplicateExtension):  # extensions cryptography refuses: answered, never remembered
        repeatable = False
    return Request([cert_id], repeatable)


def _parse_several(der: bytes) -> list[CertId]:
    try:
        parsed = asn1_ocsp.OCSPRequest.load(der, strict=True)
        requests = parsed["tbs_request"]["request_list"]
        cert_ids = [
            (
                request["req_cert"]["hash_algorithm"]["algorithm"].native,
                request["req_cert"]["issuer_name_hash"].native,
                request["req_cert"]["issuer_key_hash"].native,
                request["req_cert"]["serial_number"].native,
            )
            for request in requests
        ]
    except Exception:
        raise MalformedRequest("not a DER OCSPRequest") from None
    if not cert_ids:
        raise MalformedRequest("the request names no certificate")
    if len(cert_ids) > MAX_CERT_IDS:
        raise MalformedRequest(f"more than {MAX_CERT_IDS} certificates in one request")
    return [_cert_id(*fields) for fields in cert_ids]


def _cert_id(algorithm: object, name_hash: object, key_hash: object, serial: object) -> CertId:
    if algorithm not in HASH_ALGORITHMS:
        raise MalformedRequest(f"unsupported CertID hash algorithm {algorithm}")
    if not isinstance(name_hash, bytes) or not isinstance(key_hash, bytes) or not isinstance(serial, int):
        raise MalformedRequest("malformed CertID")
    if serial <= 0 or serial.bit_length() > 160:
        # RFC 5280 serials are positive and at most 20 octets; anything else was never issued.
        raise MalformedRequest("serial number out of range")
    return CertId(str(algorithm), name_hash, key_hash, serial)


def decode_get_path(encoded: str) -> bytes:
    """The DER of a GET request: base64 (standard or URL-safe), percent-encoded or not, padding optional."""
    text = unquote(encoded).strip().replace("-", "+").replace("_", "/").replace(" ", "+")
    if not text or len(text) > MAX_REQUEST_BYTES * 2:
        raise MalformedRequest("no request in the URL")
    text = text.rstrip("=")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("the URL is not base64") from None
