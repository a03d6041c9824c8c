"""The OPCP-compatible CPO EST in-process (`create_app` + Flask's test client) on SQLite and PostgreSQL:
enrollment and CA certificates as MaEVe's and CitrineOS's Hubject providers call them, the ordered
certs-only encoding, authentication, and every refusal: a clear 4xx with a JSON reason, audited,
nothing issued."""

from __future__ import annotations

import base64
import itertools
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from flask.testing import FlaskClient
from sqlalchemy import func, select

from ca import audit
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.v2g import V2gHierarchy, V2gRequest, init_v2g
from ca.config import Config, EstSettings, Pkcs11Settings, load_config, write_config
from ca.context import Pki
from ca.errors import ConfigError
from ca.keys.pkcs11_token import Token
from ca.registry.csms import add_client, issue_token, set_enabled
from ca.store.models import AuditEvent, AuditNoise, Certificate
from ca.work import Work
from ocsp.presign import Presigner
from tests.conftest import database
from tests.helpers import make_csr, make_key, openssl, write
from web.app import create_app
from web.opcp import certs_only
from web.responses import API_REALM

ORG = "Acme Charging"
PKCS10 = "application/pkcs10"
_addresses = (f"10.9.{n // 250}.{n % 250 + 1}" for n in itertools.count())  # one per refused caller


@dataclass
class Opcp:
    pki: Pki
    client: FlaskClient
    token: str  # csms-opcp's (production, both V2G hierarchies)
    staging_token: str  # csms-staging's (an environment without V2G)
    v2g: dict[str, V2gHierarchy]  # "ISO15118-2" (with Sub-CA 1), "ISO15118-20" (without)
    tmp: Path

    def call(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        address: str = "127.0.0.1",
    ) -> Any:
        return self.client.open(
            path, method=method, headers=headers or {}, data=body, environ_base={"REMOTE_ADDR": address}
        )

    def maeve(self, path: str, body: bytes | None = None, token: str | None = None, **kwargs: Any) -> Any:
        """The request as MaEVe's provider makes it: both headers with the token, the DER CSR as one line of base64."""
        token = token or self.token
        headers = {"x-api-key": token, "authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        if body is not None:
            headers.setdefault("content-type", PKCS10)
        return self.call("POST" if body is not None else "GET", path, headers=headers, body=body, **kwargs)

    def count(self, model: type, *where: Any) -> int:
        with self.pki.store.session() as session:
            audit.flush_noise(session)
            session.commit()
            found = session.scalar(select(func.count()).select_from(model).where(*where)) or 0
            session.commit()
            return found

    def entries(self, action: str) -> list[AuditEvent]:
        with self.pki.store.session() as session:
            events = list(
                session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq))
            )
            session.commit()
            return events


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def opcp(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    token: Token,
    token_settings: tuple[Pkcs11Settings, str],
) -> Iterator[Opcp]:
    status = Presigner(token)
    tmp = tmp_path_factory.mktemp(f"opcp-{request.param}")
    with database(request.param, tmp) as url:
        home = tmp / "home"
        write_config(Config(home=home, database_url=url, pkcs11=token_settings[0]))
        pki = Pki.open(home, {}, create=True)
        with pki.store.session() as session:
            work = Work(session=session, actor="test", status=status, token=token)
            for environment in ("production", "staging"):
                init_hierarchy(work, request=HierarchyRequest(organization=ORG, country="DE", environment=environment))
            v2g = {
                "ISO15118-2": init_v2g(work, request=V2gRequest(organization=ORG, country="DE")),
                "ISO15118-20": init_v2g(
                    work, request=V2gRequest(organization=ORG, country="DE", iso="15118-20", sub_ca_1=False)
                ),
            }
            tokens = []
            for name, environment in (("csms-opcp", "production"), ("csms-staging", "staging")):
                client = add_client(Work(session, "test"), name=name, environment=environment)
                tokens.append(issue_token(Work(session, "test"), client=client))
        settings = EstSettings(default_environment="production", auth_max_failures_per_address=3)
        app = create_app(pki, settings)
        try:
            yield Opcp(pki, app.test_client(), tokens[0], tokens[1], v2g, tmp)
        finally:
            pki.close()


