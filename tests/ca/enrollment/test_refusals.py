"""One enrollment pipeline: every enrollment route × every refusal, in-process (Flask test client).

Each route (EST with a one-time secret, EST through an RA, EST re-enrollment, EST under the V2G
label, the CSMS API for charger and for SECC certificates, the CSMS API's relayed signing
through an asynchronous job, and the OPCP CPO EST's simpleenroll) is walked through every refusal
(bad authentication, a bad CSR, wrong CN, wrong O, a key the profile refuses, an unregistered,
disabled or locked-out device, a revoked credential, a key certified for someone else); each step
checks the HTTP status, the machine-readable code (the JSON ``reason``, and the ``code`` of the
refusal's audit entry), the audit entries and the failure count. A refusal a route cannot produce
is named with the reason, so adding a refusal forces a decision for every route. SQLite and
PostgreSQL.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.issuers import default_issuing_ca, issuer_for
from ca.authorities.v2g import V2gRequest, init_v2g
from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.context import Pki
from ca.enrollment.secc import issue_secc
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.issuance.serials import format_serial
from ca.keys.pkcs11_token import Token
from ca.registry.csms import add_client, issue_token
from ca.registry.devices import add_device, disable_device
from ca.registry.secrets import issue_secret, withdraw_secrets
from ca.status.revocation import revoke
from ca.store.models import AuditEvent, AuditNoise, AuthFailure
from ca.work import Work
from ocsp.presign import Presigner
from tests.api_helpers import CheckedClient
from tests.helpers import make_csr, make_key
from web.api import JobRunner
from web.app import create_app

ORG = "Acme Charging"
SECC_ID = "DE*ACM*E0001*1"
HEADER = "X-SSL-Client-Cert"
REFUSALS = (
    "unauthenticated",
    "bad_csr",
    "cn_mismatch",
    "wrong_organization",
    "key_not_allowed",
    "device_not_registered",
    "device_disabled",
    "revoked_credential",
    "key_reuse",
    "rate_limited",  # last: it locks the route's caller out
)
EVIL_O = "Evil Corp"
BAD_CSR = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


@dataclass
class Installation:
    pki: Pki
    client: Any  # the Flask test client (EST)
    api: CheckedClient  # with the CSMS's token
    secret: str  # CP-1's one-time secret
    ra: bytes  # an RA certificate (DER)
    charger: bytes  # CP-CUR's current charger certificate
    secc: bytes  # CP-CUR's SECC certificate (SECC_ID)
    stranger: bytes  # a certificate this installation never issued
    taken_key: Any  # a key certified for CP-TAKEN
    off_secret: str  # CP-OFF's one-time secret (CP-OFF is disabled)
    off_charger: bytes  # CP-OFF's charger certificate, issued before it was disabled
    revoked_ra: bytes  # an RA certificate revoked since
    revoked_charger: bytes  # CP-REV's charger certificate, revoked
    withdrawn: str  # CP-WD's one-time secret, withdrawn
    audit_before: dict[str, int] = field(default_factory=dict)
    api_token: str = ""  # csms-1's

    def opcp(self, csr: bytes, token: str | None = None) -> Any:
        """OPCP's simpleenroll as MaEVe sends it: both token headers, the DER CSR in base64."""
        token = token or self.api_token
        headers = {"Content-Type": "application/pkcs10", "X-API-Key": token, "Authorization": f"Bearer {token}"}
        body = base64.b64encode(csr if csr == BAD_CSR else _der(csr))
        return self.client.post("/cpo/simpleenroll/ISO15118-2", data=body, headers=headers)

    def est(self, operation: str, csr: bytes, *, label: str = "", cert: bytes | None = None, basic: str = "") -> Any:
        headers = {"Content-Type": "application/pkcs10"}
        if cert is not None:
            pem = x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.PEM)
            headers[HEADER] = quote(pem.decode())
        if basic:
            headers["Authorization"] = "Basic " + base64.b64encode(basic.encode()).decode()
        body = base64.encodebytes(csr if csr == BAD_CSR else _der(csr))
        prefix = f"/.well-known/est/{label}/" if label else "/.well-known/est/"
        return self.client.post(prefix + operation, data=body, headers=headers)

    def sign(
        self, station: str, csr: bytes, certificate_type: str, token: str | None = None, asynchronous: bool = False
    ) -> Any:
        """The CSMS API's SignCertificate; ``asynchronous``: queued, signed by the job runner, then polled."""
        body = {"chargingStationId": station, "csr": csr.decode(), "certificateType": certificate_type}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if not asynchronous:
            return self.api.post("/api/v1/sign", json=body, headers=headers)
        accepted = self.api.post("/api/v1/sign?async=1", json=body, headers=headers)
        if accepted.status_code != 202:
            return accepted  # refused at once (credentials, an unreadable CSR)
        assert JobRunner(self.client.application).run_once() == "refused"
        return self.api.get(accepted.headers["Location"])

    def audit(self) -> list[AuditEvent]:
        with self.pki.store.session() as session:
            events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
            session.commit()
        return events

    def noise(self) -> int:
        """Refusals counted for the anonymous summary and not yet flushed into the chain."""
        with self.pki.store.session() as session:
            total = session.scalar(select(func.coalesce(func.sum(AuditNoise.count), 0)))
            session.commit()
        return int(total or 0)

    def failures(self) -> int:
        """Failed authentications counted against callers' own keys (user names, certificates)."""
        with self.pki.store.session() as session:
            total = session.scalar(
                select(func.coalesce(func.sum(AuthFailure.failures), 0)).where(
                    AuthFailure.kind.not_in(("address", "token"))  # a wrong API token counts against its address
                )
            )
            session.commit()
        return int(total or 0)


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def _self_signed() -> bytes:
    key = make_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CP-CUR")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def installation(
    tmp_path: Path, migrated_db_url: str, token: Token, status: Presigner, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Installation]:
    home = tmp_path / "home"
    settings = EstSettings(
        client_cert_header=HEADER,
        trusted_proxies=("127.0.0.1",),
        auth_max_failures_per_device=3,
        auth_max_failures_per_address=50,
    )
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0], est=settings))
    pki = Pki.open(home, {}, create=True)
    taken_key = make_key()
    with pki.store.session() as session:
        init_hierarchy(
            Work(session=session, actor="test", status=status, token=token),
            request=HierarchyRequest(organization=ORG, country="DE"),
        )
        init_v2g(
            Work(session=session, actor="test", status=status, token=token),
            request=V2gRequest(organization=ORG, country="DE"),
        )
        issuer = issuer_for(default_issuing_ca(session, "production"), token)

        def issued(profile: str, name: str, key: Any = None, device_id: int | None = None) -> bytes:
            request = IssueRequest(get_profile(profile), (key or make_key()).public_key(), name, device_id=device_id)
            return issue(Work(session, "test", status=status), issuer=issuer, request=request).der or b""

        secret = issue_secret(Work(session, "test"), device=add_device(Work(session, "test"), serial="CP-1"))
        ra = issued("ra", "Station-1")
        charger = issued("charger", "CP-CUR", device_id=add_device(Work(session, "test"), serial="CP-CUR").id)
        issued("charger", "CP-TAKEN", taken_key, add_device(Work(session, "test"), serial="CP-TAKEN").id)
        admin = Work(session, "test", status=status)
        off = add_device(admin, serial="CP-OFF")
        off_secret = issue_secret(admin, device=off)
        off_charger = issued("charger", "CP-OFF", device_id=off.id)
        disable_device(admin, serial="CP-OFF")
        revoked_ra = issued("ra", "Station-OLD")
        revoked_charger = issued("charger", "CP-REV", device_id=add_device(admin, serial="CP-REV").id)
        for der in (revoked_ra, revoked_charger):
            serial = format_serial(x509.load_der_x509_certificate(der).serial_number)
            revoke(admin, serial=serial, reason="keyCompromise")
        withdrawn_device = add_device(admin, serial="CP-WD")
        withdrawn = issue_secret(admin, device=withdrawn_device)
        withdraw_secrets(admin, entries=[(withdrawn_device, None)], reason="leaked")
        secc = issue_secc(
            Work(session, "test", status=status, issuers=lambda authority: issuer_for(authority, token)),
            environment="production",
            csr=make_csr(SECC_ID),
            secc_id=SECC_ID,
            device_serial="CP-CUR",
        ).der
        api_token = issue_token(
            Work(session, "test"), client=add_client(Work(session, "test"), name="csms-1", environment="production")
        )
    client = create_app(pki, settings).test_client()
    yield Installation(
        pki,
        client,
        CheckedClient(client, {"Authorization": f"Bearer {api_token}"}),
        secret,
        ra,
        charger,
        secc or b"",
        _self_signed(),
        taken_key,
        off_secret,
        off_charger,
        revoked_ra,
        revoked_charger,
        withdrawn,
        api_token=api_token,
    )
    pki.close()


