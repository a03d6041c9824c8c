"""RFC 7030 EST endpoints under ``/.well-known/est/`` and ``/.well-known/est/<label>/``.

A label names an issuing CA (``production-issuing-1``) or an environment (``staging``); either
way charger enrollment uses the environment's newest issuing CA, so a device configured with a
CA's name follows its rotations (``ca/rotation.py``). A CPO Sub-CA 2's name
(``production-cpo-sub-ca2-1``), or ``v2g`` for the default environment's, enrolls ISO 15118-2 SECC
certificates instead; an ISO 15118-20 CPO Sub-CA 2's name (``production-cpo20-sub-ca2-1``), or
``v2g20``, ISO 15118-20 SECC certificates. Requests and responses are base64-encoded DER with the content types of
RFC 7030 §4; the enrollment logic itself lives in ``ca.enrollment`` (``pipeline`` for chargers,
``secc`` for SECCs).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import ClassVar

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from flask import Blueprint, Response, current_app, request
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge, RequestTimeout

from ca.authorities.issuers import chain, default_issuing_ca
from ca.authorities.rotation import environment_certificates
from ca.authorities.v2g import current_sub_ca_2
from ca.enrollment.pipeline import enroll, reenroll, requested_key
from ca.enrollment.policy import Credentials
from ca.enrollment.secc import enroll_secc
from ca.errors import InputError, NotFoundError, PolicyError
from ca.issuance.names import ENVIRONMENTS
from ca.issuance.profiles import ISO15118_2, ISO15118_20, V2G_VERSIONS
from ca.kinds import CaRole, CaStatus
from ca.store.models import Authority, Certificate
from web.caller import identify
from web.responses import UnsupportedMediaType
from web.runtime import runtime

est = Blueprint("est", __name__)
PREFIXES = ("/.well-known/est", "/.well-known/est/<label>")
PKCS7_MIME = "application/pkcs7-mime; smime-type=certs-only"
V2G_LABELS = {"v2g": ISO15118_2, "v2g20": ISO15118_20}  # the default environment's CPO Sub-CA 2, per version
SUB_CA_2_ROLES = tuple(version.sub_ca_2 for version in V2G_VERSIONS.values())  # labels that enroll SECCs


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


_LABEL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # CA names (ca.authorities.hierarchy) fit this


def _authority(session: Session, label: str | None) -> Authority:
    """The issuing CA a label names, remembered per worker for a few seconds (unknown labels are not)."""
    return runtime().authority(session, label, _find_authority)


def _find_authority(session: Session, label: str | None) -> Authority:
    settings = runtime().settings
    if label is None:
        return default_issuing_ca(session, settings.default_environment)
    if label in ENVIRONMENTS:
        return default_issuing_ca(session, label)
    if not _LABEL.match(label):  # never send a NUL or a novel to the database (PostgreSQL refuses NULs)
        raise NotFoundError(f"no EST label {label[:64]!r}")
    if label in V2G_LABELS:
        return current_sub_ca_2(session, settings.default_environment, V2G_LABELS[label])
    authority = session.scalar(
        select(Authority).where(Authority.name == label, Authority.role.in_((CaRole.ISSUING, *SUB_CA_2_ROLES)))
    )
    if authority is not None and authority.role == CaRole.ISSUING:
        return default_issuing_ca(session, authority.environment)  # the lineage, across rotations
    if authority is None or authority.status != CaStatus.ACTIVE:
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


def _credentials() -> Credentials:
    caller = identify(runtime().settings)
    return Credentials(
        username=caller.username,
        password=caller.password,
        client_certificate=caller.certificate_der,
        address=caller.address,
        tls_unique=caller.tls_unique,
    )


@_routes("cacerts", ["GET"])
def cacerts(label: str | None = None) -> Response:
    """Chargers: the newest issuing CA and its root first, then every other CA of the environment that
    still answers for certificates, and the root link certificates (RFC 7030 §4.1.3), so a client can
    build the chain of an old certificate and of a new one alike. SECCs: the CPO Sub-CA 2's chain."""
    with runtime().pki.store.session() as session:
        authority = _authority(session, label)
        if authority.role == CaRole.ISSUING:
            ders = environment_certificates(session, authority.environment)
        else:
            ders = [member.certificate_der for member in chain(session, authority)]
    return _certs_only([x509.load_der_x509_certificate(der) for der in ders])


def _enroll(label: str | None, operation: Callable[..., Certificate]) -> Response:
    csr = _read_pkcs10()
    credentials = _credentials()
    worker = runtime()
    pki = worker.pki
    try:
        with pki.store.session() as session:
            worker.sweep(session)
            authority = _authority(session, label)
            if authority.role in SUB_CA_2_ROLES:  # SECC certificates: enroll and renew are one flow
                operation = enroll_secc
            row = operation(
                worker.work(session, "system:est"),
                authority=authority,
                csr=csr,
                credentials=credentials,
                settings=worker.enrollment,
            )
            certificate = x509.load_der_x509_certificate(row.der)
    except PolicyError as exc:
        if exc.code == "ca_not_active":  # revoked or retired since this worker cached it: look again next time
            worker.forget_authorities()
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
_CURVE_OIDS = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34", "secp521r1": "1.3.132.0.35"}
_ECDSA_OIDS = {"sha256": "1.2.840.10045.4.3.2", "sha384": "1.2.840.10045.4.3.3", "sha512": "1.2.840.10045.4.3.4"}


@_routes("csrattrs", ["GET"])
def csrattrs(label: str | None = None) -> Response:
    """What a client should put in its CSR: an EC key on the label's CA curve (when its profile allows
    it), ECDSA with the matching hash, and (if required) tls-unique as challengePassword."""
    with runtime().pki.store.session() as session:
        spec = requested_key(_authority(session, label))
    assert spec.curve_name is not None
    attributes = [
        _AttrOrOID(
            name="attribute",
            value=_Attribute({"type": _EC_PUBLIC_KEY, "values": [_CURVE_OIDS[spec.curve_name]]}),
        ),
        _AttrOrOID(name="oid", value=core.ObjectIdentifier(_ECDSA_OIDS[spec.signature_hash.name])),
    ]
    if runtime().settings.require_tls_unique:
        attributes.insert(0, _AttrOrOID(name="oid", value=core.ObjectIdentifier("1.2.840.113549.1.9.7")))
    der = _CsrAttrs(attributes).dump()
    return _base64_response(der, "application/csrattrs")