def _der_csr(secc_id: str, curve: str) -> bytes:
    pem = make_csr(secc_id, key=make_key(curve))
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def load_p7(der: bytes) -> list[x509.Certificate]:
    """cryptography's loader, in the certificates' order. A certificate SET not in DER's sorted order (the
    root last, for CitrineOS) is BER: cryptography warns and reads it as BER; only that warning is allowed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        certificates = pkcs7.load_der_pkcs7_certificates(der)
    assert all("InvalidSetOrdering" in str(w.message) for w in caught), [str(w.message) for w in caught]
    return certificates


def _certificates(response: Any) -> list[x509.Certificate]:
    """Decoded as MaEVe and CitrineOS decode: base64, then the PKCS#7's certificates in their order."""
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/pkcs7-mime"
    assert b"\n" not in response.get_data()  # one line, as Hubject's clients decode it
    return load_p7(base64.b64decode(response.get_data(), validate=True))


def _details(entry: AuditEvent) -> dict[str, Any]:
    return json.loads(entry.details)


def _maeve_chain(leaf: x509.Certificate, cacerts: list[x509.Certificate]) -> list[x509.Certificate]:
    """MaEVe's encodeLeafAndChain: the leaf, then the certificate whose subject is the last one's issuer,
    as long as one is found that is not self-signed (so the root stays out)."""
    chain = [leaf]
    while True:
        issuer = next((c for c in cacerts if c.subject == chain[-1].issuer and c.subject != c.issuer), None)
        if issuer is None:
            return chain
        chain.append(issuer)


def _subject_cn(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.mark.parametrize(
    ("version", "curve", "members"),
    [("ISO15118-2", "ec-p256", ("sub_ca_2", "sub_ca_1", "root")), ("ISO15118-20", "ec-p521", ("sub_ca_2", "root"))],
)
def test_maeve_enrolls_an_secc_leaf_and_builds_its_chain(opcp: Opcp, version: str, curve: str, members: tuple) -> None:
    hierarchy = opcp.v2g[version]
    secc_id = f"DE*ACM*E{len(version)}01*1"
    before = opcp.count(Certificate)
    (leaf,) = _certificates(opcp.maeve(f"/cpo/simpleenroll/{version}", base64.b64encode(_der_csr(secc_id, curve))))
    cacerts = _certificates(opcp.maeve(f"/cpo/cacerts/{version}"))
    # cacerts: Sub-CA 2, Sub-CA 1 when there is one, the root last (CitrineOS takes the last as the root).
    expected = [getattr(hierarchy, member).certificate_der for member in members]
    assert [c.public_bytes(serialization.Encoding.DER) for c in cacerts] == expected
    chain = _maeve_chain(leaf, cacerts)
    assert len(chain) == len(members)  # leaf and sub-CAs, never the root
    assert _subject_cn(leaf) == secc_id and leaf.issuer == cacerts[0].subject
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == (
        "secp521r1" if "20" in version else "secp256r1"
    )
    directory = opcp.tmp / version
    directory.mkdir(exist_ok=True)
    root = write(directory / "root.pem", cacerts[-1].public_bytes(serialization.Encoding.PEM))
    untrusted = write(directory / "sub.pem", b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:]))
    target = write(directory / "leaf.pem", leaf.public_bytes(serialization.Encoding.PEM))
    verified = openssl("verify", "-x509_strict", "-CAfile", str(root), "-untrusted", str(untrusted), str(target))
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stdout + verified.stderr
    assert opcp.count(Certificate) == before + 1
    entry = opcp.entries("csms.opcp.simpleenroll")[-1]
    assert (entry.actor, entry.subject) == ("csms:csms-opcp", secc_id)
    details = _details(entry)
    assert details["status"] == 200 and details["iso"] == version and details["auth"] == "token"


