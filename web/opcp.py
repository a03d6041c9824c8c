"""OPCP-compatible CPO EST: the SECC enrollment a CSMS with a Hubject Open Plug&Charge provider (MaEVe,
CitrineOS) calls, so it can use chargepki by changing only its base URL and its token (docs/opcp.md).

Under each base of ``est.opcp_bases`` (default ``""``, the host root, and ``/.well-known``):

``POST {base}/cpo/simpleenroll[/ISO15118-2|/ISO15118-20]``
    body: base64 DER PKCS#10 (``Content-Type: application/pkcs10``); answer: base64 PKCS#7 certs-only
    holding the SECC leaf alone.
``GET {base}/cpo/cacerts[/ISO15118-2|/ISO15118-20]``
    answer: base64 PKCS#7 certs-only with that version's CPO Sub-CA 2, Sub-CA 1 (when there is one) and
    V2G root, in this order: the providers build the chain from it, and CitrineOS takes the last
    certificate as the root.
``POST {base}/cpo/oauth/token``
    OAuth 2.0 client credentials for clients that fetch their bearer token first (CitrineOS):
    ``client_id`` = the CSMS's name, ``client_secret`` = its API token, which is the access token.

A path without a version is ISO 15118-2. The caller is a CSMS client of the CSMS API, authenticated by
its API token (``Authorization: Bearer`` and/or ``X-API-Key``, which must agree when both are sent) or
its client certificate, with the API's failure counts and lockouts (``csms.authenticate_limited``); its
environment selects the hierarchy. Issuance is ``ca.enrollment.secc.issue_secc``: every SECC check (the
CN must be an EVSE ID), the refusal audit (``v2g.refused``) and the worker's group commit. Every call is
audited as ``csms.opcp.<operation>`` (unauthenticated ones counted as noise); a failure is JSON
``{"error", "reason"}`` with a 4xx (503 while the token or the database is away), which both providers
put in their error message as it is.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl

from flask import Blueprint, Flask, Response, request
from sqlalchemy.orm import Session

from ca.authorities.issuers import chain
from ca.authorities.v2g import current_sub_ca_2
from ca.enrollment.secc import issue_secc
from ca.errors import AuthenticationError, ChargepkiError, ConflictError, InputError, NotFoundError
from ca.issuance.profiles import ISO15118_2, ISO15118_20
from ca.ocpp_limits import CERTIFICATE_CHAIN_CHARS
from ca.registry.csms import Caller, authenticate_limited
from ca.store.engine import begin_reads
from ca.store.models import Authority
from web.caller import client_address, client_certificate
from web.est import PKCS7_MIME, _request_body, decode_pkcs10
from web.responses import API_REALM, UnsupportedMediaType, classify, json_body, json_error
from web.runtime import runtime

opcp = Blueprint("opcp", __name__)
VERSIONS = {"ISO15118-2": ISO15118_2, "ISO15118-20": ISO15118_20}  # the path's name → issue_secc's iso
DEFAULT_VERSION = "ISO15118-2"  # a path without a version, as Hubject's
API_KEY = "X-API-Key"

View = Callable[[Session, Caller, dict[str, Any]], Response]


def register(app: Flask, bases: Iterable[str]) -> None:
    """The routes under ``{base}/cpo`` for each base (``""``: the host root)."""
    for index, base in enumerate(bases):
        app.register_blueprint(opcp, url_prefix=f"{base.rstrip('/')}/cpo", name=f"opcp{index}")


def owns(path: str) -> bool:
    """Whether ``path`` is under an OPCP base's ``/cpo/``: its errors (routing ones too) are JSON."""
    return any(path.startswith(f"{base.rstrip('/')}/cpo/") for base in runtime().settings.opcp_bases)


# -- the wire format -----------------------------------------------------------------------------------
def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element (definite length)."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # OID 1.2.840.113549.1.7.2
_VERSION_1 = bytes.fromhex("020101")
_EMPTY_SET = bytes.fromhex("3100")  # no digest algorithms, no signer infos
_NO_CONTENT = bytes.fromhex("300b06092a864886f70d010701")  # ContentInfo { id-data }, no content