@dataclass(frozen=True)
class Step:
    send: Callable[[Installation], Any]
    status: int
    code: str
    audit: tuple[str, ...]  # the audit entries the step adds, in order
    counted: int = 0  # failed authentications it adds to the caller's own key
    noise: int = 0  # refusals it adds to the anonymous summary (no identity established)


Route = dict[str, Step | str]  # refusal → the step, or why this route cannot produce it


def _est_routes() -> dict[str, Route]:
    def wrong_then(
        send_wrong: Callable[[Installation], Any], send_right: Callable[[Installation], Any]
    ) -> Callable[[Installation], Any]:
        """Two more failures (three with the first step's): the key is locked out; then the right credentials."""

        def send(installation: Installation) -> Any:
            for _ in range(2):
                assert send_wrong(installation).status_code == 401
            return send_right(installation)

        return send

    secret_wrong = lambda w: w.est("simpleenroll", make_csr("CP-1"), basic="CP-1:wrong")  # noqa: E731
    stranger_ra = lambda w: w.est("simpleenroll", make_csr("CP-1"), cert=w.stranger)  # noqa: E731
    stranger_renew = lambda w: w.est("simplereenroll", make_csr("CP-CUR"), cert=w.stranger)  # noqa: E731
    stranger_secc = lambda w: w.est("simpleenroll", make_csr("DE*ACM*E0002*1"), label="v2g", cert=w.stranger)  # noqa: E731
    a = "enrollment.refused"
    r = "reenrollment.refused"
    v = "v2g.refused"
    return {
        "est-secret": {
            "unauthenticated": Step(secret_wrong, 401, "unauthenticated", (a,), 1),
            "bad_csr": Step(
                lambda w: w.est("simpleenroll", BAD_CSR, basic=f"CP-1:{w.secret}"), 400, "bad_csr", (), noise=1
            ),
            "cn_mismatch": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-OTHER"), basic=f"CP-1:{w.secret}"),
                403,
                "cn_mismatch",
                (a,),
            ),
            "wrong_organization": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-1", EVIL_O), basic=f"CP-1:{w.secret}"),
                403,
                "wrong_organization",
                (a,),
            ),
            "key_not_allowed": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-1", key=make_key("rsa-1024")), basic=f"CP-1:{w.secret}"),
                403,
                "key_not_allowed",
                (a,),
            ),
            "device_not_registered": "an unknown serial is a failed authentication (nothing leaks)",
            "device_disabled": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-OFF"), basic=f"CP-OFF:{w.off_secret}"),
                403,
                "device_disabled",
                (a,),
            ),
            "revoked_credential": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-WD"), basic=f"CP-WD:{w.withdrawn}"),
                401,
                "unauthenticated",
                (a,),
                1,
            ),
            "key_reuse": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-1", key=w.taken_key), basic=f"CP-1:{w.secret}"),
                409,
                "key_reuse",
                (a,),
            ),
            "rate_limited": Step(
                wrong_then(secret_wrong, lambda w: w.est("simpleenroll", make_csr("CP-1"), basic=f"CP-1:{w.secret}")),
                429,
                "rate_limited",
                (a, "auth.locked_out", a),
                2,
            ),
        },
        "est-ra": {
            "unauthenticated": Step(stranger_ra, 401, "unauthenticated", (a,), 1),
            "bad_csr": Step(lambda w: w.est("simpleenroll", BAD_CSR, cert=w.ra), 400, "bad_csr", (), noise=1),
            "cn_mismatch": "an RA enrolls any registered device: the CSR's CN names it",
            "wrong_organization": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-1", EVIL_O), cert=w.ra), 403, "wrong_organization", (a,)
            ),
            "key_not_allowed": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-1", key=make_key("rsa-1024")), cert=w.ra),
                403,
                "key_not_allowed",
                (a,),
            ),
            "device_not_registered": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-NOPE"), cert=w.ra), 403, "device_not_registered", (a,)
            ),
            "device_disabled": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-OFF"), cert=w.ra), 403, "device_disabled", (a,)
            ),
            "revoked_credential": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-1"), cert=w.revoked_ra), 401, "unauthenticated", (a,), 1
            ),
            "key_reuse": Step(
                lambda w: w.est("simpleenroll", make_csr("CP-1", key=w.taken_key), cert=w.ra), 409, "key_reuse", (a,)
            ),
            "rate_limited": Step(
                wrong_then(stranger_ra, stranger_ra), 429, "rate_limited", (a, "auth.locked_out", a), 2
            ),
        },
        "est-renew": {
            "unauthenticated": Step(stranger_renew, 401, "unauthenticated", (r,), 1),
            "bad_csr": Step(lambda w: w.est("simplereenroll", BAD_CSR, cert=w.charger), 400, "bad_csr", (), noise=1),
            "cn_mismatch": Step(
                lambda w: w.est("simplereenroll", make_csr("CP-OTHER"), cert=w.charger), 403, "cn_mismatch", (r,)
            ),
            "wrong_organization": Step(
                lambda w: w.est("simplereenroll", make_csr("CP-CUR", EVIL_O), cert=w.charger),
                403,
                "wrong_organization",
                (r,),
            ),
            "key_not_allowed": Step(
                lambda w: w.est("simplereenroll", make_csr("CP-CUR", key=make_key("rsa-1024")), cert=w.charger),
                403,
                "key_not_allowed",
                (r,),
            ),
            "device_not_registered": "the client certificate names its device",
            "device_disabled": Step(
                lambda w: w.est("simplereenroll", make_csr("CP-OFF"), cert=w.off_charger), 403, "device_disabled", (r,)
            ),
            "revoked_credential": Step(
                lambda w: w.est("simplereenroll", make_csr("CP-REV"), cert=w.revoked_charger),
                401,
                "unauthenticated",
                (r,),
                1,
            ),
            "key_reuse": Step(
                lambda w: w.est("simplereenroll", make_csr("CP-CUR", key=w.taken_key), cert=w.charger),
                409,
                "key_reuse",
                (r,),
            ),
            "rate_limited": Step(
                wrong_then(stranger_renew, stranger_renew), 429, "rate_limited", (r, "auth.locked_out", r), 2
            ),
        },
        "est-secc": {
            "unauthenticated": Step(stranger_secc, 401, "unauthenticated", (v,), 1),
            "bad_csr": Step(
                lambda w: w.est("simpleenroll", BAD_CSR, label="v2g", cert=w.charger), 400, "bad_csr", (), noise=1
            ),
            "cn_mismatch": Step(
                lambda w: w.est("simpleenroll", make_csr("DE*ACM*E0003*1"), label="v2g", cert=w.secc),
                403,
                "cn_mismatch",
                (v,),
            ),
            "wrong_organization": Step(
                lambda w: w.est("simpleenroll", make_csr("DE*ACM*E0002*1", EVIL_O), label="v2g", cert=w.charger),
                403,
                "wrong_organization",
                (v,),
            ),
            "key_not_allowed": Step(
                lambda w: w.est(
                    "simpleenroll", make_csr("DE*ACM*E0002*1", key=make_key("rsa-1024")), label="v2g", cert=w.charger
                ),
                403,
                "key_not_allowed",
                (v,),
            ),
            "device_not_registered": "the client certificate names its station",
            "device_disabled": Step(
                lambda w: w.est("simpleenroll", make_csr("DE*ACM*E0005*1"), label="v2g", cert=w.off_charger),
                403,
                "device_disabled",
                (v,),
            ),
            "revoked_credential": Step(
                lambda w: w.est("simpleenroll", make_csr("DE*ACM*E0006*1"), label="v2g", cert=w.revoked_charger),
                401,
                "unauthenticated",
                (v,),
                1,
            ),
            "key_reuse": Step(
                lambda w: w.est(
                    "simpleenroll", make_csr("DE*ACM*E0002*1", key=w.taken_key), label="v2g", cert=w.charger
                ),
                409,
                "key_reuse",
                (v,),
            ),
            "rate_limited": Step(
                wrong_then(stranger_secc, stranger_secc), 429, "rate_limited", (v, "auth.locked_out", v), 2
            ),
        },
    }


