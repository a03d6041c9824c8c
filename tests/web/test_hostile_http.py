"""Hostile requests through the real application stacks, in process (hypothesis): EST, OPCP and OCSP.

EST: the Flask app of ``serve est`` (its test client) in front of a real installation
(SoftHSM2 token, CA hierarchy, a registered device with a one-time secret), on SQLite and
PostgreSQL; the OPCP CPO EST in the same app, with and without a CSMS token. OCSP: the WSGI app
of ``serve ocsp`` (called under wsgiref's validator) with its on-demand signer in a thread.
Properties: never a 5xx, never a traceback, every error one line (text for EST, JSON for OPCP),
no hang; a refused request leaves the database as it was (refusal audit entries apart) and never
spends the secret.
"""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy import select

from ca.config import EstSettings
from ca.registry.devices import get_device, reset_device
from ca.registry.secrets import issue_secret
from ca.store.models import Certificate
from ca.work import Work
from tests.hostile import (
    DEVICE,
    Drawn,
    OcspWorld,
    World,
    basic,
    bounded,
    build_ocsp,
    call_wsgi,
    check_est_answer,
    check_ocsp_answer,
    est_body,
    generated_csr,
    mutate_bytes,
    ocsp_environ,
    one_line_error,
    resigned_csr,
    snapshot,
    unchanged,
)

# The fuzz world allows plenty of failures so that lockouts do not hide the paths behind them
# (rate limiting has its own tests).
FUZZ_EST = EstSettings(auth_max_failures_per_device=10**6, auth_max_failures_per_address=10**6)
WORLD_EST = FUZZ_EST  # the conftest `world` fixture builds with these


@pytest.fixture(scope="module")
def client(world: World):  # type: ignore[no-untyped-def]
    from web.app import create_app

    return create_app(world.pki, FUZZ_EST).test_client()


# -- EST ---------------------------------------------------------------------------------------------------------
PATHS = ("simpleenroll", "simplereenroll", "cacerts", "csrattrs", "serverkeygen", "fullcmc", "")
LABELS = ("", "production/", "staging/", "production-issuing-1/", "nope/", "%00/", "../")
CONTENT_TYPES = ("application/pkcs10", "application/pkcs10; charset=x", "text/plain", "", "application/pkcs10\x00")


# What an HTTP header can carry at all: no CR, LF or NUL (clients and servers refuse those).
HEADER_TEXT = st.text(st.characters(codec="latin-1", exclude_characters="\r\n\x00"), max_size=80)


@st.composite
def authorizations(draw: st.DrawFn) -> str | None:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return None
    text = st.text(max_size=80)
    if kind == 1:
        return basic(draw(text), draw(text))
    if kind == 2:
        return basic(DEVICE, draw(text))  # the right device, a wrong secret
    if kind == 3:
        return "Basic " + draw(HEADER_TEXT)
    if kind == 4:
        return "Basic " + base64.b64encode(draw(st.binary(max_size=80))).decode()
    return draw(st.sampled_from(["Bearer x", "Digest username=x", "Basic", "basic Og==", ""]))


@given(
    st.data(),
    st.sampled_from(["POST", "POST", "GET", "PUT", "HEAD", "DELETE"]),
    st.sampled_from(PATHS),
    st.sampled_from(LABELS),
    st.sampled_from(CONTENT_TYPES),
    authorizations(),
)
def test_est_never_fails_on_hostile_requests_and_refusals_change_nothing(
    world: World, client, data, method: str, path: str, label: str, content_type: str, authorization: str | None
) -> None:
    body = est_body(world.seeds, Drawn(data))
    headers = {"Content-Type": content_type}
    if authorization is not None:
        headers["Authorization"] = authorization
    before = snapshot(world.pki.store)
    with bounded(10):
        response = client.open(f"/.well-known/est/{label}{path}", method=method, data=body, headers=headers)
    what = f"{method} {label}{path}"
    check_est_answer(response, what)
    unchanged(world.pki.store, before, what)  # no valid credentials: nothing may be issued or spent