def test_citrineos_paths_and_headers(opcp: Opcp) -> None:
    """CitrineOS sends only ``Authorization: Bearer``, ``Accept: application/pkcs10`` and its CSR from the PEM
    without line breaks; its newest release calls ``{base}/.well-known/cpo/…`` without a version (ISO 15118-2)."""
    pem = make_csr("DE*ACM*E0501*1", key=make_key())
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    headers = {"Accept": PKCS10, "Authorization": f"Bearer {opcp.token}", "Content-Type": PKCS10}
    for path in ("/.well-known/cpo/simpleenroll", "/cpo/simpleenroll/ISO15118-2"):
        (leaf,) = _certificates(opcp.call("POST", path, headers=headers, body=body))
        assert leaf.issuer == x509.load_der_x509_certificate(opcp.v2g["ISO15118-2"].sub_ca_2.certificate_der).subject
        body = b"".join(line for line in make_csr("DE*ACM*E0502*1").splitlines() if not line.startswith(b"-----"))
    cacerts_headers = {
        "Accept": "application/pkcs10, application/pkcs7",
        "Authorization": f"Bearer {opcp.token}",
        "Content-Transfer-Encoding": "application/pkcs10",
    }
    for path in ("/.well-known/cpo/cacerts", "/cpo/cacerts", "/.well-known/cpo/cacerts/ISO15118-2"):
        cacerts = _certificates(opcp.call("GET", path, headers=cacerts_headers))
        # CitrineOS: the chain is everything but the last certificate, the V2G root is the last one.
        assert cacerts[-1].public_bytes(serialization.Encoding.DER) == opcp.v2g["ISO15118-2"].root.certificate_der
        assert [c.subject == c.issuer for c in cacerts[:-1]] == [False, False]


def test_the_certs_only_encoding_keeps_the_order_and_matches_der_when_sorted(opcp: Opcp) -> None:
    hierarchy = opcp.v2g["ISO15118-2"]
    ders = [hierarchy.sub_ca_2.certificate_der, hierarchy.sub_ca_1.certificate_der, hierarchy.root.certificate_der]
    for order in itertools.permutations(ders):
        encoded = certs_only(list(order))
        assert [c.public_bytes(serialization.Encoding.DER) for c in load_p7(encoded)] == list(order)
        printed = openssl(
            "pkcs7", "-inform", "DER", "-print_certs", "-noout", "-in", str(write(opcp.tmp / "p7", encoded))
        )
        subjects = [line for line in printed.stdout.splitlines() if line.startswith("subject=")]
        assert [s.split("CN = ", 1)[-1].split(",")[0] for s in subjects] == [
            _subject_cn(x509.load_der_x509_certificate(der)) for der in order
        ]
    # In DER's own order (sorted SET OF) it is byte for byte what cryptography writes.
    certificates = [x509.load_der_x509_certificate(der) for der in ders]
    reference = pkcs7.serialize_certificates(certificates, serialization.Encoding.DER)
    sorted_order = [c.public_bytes(serialization.Encoding.DER) for c in pkcs7.load_der_pkcs7_certificates(reference)]
    assert certs_only(sorted_order) == reference


def _refused(response: Any, status: int, reason: str) -> dict[str, Any]:
    body = response.get_json()
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json" and body["reason"] == reason, body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body