def _api_route(certificate_type: str, action: str, cn: str, *, asynchronous: bool = False) -> Route:
    """The CSMS API's SignCertificate. Synchronous: the refusal, then the call, are audited.
    Asynchronous: the call that queued the job, the job's refusal, then the poll that reads it."""
    audited = ("csms.api.sign", action, "csms.api.sign-job") if asynchronous else (action, "csms.api.sign")
    at_once = ("csms.api.sign",)  # an unreadable CSR is refused when the job is queued
    polled = 200 if asynchronous else 0  # a polled job answers 200 with its refusal ({status: refused, reason})

    def sign(station: str, csr: Callable[[Installation], bytes]) -> Callable[[Installation], Any]:
        return lambda w: w.sign(station, csr(w), certificate_type, asynchronous=asynchronous)

    not_locked = (
        "the CSMS authenticates per call at the API layer, where bad tokens and certificates are locked out "
        "(tests/test_api_app.py); an authenticated CSMS is never locked out"
    )
    route: Route = {
        "unauthenticated": Step(
            lambda w: w.sign("CP-CUR", make_csr(cn), certificate_type, token="cpk_wrong", asynchronous=asynchronous),
            401,
            "unauthenticated",
            (),
            noise=1,
        ),
        "bad_csr": Step(sign("CP-CUR", lambda w: BAD_CSR), 400, "bad_csr", at_once if asynchronous else audited),
        "wrong_organization": Step(
            sign("CP-CUR", lambda w: make_csr(cn, EVIL_O)), polled or 403, "wrong_organization", audited
        ),
        "key_not_allowed": Step(
            sign("CP-CUR", lambda w: make_csr(cn, key=make_key("rsa-1024"))), polled or 403, "key_not_allowed", audited
        ),
        "device_not_registered": Step(
            sign("CP-NOPE", lambda w: make_csr(cn if cn != "CP-CUR" else "CP-NOPE")),
            polled or 403,
            "device_not_registered",
            audited,
        ),
        "device_disabled": Step(
            sign("CP-OFF", lambda w: make_csr(cn if cn != "CP-CUR" else "CP-OFF")),
            polled or 403,
            "device_disabled",
            audited,
        ),
        "revoked_credential": "the CSMS's credentials are checked at the API layer (a revoked csms-client "
        "certificate is an unauthenticated call, as above)",
        "key_reuse": Step(sign("CP-CUR", lambda w: make_csr(cn, key=w.taken_key)), polled or 409, "key_reuse", audited),
        "rate_limited": not_locked,
    }
    if certificate_type == "V2GCertificate":
        route["cn_mismatch"] = "the SECC ID is the CSR's CN"
    else:
        route["cn_mismatch"] = Step(
            sign("CP-CUR", lambda w: make_csr("CP-OTHER")), polled or 403, "cn_mismatch", audited
        )
    return route