def certs_only(ders: list[bytes]) -> bytes:
    """A degenerate PKCS#7 SignedData ("certs-only", RFC 5652 §5 / RFC 7030 §4.1.3) holding ``ders`` in
    this order.

    cryptography's and asn1crypto's encoders sort the certificate SET into DER order, so the root may
    come first. The order matters here: CitrineOS takes the first certificate of the enrollment answer
    as the leaf and the last one of ``cacerts`` as the V2G root. A SET OF in another order is valid BER;
    OpenSSL, Go's pkcs7 and pkijs keep the order they read."""
    certificates = _tlv(0xA0, b"".join(ders))  # [0] IMPLICIT CertificateSet
    signed_data = _tlv(0x30, _VERSION_1 + _EMPTY_SET + _NO_CONTENT + certificates + _EMPTY_SET)
    return _tlv(0x30, _SIGNED_DATA + _tlv(0xA0, signed_data))


def _pkcs7(ders: list[bytes]) -> Response:
    # One line of base64, no line breaks: what Hubject's clients decode (Go's decoder and Node's
    # Buffer.from would also skip breaks, a strict one would not).
    response = Response(base64.b64encode(certs_only(ders)), status=200, content_type=PKCS7_MIME)
    response.headers["Content-Transfer-Encoding"] = "base64"
    return response


# -- the calls -----------------------------------------------------------------------------------------
def _presented_token() -> str | None:
    """The API token of ``Authorization: Bearer`` or ``X-API-Key`` (MaEVe sends both, CitrineOS the first)."""
    try:
        authorization = request.authorization
    except ValueError:  # werkzeug on a non-ASCII Basic value
        raise AuthenticationError("malformed Authorization header") from None
    bearer = None
    if authorization is not None:
        if authorization.type != "bearer" or not authorization.token:
            raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
        bearer = authorization.token
    api_key = request.headers.get(API_KEY) or None
    if bearer is not None and api_key is not None and not hmac.compare_digest(bearer, api_key):
        raise AuthenticationError(f"Authorization and {API_KEY} carry different tokens")
    return bearer or api_key


def _call(operation: str, view: View) -> Response:
    """Authenticate the CSMS, run ``view``, turn any failure into JSON, audit the call."""
    worker = runtime()
    address = client_address(worker.settings)  # the client behind the front door, not the proxy
    caller: Caller | None = None
    outcome: dict[str, Any] = {}
    with worker.pki.store.session() as session:
        try:
            token = _presented_token()
            certificate_der, _binding = client_certificate(worker.settings)
            begin_reads(session)  # on SQLite, checking credentials takes no writer lock
            caller = authenticate_limited(
                session, token=token, certificate_der=certificate_der, address=address, limits=worker.enrollment.limits
            )
            session.commit()  # end the read
            response = view(session, caller, outcome)
        except Exception as exc:
            session.rollback()
            response = json_error(exc)
            outcome["reason"] = (response.get_json(silent=True) or {}).get("reason")
        worker.audit_call(
            session,
            caller,
            operation,
            address=address,
            subject=outcome.pop("subject", None),  # before the outcome is copied below
            outcome={"status": response.status_code, **outcome},
            interface="opcp",
        )
    return response


def _iso(version: str | None, outcome: dict[str, Any]) -> str:
    name = version or DEFAULT_VERSION
    if name not in VERSIONS:
        raise NotFoundError(
            f"unknown ISO 15118 version {name[:32]!r} in the path: {' or '.join(VERSIONS)}",
            code="unknown_iso_version",
        )
    outcome["iso"] = name
    return VERSIONS[name]


def _sub_ca_2(session: Session, caller: Caller, iso: str) -> Authority:
    """The CSMS's environment's CPO Sub-CA 2 of that version; none is a state the operator can change
    (``chargepki v2g init``), not a server failure: 409, which the providers do not retry."""
    try:
        return current_sub_ca_2(session, caller.environment, iso)
    except NotFoundError as exc:
        raise ConflictError(str(exc), code="v2g_not_configured") from None