def _enroll_with_the_secret(world: World, client, csr_der: bytes, what: str) -> None:  # type: ignore[no-untyped-def]
    """Damaged or odd CSRs with the right secret: a certificate that is recorded, or nothing at all."""
    before = snapshot(world.pki.store)
    with bounded(10):
        response = client.post(
            "/.well-known/est/simpleenroll",
            data=base64.encodebytes(csr_der),
            headers={"Content-Type": "application/pkcs10", "Authorization": basic(DEVICE, world.secret)},
        )
    check_est_answer(response, what)
    if response.status_code != 200:
        unchanged(world.pki.store, before, what)
        return
    (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.data))
    with world.pki.store.session() as session:
        stored = session.scalar(select(Certificate).where(Certificate.serial == format(certificate.serial_number, "X")))
        assert stored is not None and stored.status == "valid"
        assert stored.der == certificate.public_bytes(serialization.Encoding.DER)
        # Start over for the next example: re-open first enrollment with a new secret.
        reset_device(Work(session, "fuzz"), serial=DEVICE)
        world.secret = issue_secret(Work(session, "fuzz"), device=get_device(session, DEVICE))


@given(st.data())
def test_damaged_csrs_with_the_right_secret_are_issued_and_recorded_or_change_nothing(world: World, client, data):
    source = Drawn(data)
    csr = resigned_csr(world.seeds, source) if data.draw(st.booleans()) else mutate_bytes(world.seeds.csr_der, source)
    _enroll_with_the_secret(world, client, csr, "damaged CSR")


@given(st.data())
def test_odd_but_well_signed_csrs_with_the_right_secret_are_issued_and_recorded_or_change_nothing(
    world: World, client, data
):
    try:
        csr = generated_csr(Drawn(data))
    except ValueError:  # cryptography's builder refused to build it: nothing to send
        return
    _enroll_with_the_secret(world, client, csr, "generated CSR")


# -- OCSP --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def responder(world: World, tmp_path_factory: pytest.TempPathFactory) -> OcspWorld:
    return build_ocsp(world, tmp_path_factory.mktemp("sock") / "signer.sock")


def _ocsp_request(responder: OcspWorld, data: st.DataObject) -> bytes:
    kind = data.draw(st.integers(0, 2))
    if kind == 0:
        return data.draw(st.binary(max_size=1024))
    seed = data.draw(st.sampled_from(responder.requests))
    return seed if kind == 1 and data.draw(st.booleans()) else mutate_bytes(seed, Drawn(data))


def _check_ocsp(responder: OcspWorld, environ: dict, what: str) -> None:
    before = snapshot(responder.store)
    with bounded(10):
        status, headers, body = call_wsgi(responder.app, environ)
    outcome = check_ocsp_answer(status, headers, body, what)
    if outcome not in ("SUCCESSFUL", "HEAD"):  # what was signed for an issued certificate may be stored
        unchanged(responder.store, before, what)


@given(
    st.data(),
    st.sampled_from(
        ["application/ocsp-request", "application/ocsp-request; x=y", "text/plain", "", "APPLICATION/OCSP-REQUEST"]
    ),
    st.one_of(st.none(), st.sampled_from(["", "-1", "0", "abc", "99999999999999999999", "16385", " 5", "1e3"])),
)
def test_ocsp_posts_never_fail_and_refusals_change_nothing(responder: OcspWorld, data, content_type, length) -> None:
    body = _ocsp_request(responder, data)
    path = data.draw(st.sampled_from(["/ocsp", "/ocsp/", "/ocsp/x", "/pki/x.crl", "/", "/healthz"]))
    _check_ocsp(responder, ocsp_environ("POST", path, body, content_type, length), f"POST {path}")