def _opcp_route() -> Route:
    """OPCP's simpleenroll: the pipeline's refusal, then the call, are audited."""
    cn = "DE*ACM*E0005*1"
    audited = ("v2g.refused", "csms.opcp.simpleenroll")
    no_station = "OPCP names no charging station, so no device is checked (docs/opcp.md)"
    return {
        "unauthenticated": Step(lambda w: w.opcp(make_csr(cn), token="cpk_wrong"), 401, "unauthenticated", (), noise=1),
        "bad_csr": Step(lambda w: w.opcp(BAD_CSR), 400, "bad_csr", audited),
        "cn_mismatch": "the SECC ID is the CSR's CN",
        "wrong_organization": Step(lambda w: w.opcp(make_csr(cn, EVIL_O)), 403, "wrong_organization", audited),
        "key_not_allowed": Step(
            lambda w: w.opcp(make_csr(cn, key=make_key("rsa-1024"))), 403, "key_not_allowed", audited
        ),
        "device_not_registered": no_station,
        "device_disabled": no_station,
        "revoked_credential": "the CSMS's token is checked before the pipeline (a revoked token is an "
        "unauthenticated call, as above)",
        "key_reuse": Step(lambda w: w.opcp(make_csr(cn, key=w.taken_key)), 409, "key_reuse", audited),
        "rate_limited": "wrong tokens lock the address out before the pipeline (tests/web/test_opcp_app.py); an "
        "authenticated CSMS is never locked out",
    }