def test_credentials_are_checked_and_failures_are_counted_not_chained(opcp: Opcp) -> None:
    before = opcp.count(Certificate), len(opcp.entries("csms.opcp.simpleenroll"))
    body = base64.b64encode(_der_csr("DE*ACM*E0601*1", "ec-p256"))
    path = "/cpo/simpleenroll/ISO15118-2"
    cases = [
        ({}, "unauthenticated"),  # nothing presented
        ({"x-api-key": "cpk_wrong", "authorization": "Bearer cpk_wrong"}, "unauthenticated"),
        ({"x-api-key": opcp.token, "authorization": "Bearer cpk_other"}, "unauthenticated"),  # must agree
        ({"authorization": f"Basic {base64.b64encode(b'csms:x').decode()}"}, "unauthenticated"),
    ]
    for headers, reason in cases:
        response = opcp.call(
            "POST", path, headers={"content-type": PKCS10, **headers}, body=body, address=next(_addresses)
        )
        _refused(response, 401, reason)
        assert response.headers["WWW-Authenticate"] == API_REALM
    # X-API-Key alone, or Bearer alone, is enough.
    for headers in ({"X-API-Key": opcp.token}, {"Authorization": f"Bearer {opcp.token}"}):
        response = opcp.call("GET", "/cpo/cacerts/ISO15118-20", headers=headers)
        assert len(_certificates(response)) == 2
    assert opcp.count(Certificate) == before[0]
    assert len(opcp.entries("csms.opcp.simpleenroll")) == before[1]  # no entry per anonymous refusal …
    assert opcp.count(AuditNoise) == 0 and opcp.entries(audit.NOISE)  # … but counted into summaries


def test_a_disabled_csms_is_refused(opcp: Opcp) -> None:
    with opcp.pki.store.session() as session:
        client = add_client(Work(session, "test"), name="csms-gone", environment="production")
        gone = issue_token(Work(session, "test"), client=client)
        response = opcp.maeve("/cpo/cacerts/ISO15118-2", token=gone)
        assert response.status_code == 200
        set_enabled(Work(session, "test"), name="csms-gone", enabled=False)
    before = opcp.count(Certificate)
    body = base64.b64encode(_der_csr("DE*ACM*E0701*1", "ec-p256"))
    _refused(
        opcp.maeve("/cpo/simpleenroll/ISO15118-2", body, token=gone, address=next(_addresses)), 401, "unauthenticated"
    )
    _refused(opcp.maeve("/cpo/cacerts/ISO15118-2", token=gone, address=next(_addresses)), 401, "unauthenticated")
    assert opcp.count(Certificate) == before


def test_repeated_wrong_tokens_lock_the_address_out(opcp: Opcp) -> None:
    address = next(_addresses)
    for _ in range(3):
        _refused(opcp.maeve("/cpo/cacerts/ISO15118-2", token="cpk_guess", address=address), 401, "unauthenticated")
    locked = _refused(
        opcp.maeve("/cpo/cacerts/ISO15118-2", address=address), 429, "rate_limited"
    )  # the right token too
    assert "retry in" in locked["error"]
    assert opcp.maeve("/cpo/cacerts/ISO15118-2").status_code == 200  # another address is not affected


