"""Who is calling and from where: one reading of the request for EST and the CSMS API alike.

A caller presents itself by its TLS client certificate (from the socket in the direct mode, or in
the proxy-only :data:`ca.frontdoor.CLIENT_CERT_HEADER` behind the front door), by HTTP Basic
credentials (EST) or by an API token (the CSMS API). Its address is the socket's peer or, when
that peer is a trusted proxy (``est.trusted_proxies``; ``unix`` names the front door's Unix
socket), the address the proxy forwarded: nginx sets ``X-Forwarded-For`` to the client's address
itself (ca/frontdoor.py), other proxies may append to it or send ``X-Real-IP``. Headers are never
believed from anyone else, so a client cannot choose the address it is audited and rate-limited
under, nor present a certificate it does not hold.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import request

from ca.config import EstSettings
from ca.errors import AuthenticationError, InputError
from ca.frontdoor import TRUSTED_UNIX

FORWARDED_FOR = "X-Forwarded-For"
REAL_IP = "X-Real-IP"


@dataclass(frozen=True)
class Identity:
    """What the caller of this request presented, and where it called from."""

    address: str | None  # the client's, not its proxy's; None when unknown (a Unix socket without a proxy header)
    certificate_der: bytes | None  # a verified TLS client certificate
    tls_unique: bytes | None  # RFC 5929 channel binding of a direct TLS connection
    username: str | None = None  # HTTP Basic
    password: str | None = None
    token: str | None = None  # ``Authorization: Bearer`` or ``X-API-Key``


def identify(settings: EstSettings) -> Identity:
    """The caller of the current request (raises AuthenticationError on a malformed Authorization header)."""
    der, binding = client_certificate(settings)
    try:
        authorization = request.authorization
    except ValueError:  # werkzeug raises on a Basic token with non-ASCII characters (found by fuzzing)
        raise AuthenticationError("malformed Authorization header") from None
    username = password = token = None
    if authorization is not None and authorization.type == "basic":
        username, password = authorization.username, authorization.password
    if authorization is not None and authorization.type == "bearer" and authorization.token:
        token = authorization.token
    else:
        token = request.headers.get("X-API-Key") or None  # MaEVe-style clients send both
    return Identity(
        address=client_address(settings),
        certificate_der=der,
        tls_unique=binding,
        username=username,
        password=password,
        token=token,
    )


def from_trusted_proxy(settings: EstSettings) -> bool:
    """Whether the socket's peer is a proxy whose headers are believed."""
    if not request.remote_addr:  # a Unix socket's peer: the front door (ca/frontdoor.py), if so configured
        return TRUSTED_UNIX in settings.trusted_proxies
    try:
        address = ipaddress.ip_address(request.remote_addr)
    except ValueError:
        return False
    for trusted in settings.trusted_proxies:
        try:
            if address in ipaddress.ip_network(trusted, strict=False):
                return True
        except ValueError:
            continue
    return False


def client_address(settings: EstSettings) -> str | None:
    """The caller's address: the peer, or behind a trusted proxy the address that proxy forwarded.

    Rate limits and audit entries are per client address; behind a proxy every peer address is
    the proxy's own, so the address the proxy added (the last ``X-Forwarded-For`` entry, else
    ``X-Real-IP``) is the one to count, and only from it.
    """
    if settings.trusted_proxies and from_trusted_proxy(settings):
        forwarded = request.headers.get(FORWARDED_FOR)
        candidates = [forwarded.split(",")[-1]] if forwarded else []
        candidates.append(request.headers.get(REAL_IP) or "")
        for candidate in candidates:
            try:
                return str(ipaddress.ip_address(candidate.strip()))
            except ValueError:
                continue
    return request.remote_addr or None


def client_certificate(settings: EstSettings) -> tuple[bytes | None, bytes | None]:
    """(client certificate DER, tls-unique): from the TLS connection, or from a trusted proxy's header."""
    if settings.client_cert_header:
        if from_trusted_proxy(settings):
            value = request.headers.get(settings.client_cert_header)
            if not value:
                return None, None
            return decode_client_cert_header(value, settings.client_cert_header), None
        return None, None  # never trust the header from anyone else
    sock = request.environ.get("gunicorn.socket")
    if sock is None or not hasattr(sock, "getpeercert"):
        return None, None
    der = sock.getpeercert(binary_form=True)
    try:
        binding = sock.get_channel_binding("tls-unique")
    except (ValueError, OSError):
        binding = None
    return der or None, binding


def decode_client_cert_header(value: str, header: str) -> bytes:
    """A trusted proxy's client certificate header (URL-encoded PEM) as DER."""
    try:
        certificate = x509.load_pem_x509_certificate(unquote(value).encode("utf-8", "surrogateescape"))
        return certificate.public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise InputError(f"the {header} header holds no PEM certificate") from None