ROUTES: dict[str, Route] = {
    **_est_routes(),
    "api-charger": _api_route("ChargingStationCertificate", "csms.sign.refused", "CP-CUR"),
    "api-secc": _api_route("V2GCertificate", "v2g.refused", "DE*ACM*E0004*1"),
    "api-relayed-job": _api_route("ChargingStationCertificate", "csms.sign.refused", "CP-CUR", asynchronous=True),
    "opcp-secc": _opcp_route(),
}


def test_every_route_has_a_decision_for_every_refusal() -> None:
    assert all(set(route) == set(REFUSALS) for route in ROUTES.values())


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_refusal_of_every_enrollment_route(installation: Installation, route: str) -> None:
    for refusal in REFUSALS:  # in this order: the lockout comes last
        step = ROUTES[route][refusal]
        if isinstance(step, str):
            continue
        seen, failures, noise = len(installation.audit()), installation.failures(), installation.noise()
        response = step.send(installation)
        where = f"{route} × {refusal}"
        assert response.status_code == step.status, (where, response.get_data(as_text=True))
        if response.is_json:
            assert response.get_json()["reason"] == step.code, where
        new = installation.audit()[seen:]
        assert tuple(event.action for event in new) == step.audit, (where, [event.action for event in new])
        for event in new:
            details = json.loads(event.details)
            if event.action.endswith(".refused"):
                # a lockout step's refusals are the failed authentications that started it
                assert details["code"] == ("unauthenticated" if refusal == "rate_limited" else step.code), where
            elif event.action in ("csms.api.sign", "csms.opcp.simpleenroll") and details["status"] >= 400:
                assert details["reason"] == step.code, where
        if refusal == "rate_limited":
            assert "Retry-After" in response.headers and "too many failed authentications" in response.text
        assert installation.failures() == failures + step.counted, where
        assert installation.noise() == noise + step.noise, where
