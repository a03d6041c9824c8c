"""RFC 7030 EST endpoints under ``/.well-known/est/`` and ``/.well-known/est/<label>/``.

A label names an issuing CA (``production-issuing-1``) or an environment (``staging``); either
way charger enrollment uses the environment's newest issuing CA, so a device configured with a
CA's name follows its rotations (``ca/rotation.py``). A CPO Sub-CA 2's name
(``production-cpo-sub-ca2-1``), or ``v2g`` for the default environment's, enrolls ISO 15118 SECC
certificates instead. Requests and responses are base64-encoded DER with the content types of
RFC 7030 §4; the enrollment logic itself lives in ``ca.enrollment`` (``pipeline`` for chargers,
``secc`` for SECCs).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import ClassVar
from urllib.parse import unquote

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from flask import Blueprint, Response, current_app, request
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge, RequestTimeout

from ca.authorities.issuers import Issuer, chain, default_issuing_ca, issuer_for
from ca.authorities.rotation import environment_certificates
from ca.authorities.v2g import current_sub_ca_2
from ca.config import EstSettings
from ca.context import Pki
from ca.enrollment.auth_limits import AuthLimits
from ca.enrollment.pipeline import Credentials, EnrollmentSettings, enroll, reenroll, requested_key
from ca.enrollment.secc import enroll_secc
from ca.errors import AuthenticationError, InputError, NotFoundError, PolicyError
from ca.frontdoor import TRUSTED_UNIX
from ca.issuance.flow import abandon_stale_pending
from ca.issuance.names import ENVIRONMENTS
from ca.status.revocation import revoke_due
from ca.store.models import Authority, Certificate
from ca.work import Work
from ocsp.presign import Presigner, policy_from
from web.responses import UnsupportedMediaType

est = Blueprint("est", __name__)
PREFIXES = ("/.well-known/est", "/.well-known/est/<label>")
PKCS7_MIME = "application/pkcs7-mime; smime-type=certs-only"
V2G_LABEL = "v2g"


def _routes(operation: str, methods: list[str]):  # type: ignore[no-untyped-def]
    def register(view):  # type: ignore[no-untyped-def]
        for prefix in PREFIXES:
            est.add_url_rule(
                f"{prefix}/{operation}",
                view_func=view,
                methods=methods,
                endpoint=f"{operation}{'_label' if '<' in prefix else ''}",
            )
        return view

    return register


def _pki() -> Pki:
    return current_app.extensions["chargepki"]


def _settings() -> EstSettings:
    return current_app.extensions["chargepki.est"]


_LABEL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # CA names (ca.authorities.hierarchy) fit this
AUTHORITY_TTL = 10.0  # seconds a worker keeps a label's CA: a CA added or retired is seen within this time


def _authority(session: Session, label: str | None) -> Authority:
    """The issuing CA a label names, remembered per worker for AUTHORITY_TTL (unknown labels are not)."""
    cache: dict[str | None, tuple[float, Authority]] = current_app.extensions.setdefault("chargepki.authorities", {})
    cached = cache.get(label)
    if cached is not None and time.monotonic() - cached[0] < AUTHORITY_TTL:
        return cached[1]
    authority = _find_authority(session, label)
    # Out of the session at once, with its loaded columns: a rollback of this request (a refusal)
    # would otherwise expire the cached object, and every later request of the worker would fail
    # reading it (DetachedInstanceError, seen as 503s after a burst of refused enrollments).
    session.expunge(authority)
    cache[label] = (time.monotonic(), authority)
    return authority


def _find_authority(session: Session, label: str | None) -> Authority:
    settings = _settings()
    if label is None:
        return default_issuing_ca(session, settings.default_environment)
    if label in ENVIRONMENTS:
        return default_issuing_ca(session, label)
    if not _LABEL.match(label):  # never send a NUL or a novel to the database (PostgreSQL refuses NULs)
        raise NotFoundError(f"no EST label {label[:64]!r}")
    if label == V2G_LABEL:
        return current_sub_ca_2(session, settings.default_environment)
    authority = session.scalar(
        select(Authority).where(Authority.name == label, Authority.role.in_(("issuing", "v2g-sub-ca-2")))
    )
    if authority is not None and authority.role == "issuing":
        return default_issuing_ca(session, authority.environment)  # the lineage, across rotations
    if authority is None or authority.status != "active":
        raise NotFoundError(f"no EST label {label!r}")
    return authority


def _base64_response(der: bytes, content_type: str) -> Response:
    response = Response(base64.encodebytes(der), status=200, content_type=content_type)
    response.headers["Content-Transfer-Encoding"] = "base64"
    return response


def _certs_only(certificates: list[x509.Certificate]) -> Response:
    return _base64_response(pkcs7.serialize_certificates(certificates, serialization.Encoding.DER), PKCS7_MIME)


def _read_pkcs10() -> bytes:
    if request.mimetype != "application/pkcs10":
        raise UnsupportedMediaType(f"Content-Type must be application/pkcs10, not {request.mimetype[:64] or 'none'!r}")
    return decode_pkcs10(request.mimetype, _request_body())


def _request_body() -> bytes:
    """The body, refused with 413 from MAX_CONTENT_LENGTH bytes on, chunked or not.

    werkzeug checks Content-Length against the limit, but a chunked body it silently cuts at the
    limit and hands over the first part as if it were all (found by the limits test).
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    try:
        body = request.stream.read(limit)
    except (ClientDisconnected, TimeoutError):  # the client stopped sending (web/workers.py) or went away
        raise RequestTimeout("the request body did not arrive in time") from None
    if len(body) >= limit:
        raise RequestEntityTooLarge()
    if request.content_length is not None and len(body) < request.content_length:
        # The stream ended early (a stalled client is cut off as end of stream): never parse half a body.
        raise RequestTimeout("the request body did not arrive in time")
    return body