@given(st.data(), st.sampled_from(["GET", "HEAD", "PUT", "OPTIONS"]))
@example(data=None, method="GET")
def test_ocsp_gets_never_fail_and_refusals_change_nothing(responder: OcspWorld, data, method: str) -> None:
    if data is None:  # the explicit example: a huge path
        _check_ocsp(responder, ocsp_environ("GET", "/ocsp/" + "A" * 100_000), "GET huge")
        return
    der = _ocsp_request(responder, data)
    encoded = data.draw(st.sampled_from([base64.b64encode, base64.urlsafe_b64encode]))(der).decode()
    form = data.draw(st.integers(0, 4))
    if form == 1:
        encoded = quote(encoded, safe="")
    elif form == 2:
        encoded = encoded.rstrip("=")
    elif form == 3:
        encoded = mutate_bytes(encoded.encode(), Drawn(data)).decode("latin-1")
    elif form == 4:
        encoded = data.draw(st.binary(max_size=600)).decode("latin-1")  # what a server hands over: latin-1
    prefix = data.draw(st.sampled_from(["/ocsp/", "/ocsp//", "/pki/", "/ocsp"]))
    _check_ocsp(responder, ocsp_environ(method, prefix + encoded), f"{method} {prefix}…")


def test_the_fuzz_world_really_enrolls(world: World, client) -> None:
    """The harness itself: the undamaged seed CSR with the secret gets a recorded certificate."""
    _enroll_with_the_secret(world, client, world.seeds.csr_der, "seed CSR")
    with world.pki.store.session() as session:
        assert session.scalar(select(Certificate).where(Certificate.common_name == DEVICE)) is not None
        session.commit()


# -- the OPCP CPO EST (web/opcp.py) ------------------------------------------------------------------------
OPCP_PATHS = (
    "/cpo/simpleenroll",
    "/cpo/simpleenroll/ISO15118-2",
    "/.well-known/cpo/simpleenroll/ISO15118-20",
    "/cpo/simpleenroll/ISO15118-3",
    "/cpo/cacerts/ISO15118-20",
    "/.well-known/cpo/oauth/token",
    "/cpo/x/y",
)
OPCP_TYPES = (*CONTENT_TYPES, "application/x-www-form-urlencoded")


@pytest.fixture(scope="module")
def csms_token(world: World) -> str:
    from ca.registry.csms import add_client, issue_token

    with world.pki.store.session() as session:
        client = add_client(Work(session, "fuzz"), name="csms-fuzz", environment="production")
        return issue_token(Work(session, "fuzz"), client=client)


@given(
    st.data(),
    st.sampled_from(["POST", "POST", "GET", "PUT", "HEAD"]),
    st.sampled_from(OPCP_PATHS),
    st.sampled_from(OPCP_TYPES),
    st.sampled_from(["none", "right", "wrong", "disagreeing", "drawn"]),
)
def test_opcp_never_fails_on_hostile_requests_and_issues_nothing(
    world: World, client, csms_token: str, data, method: str, path: str, content_type: str, credentials: str
) -> None:
    """The world has no V2G hierarchy: whatever arrives, nothing is issued; never a 5xx; every error a
    one-line JSON body (``error`` + ``reason``, or OAuth's ``error`` + ``error_description``)."""
    body = est_body(world.seeds, Drawn(data))
    if path.endswith("/token") and data.draw(st.booleans()):
        body = f"grant_type=client_credentials&client_id=csms-fuzz&client_secret={csms_token}".encode() + body
    headers = {"Content-Type": content_type}
    if credentials == "right":
        headers |= {"X-API-Key": csms_token, "Authorization": f"Bearer {csms_token}"}
    elif credentials == "wrong":
        headers["Authorization"] = "Bearer cpk_wrong"
    elif credentials == "disagreeing":
        headers |= {"X-API-Key": csms_token, "Authorization": "Bearer cpk_other"}
    elif credentials == "drawn":
        headers |= {"X-API-Key": data.draw(HEADER_TEXT), "Authorization": data.draw(HEADER_TEXT)}
    before = snapshot(world.pki.store)
    before.pop("audit_other")  # an authenticated call is audited, refused or not
    with bounded(10):
        response = client.open(path, method=method, data=body, headers=headers)
    what = f"{method} {path} ({credentials}, {content_type!r})"
    assert response.status_code < 500, (what, response.get_data(as_text=True)[:200])
    if response.status_code >= 400 and method != "HEAD":
        answer = response.get_json(silent=True)
        assert response.mimetype == "application/json" and isinstance(answer, dict), (what, response.get_data()[:200])
        one_line_error(answer.get("error_description") or answer["error"], what)
    after = snapshot(world.pki.store)
    after.pop("audit_other")
    assert after == before, what