@pytest.mark.parametrize(
    ("case", "status", "reason", "pipeline"),
    [
        ("wrong content type", 415, "unsupported_media_type", False),
        ("garbage body", 400, "bad_request", False),
        ("base64 that is no CSR", 400, "bad_csr", True),
        ("P-256 key on ISO15118-20", 403, "key_not_allowed", True),
        ("P-521 key on ISO15118-2", 403, "key_not_allowed", True),
        ("CN that is not an EVSE ID", 403, "bad_secc_id", True),
        ("unknown ISO version", 404, "unknown_iso_version", False),
        ("oversized body", 413, "body_too_large", False),
    ],
)
def test_each_refusal_is_a_clear_4xx_audited_and_nothing_is_issued(
    opcp: Opcp, case: str, status: int, reason: str, pipeline: bool
) -> None:
    path, body, headers = "/cpo/simpleenroll/ISO15118-2", base64.b64encode(_der_csr("DE*ACM*E0801*1", "ec-p256")), {}
    if case == "wrong content type":
        headers = {"content-type": "application/json"}
    elif case == "garbage body":
        body = b"this is not base64 %%%"
    elif case == "base64 that is no CSR":
        body = base64.b64encode(b"\x30\x03\x02\x01\x00")
    elif case == "P-256 key on ISO15118-20":
        path = "/cpo/simpleenroll/ISO15118-20"
    elif case == "P-521 key on ISO15118-2":
        body = base64.b64encode(_der_csr("DE*ACM*E0801*1", "ec-p521"))
    elif case == "CN that is not an EVSE ID":
        body = base64.b64encode(_der_csr("CP-000123", "ec-p256"))
    elif case == "unknown ISO version":
        path = "/cpo/simpleenroll/ISO15118-21"
    elif case == "oversized body":
        body = b"A" * 40000
    certificates, refused = opcp.count(Certificate), len(opcp.entries("v2g.refused"))
    calls = len(opcp.entries("csms.opcp.simpleenroll"))
    answer = _refused(opcp.maeve(path, body, headers=headers), status, reason)
    if case == "P-256 key on ISO15118-20":
        assert "ec-p256 is not allowed for profile v2g20-secc" in answer["error"]
    assert opcp.count(Certificate) == certificates
    assert len(opcp.entries("v2g.refused")) == refused + pipeline  # the pipeline's own refusal entry
    entry = opcp.entries("csms.opcp.simpleenroll")[calls]  # and the call's, always
    assert entry.actor == "csms:csms-opcp" and _details(entry)["status"] == status
    assert _details(entry)["reason"] == reason


def test_an_environment_without_that_hierarchy_gets_409(opcp: Opcp) -> None:
    body = base64.b64encode(_der_csr("DE*ACM*E0901*1", "ec-p256"))
    for response in (
        opcp.maeve("/cpo/simpleenroll/ISO15118-2", body, token=opcp.staging_token),
        opcp.maeve("/cpo/cacerts/ISO15118-20", token=opcp.staging_token),
    ):
        answer = _refused(response, 409, "v2g_not_configured")
        assert "staging" in answer["error"]