def decode_pkcs10(mimetype: str, body: bytes) -> bytes:
    """The request body as DER: base64 per RFC 7030 (whitespace allowed), or PEM as a courtesy."""
    if mimetype != "application/pkcs10":
        raise UnsupportedMediaType(f"Content-Type must be application/pkcs10, not {mimetype[:64] or 'none'!r}")
    if body.lstrip().startswith(b"-----BEGIN"):
        return body
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("the body is not base64-encoded DER (RFC 7030 §4.2.1)") from None


def decode_client_cert_header(value: str, header: str) -> bytes:
    """A trusted proxy's client certificate header (URL-encoded PEM) as DER."""
    try:
        certificate = x509.load_pem_x509_certificate(unquote(value).encode("utf-8", "surrogateescape"))
        return certificate.public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise InputError(f"the {header} header holds no PEM certificate") from None


def _client_certificate() -> tuple[bytes | None, bytes | None]:
    """(client certificate DER, tls-unique): from the TLS connection, or from a trusted proxy's header."""
    settings = _settings()
    if settings.client_cert_header:
        if _from_trusted_proxy(settings):
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


def _from_trusted_proxy(settings: EstSettings) -> bool:
    if not request.remote_addr:  # a Unix socket's peer: the front door (ca/frontdoor.py), if so configured
        return TRUSTED_UNIX in settings.trusted_proxies
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    for trusted in settings.trusted_proxies:
        try:
            if address in ipaddress.ip_network(trusted, strict=False):
                return True
        except ValueError:
            continue
    return False


def _credentials() -> Credentials:
    der, binding = _client_certificate()
    try:
        auth = request.authorization
    except ValueError:  # werkzeug raises on a Basic token with non-ASCII characters (found by fuzzing)
        raise AuthenticationError("malformed Authorization header") from None
    username = password = None
    if auth is not None and auth.type == "basic":
        username, password = auth.username, auth.password
    return Credentials(
        username=username,
        password=password,
        client_certificate=der,
        address=_client_address(),
        tls_unique=binding,
    )


def _client_address() -> str | None:
    """The caller's address: the peer, or behind a trusted proxy the last X-Forwarded-For entry it added.

    Rate limits and audit entries are per client address; behind a proxy every peer address is
    the proxy's own, so the address that proxy appended is the one to count (and only from it).
    """
    settings = _settings()
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and settings.trusted_proxies and _from_trusted_proxy(settings):
        candidate = forwarded.split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            pass
    return request.remote_addr


def _enrollment_settings() -> EnrollmentSettings:
    settings = _settings()
    return EnrollmentSettings(
        supersede_grace=timedelta(seconds=settings.supersede_grace_seconds),
        require_tls_unique=settings.require_tls_unique,
        limits=AuthLimits(
            max_failures_per_device=settings.auth_max_failures_per_device,
            max_failures_per_address=settings.auth_max_failures_per_address,
            window=timedelta(seconds=settings.auth_failure_window_seconds),
            lockout=timedelta(seconds=settings.auth_lockout_seconds),
        ),
    )


@_routes("cacerts", ["GET"])
def cacerts(label: str | None = None) -> Response:
    """Chargers: the newest issuing CA and its root first, then every other CA of the environment that
    still answers for certificates, and the root link certificates (RFC 7030 §4.1.3), so a client can
    build the chain of an old certificate and of a new one alike. SECCs: the CPO Sub-CA 2's chain."""
    with _pki().store.session() as session:
        authority = _authority(session, label)
        if authority.role == "issuing":
            ders = environment_certificates(session, authority.environment)
        else:
            ders = [member.certificate_der for member in chain(session, authority)]
    return _certs_only([x509.load_der_x509_certificate(der) for der in ders])