@opcp.post("/simpleenroll", defaults={"version": None})
@opcp.post("/simpleenroll/<version>")
def simpleenroll(version: str | None) -> Response:
    def view(session: Session, caller: Caller, outcome: dict[str, Any]) -> Response:
        iso = _iso(version, outcome)
        csr = decode_pkcs10(request.mimetype, _request_body())  # 415, 413, 408, 400
        _sub_ca_2(session, caller, iso)
        worker = runtime()
        worker.sweep(session)
        row = issue_secc(
            worker.work(session, caller.actor),
            environment=caller.environment,
            csr=csr,
            settings=worker.enrollment,
            max_chain_chars=CERTIFICATE_CHAIN_CHARS,  # the CSMS sends the chain on in OCPP's CertificateSigned
            address=caller.address,
            iso=iso,
        )
        outcome.update(subject=row.common_name, serial=row.serial)
        return _pkcs7([row.der or b""])

    return _call("simpleenroll", view)


@opcp.get("/cacerts", defaults={"version": None})
@opcp.get("/cacerts/<version>")
def cacerts(version: str | None) -> Response:
    def view(session: Session, caller: Caller, outcome: dict[str, Any]) -> Response:
        sub_ca_2 = _sub_ca_2(session, caller, _iso(version, outcome))
        outcome["subject"] = sub_ca_2.name
        return _pkcs7([member.certificate_der for member in chain(session, sub_ca_2)])

    return _call("cacerts", view)


# -- OAuth 2.0 client credentials ------------------------------------------------------------------------
TOKEN_LIFETIME = 3600  # seconds a client may keep the access token before asking again (it never changes)
_OAUTH_CODES = {  # chargepki's codes in RFC 6749 §5.2's words; any other refusal is invalid_request
    "unauthenticated": "invalid_client",
    "unsupported_grant_type": "unsupported_grant_type",
    "rate_limited": "rate_limited",  # 429 with Retry-After: no OAuth word for a lockout
}


@opcp.post("/oauth/token")
def oauth_token() -> Response:
    """RFC 6749 §4.4: ``grant_type=client_credentials``, ``client_id`` = the CSMS's name and ``client_secret``
    = one of its API tokens (form body, or HTTP Basic as §2.3.1 allows). The access token is that API token
    itself: nothing is minted or stored, so revoking the API token (``csms token --replace``, ``csms
    disable --revoke``) ends it. Failed secrets count towards the address's lockout like a wrong token."""
    worker = runtime()
    address = client_address(worker.settings)
    caller: Caller | None = None
    outcome: dict[str, Any] = {}
    with worker.pki.store.session() as session:
        try:
            if request.mimetype != "application/x-www-form-urlencoded":
                raise UnsupportedMediaType("Content-Type must be application/x-www-form-urlencoded")
            form = dict(parse_qsl(_request_body().decode("utf-8", "replace")))  # 413 from the limit on
            if form.get("grant_type") != "client_credentials":
                raise InputError("grant_type must be client_credentials", code="unsupported_grant_type")
            name, secret = form.get("client_id"), form.get("client_secret")
            try:
                basic = request.authorization
            except ValueError:  # werkzeug on a non-ASCII Basic value
                raise AuthenticationError("malformed Authorization header") from None
            if basic is not None and basic.type == "basic":
                name, secret = basic.username, basic.password
            outcome["subject"] = (name or "")[:64] or None
            found = authenticate_limited(
                session, token=secret or None, certificate_der=None, address=address, limits=worker.enrollment.limits
            )
            session.commit()
            if not name or not hmac.compare_digest(found.name.encode(), name.encode()):
                raise AuthenticationError("unknown, revoked or disabled CSMS credentials")
            caller = found
            response = json_body(
                {"access_token": secret, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME},
                headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
            )
        except Exception as exc:
            session.rollback()
            response = _oauth_error(exc)
            outcome["reason"] = (response.get_json(silent=True) or {}).get("error")
        worker.audit_call(
            session,
            caller,
            "token",
            address=address,
            subject=outcome.pop("subject", None),  # before the outcome is copied below
            outcome={"status": response.status_code, **outcome},
            interface="opcp",
        )
    return response


def _oauth_error(exc: Exception) -> Response:
    """RFC 6749 §5.2's shape: ``{"error": code, "error_description": message}``."""
    status, message, code, headers = classify(exc)
    if isinstance(exc, ChargepkiError) and status < 500:
        code = _OAUTH_CODES.get(code, "invalid_request")
    if status == 401:
        headers = {**headers, "WWW-Authenticate": API_REALM}
    headers = {**headers, "Cache-Control": "no-store", "Pragma": "no-cache"}
    return json_body({"error": code, "error_description": message}, status, headers)