def test_routing_errors_under_cpo_are_json(opcp: Opcp) -> None:
    response = opcp.maeve("/cpo/simpleenroll/ISO15118-2")  # GET where only POST is served
    _refused(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"] and "GET" not in response.headers["Allow"]
    _refused(opcp.maeve("/.well-known/cpo/cacerts/ISO15118-20/secp521r1"), 404, "not_found")
    _refused(opcp.maeve("/cpo/unknown", b"x"), 404, "not_found")
    # EST beside it still answers in plain text.
    est = opcp.call("GET", "/.well-known/est/nope/cacerts")
    assert est.status_code == 404 and est.mimetype == "text/plain"


def test_bases_are_configurable(tmp_path: Path, opcp: Opcp) -> None:
    app = create_app(opcp.pki, EstSettings(opcp_bases=("/pnc",)))
    client = app.test_client()
    response = client.get("/pnc/cpo/cacerts/ISO15118-2", headers={"X-API-Key": opcp.token})
    assert len(_certificates(response)) == 3
    assert client.get("/cpo/cacerts/ISO15118-2", headers={"X-API-Key": opcp.token}).status_code == 404
    assert create_app(opcp.pki, EstSettings(opcp_bases=())).test_client().get("/cpo/cacerts").status_code == 404
    home = tmp_path / "home"
    home.mkdir()
    for value, expected in (('["/"]', ("",)), ('["/pnc/", ""]', ("/pnc", "")), ("[]", ())):
        (home / "chargepki.toml").write_text(f"[est]\nopcp_bases = {value}\n")
        assert load_config(home, {}).est.opcp_bases == expected
    for value in ('["pnc"]', '["/api/v1"]', '["/a b"]', '["", "/"]'):
        (home / "chargepki.toml").write_text(f"[est]\nopcp_bases = {value}\n")
        with pytest.raises(ConfigError, match="opcp_bases"):
            load_config(home, {})


def _token_request(opcp: Opcp, form: dict[str, str] | str, address: str = "127.0.0.1", **headers: str) -> Any:
    """As CitrineOS's Hubject client fetches its token: a form body, client credentials, the audience."""
    body = form if isinstance(form, str) else "&".join(f"{k}={v}" for k, v in form.items())
    headers = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    return opcp.call("POST", "/.well-known/cpo/oauth/token", headers=headers, body=body.encode(), address=address)


def test_oauth_client_credentials_give_the_api_token_as_access_token(opcp: Opcp) -> None:
    form = {"grant_type": "client_credentials", "client_id": "csms-opcp", "client_secret": opcp.token}
    response = _token_request(opcp, {**form, "audience": "https://chargepki.example"})
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    answer = response.get_json()
    assert answer == {"access_token": opcp.token, "token_type": "Bearer", "expires_in": 3600}
    # CitrineOS then sends "Authorization: Bearer <access_token>".
    headers = {"Authorization": f"{answer['token_type']} {answer['access_token']}"}
    assert len(_certificates(opcp.call("GET", "/.well-known/cpo/cacerts", headers=headers))) == 3
    basic = base64.b64encode(f"csms-opcp:{opcp.token}".encode()).decode()
    response = _token_request(opcp, {"grant_type": "client_credentials"}, Authorization=f"Basic {basic}")
    assert response.get_json()["access_token"] == opcp.token
    entry = opcp.entries("csms.opcp.token")[-1]
    assert (entry.actor, entry.subject, _details(entry)["status"]) == ("csms:csms-opcp", "csms-opcp", 200)
    assert opcp.token not in entry.details


@pytest.mark.parametrize(
    ("case", "status", "error"),
    [
        ("wrong secret", 401, "invalid_client"),
        ("another CSMS's name", 401, "invalid_client"),
        ("no secret", 401, "invalid_client"),
        ("password grant", 400, "unsupported_grant_type"),
        ("JSON body", 415, "invalid_request"),
        ("malformed Basic", 401, "invalid_client"),
    ],
)
def test_oauth_refusals_are_rfc_6749_errors(opcp: Opcp, case: str, status: int, error: str) -> None:
    form = {"grant_type": "client_credentials", "client_id": "csms-opcp", "client_secret": opcp.token}
    headers: dict[str, str] = {}
    if case == "wrong secret":
        form["client_secret"] = "cpk_guess"
    elif case == "another CSMS's name":
        form["client_id"] = "csms-staging"
    elif case == "no secret":
        del form["client_secret"]
    elif case == "password grant":
        form["grant_type"] = "password"
    elif case == "JSON body":
        headers["Content-Type"] = "application/json"
    elif case == "malformed Basic":
        headers["Authorization"] = "Basic w6k="  # "é": werkzeug refuses non-ASCII
    response = _token_request(opcp, form, next(_addresses), **headers)
    answer = response.get_json()
    assert response.status_code == status and answer["error"] == error, answer
    assert "\n" not in answer["error_description"] and response.headers["Cache-Control"] == "no-store"
    if status == 401:
        assert response.headers["WWW-Authenticate"] == API_REALM
    assert opcp.token not in response.get_data(as_text=True)


def test_wrong_client_secrets_lock_the_address_out(opcp: Opcp) -> None:
    address = next(_addresses)
    guess = {"grant_type": "client_credentials", "client_id": "csms-opcp", "client_secret": "cpk_guess"}
    for _ in range(3):
        assert _token_request(opcp, guess, address).status_code == 401
    right = {**guess, "client_secret": opcp.token}
    locked = _token_request(opcp, right, address)
    assert locked.status_code == 429 and locked.get_json()["error"] == "rate_limited" and locked.headers["Retry-After"]