def _status() -> Presigner:
    """Pre-signs the OCSP responses of what this worker issues and revokes (one per worker)."""
    presigner = current_app.extensions.get("chargepki.status")
    if presigner is None:
        pki = _pki()
        presigner = current_app.extensions["chargepki.status"] = Presigner(pki.token(), policy_from(pki.config.ocsp))
    return presigner


def _issuer(authority: Authority) -> Issuer:
    """The CA bound to its token key, kept per worker: binding costs token lookups and a parse."""
    cache: dict[tuple[int, str], Issuer] = current_app.extensions.setdefault("chargepki.issuers", {})
    key = (authority.id, authority.key_label)
    if key not in cache:
        cache[key] = issuer_for(authority, _pki().token())
    return cache[key]


SWEEP_INTERVAL = 30.0  # seconds between a worker's sweeps (superseded certificates, stale reservations)


def _sweep(session: Session) -> None:
    """At most every SWEEP_INTERVAL per worker: revoke certificates past their re-enrollment grace
    (enrollment already treats them as revoked; the store then says so too), and mark serials
    reserved by a process that died as aborted."""
    state = current_app.extensions.setdefault("chargepki.sweep", {"last": 0.0})
    if time.monotonic() - state["last"] >= SWEEP_INTERVAL:
        state["last"] = time.monotonic()
        abandon_stale_pending(session, actor="system:est")
        revoke_due(Work(session, "system:supersede", status=_status()))


def _enroll(label: str | None, operation: Callable[..., Certificate]) -> Response:
    csr = _read_pkcs10()
    credentials = _credentials()
    pki = _pki()
    try:
        with pki.store.session() as session:
            _sweep(session)
            authority = _authority(session, label)
            if authority.role == "v2g-sub-ca-2":  # SECC certificates: enroll and renew are one flow
                operation = enroll_secc
            row = operation(
                session,
                _issuer,
                authority,
                csr,
                credentials,
                status=_status(),
                settings=_enrollment_settings(),
            )
            certificate = x509.load_der_x509_certificate(row.der)
    except PolicyError as exc:
        if exc.code == "ca_not_active":  # revoked or retired since this worker cached it: look again next time
            current_app.extensions.get("chargepki.authorities", {}).clear()
        raise
    finally:
        pki.audit_token_health("system:est")  # token lost or back: one audit entry per change
    return _certs_only([certificate])


@_routes("simpleenroll", ["POST"])
def simpleenroll(label: str | None = None) -> Response:
    return _enroll(label, enroll)


@_routes("simplereenroll", ["POST"])
def simplereenroll(label: str | None = None) -> Response:
    return _enroll(label, reenroll)


# RFC 7030 §4.5 / RFC 9908: CsrAttrs ::= SEQUENCE OF AttrOrOID, AttrOrOID ::= CHOICE { oid, attribute }.
# The key is asked for as Attribute { id-ecPublicKey, SET { curve } } (RFC 9908 §3.3, RFC 7030 §4.5.2's example).
class _AttributeValues(core.SetOf):
    _child_spec = core.ObjectIdentifier


class _Attribute(core.Sequence):
    _fields: ClassVar = [("type", core.ObjectIdentifier), ("values", _AttributeValues)]


class _AttrOrOID(core.Choice):
    _alternatives: ClassVar = [("oid", core.ObjectIdentifier), ("attribute", _Attribute)]


class _CsrAttrs(core.SequenceOf):
    _child_spec = _AttrOrOID


_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_CURVE_OIDS = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34"}
_ECDSA_OIDS = {"sha256": "1.2.840.10045.4.3.2", "sha384": "1.2.840.10045.4.3.3"}


@_routes("csrattrs", ["GET"])
def csrattrs(label: str | None = None) -> Response:
    """What a client should put in its CSR: an EC key on the label's CA curve (when its profile allows
    it), ECDSA with the matching hash, and (if required) tls-unique as challengePassword."""
    with _pki().store.session() as session:
        spec = requested_key(_authority(session, label))
    assert spec.curve_name is not None
    attributes = [
        _AttrOrOID(
            name="attribute",
            value=_Attribute({"type": _EC_PUBLIC_KEY, "values": [_CURVE_OIDS[spec.curve_name]]}),
        ),
        _AttrOrOID(name="oid", value=core.ObjectIdentifier(_ECDSA_OIDS[spec.signature_hash.name])),
    ]
    if _settings().require_tls_unique:
        attributes.insert(0, _AttrOrOID(name="oid", value=core.ObjectIdentifier("1.2.840.113549.1.9.7")))
    der = _CsrAttrs(attributes).dump()
    return _base64_response(der, "application/csrattrs")
