"""The CSMS API end to end: `chargepki serve est` in its own process over real HTTPS on loopback,
called with `requests` as a CSMS would (mTLS with a csms-client certificate, or an API token), with
OpenSSL checking the chains and OCSP responses it hands out. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.issuers import default_issuing_ca, issuer_for
from ca.config import EstSettings, Pkcs11Settings
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.csms import add_client, issue_token
from ca.registry.devices import add_device
from ca.status.revocation import revoke
from ca.store.engine import Store
from ca.work import Work
from ocsp.presign import Presigner
from tests.api_helpers import check_answer
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import make_csr, make_key, openssl

ORG = "Acme Charging"


@dataclass
class Deployment:
    store: Store
    server: EstServer
    tmp: Path
    root: Path
    issuing: Path
    token: str
    client_cert: tuple[str, str]  # the CSMS's certificate and key files
    status: Presigner
    counter: int = 0

    @property
    def base(self) -> str:
        return f"https://localhost:{self.server.port}/api/v1"

    def register(self) -> str:
        self.counter += 1
        serial = f"CP-{self.server.port}-{self.counter}"
        with self.store.session() as session:
            add_device(Work(session, "test"), serial=serial)
        return serial

    def call(self, method: str, path: str, *, auth: str = "cert", **kwargs: Any) -> requests.Response:
        """A call as the CSMS: mTLS (``cert``), a bearer token (``token``) or nothing (``none``)."""
        headers = kwargs.pop("headers", {})
        if auth == "token":
            headers["Authorization"] = f"Bearer {self.token}"
        url = path if path.startswith("https://") else self.base + path
        response = requests.request(
            method,
            url,
            headers=headers,
            cert=self.client_cert if auth == "cert" else kwargs.pop("cert", None),
            verify=str(self.root),
            timeout=30,
            **kwargs,
        )
        check_answer(
            method,
            "/api/v1" + url.split("/api/v1", 1)[1],
            response.status_code,
            response.headers.get("Content-Type"),
            response.json(),
        )
        return response

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def deployment(
    request, tmp_path_factory, token: Token, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Deployment]:
    status = Presigner(token)
    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    with database(request.param, tmp) as url:
        store = Store(url)
        store.upgrade()
        with store.session() as session:
            hierarchy = init_hierarchy(
                Work(session=session, actor="test", status=status, token=token),
                request=HierarchyRequest(organization=ORG, country="DE"),
            )
            (tmp / "root.pem").write_bytes(_pem(hierarchy.root.certificate_der))
            (tmp / "issuing.pem").write_bytes(_pem(hierarchy.issuing.certificate_der))
            client = add_client(Work(session, "test"), name="csms-e2e", environment="production")
            secret = issue_token(Work(session, "test"), client=client)
            key = make_key()
            issuer = issuer_for(default_issuing_ca(session, "production"), token)
            row = issue(
                Work(session, "test", status=status),
                issuer=issuer,
                request=IssueRequest(get_profile("csms-client"), key.public_key(), "csms-e2e"),
            )
            (tmp / "csms.pem").write_bytes(_pem(row.der or b""))
            (tmp / "csms.key").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        home = write_home(tmp / "home", url, token_settings[0], EstSettings(default_environment="production"))
        server = start_server(home, free_port())
        try:
            yield Deployment(
                store,
                server,
                tmp,
                tmp / "root.pem",
                tmp / "issuing.pem",
                secret,
                (str(tmp / "csms.pem"), str(tmp / "csms.key")),
                status,
            )
        finally:
            server.stop()
            store.dispose()
        log = server.log.read_text()
        assert "Traceback" not in log and '" 500 ' not in log, log[-3000:]


def _openssl_verify(deployment: Deployment, chain: str, name: str) -> str:
    leaf, *sub_cas = x509.load_pem_x509_certificates(chain.encode())
    leaf_file = deployment.write(f"{name}.pem", leaf.public_bytes(serialization.Encoding.PEM))
    untrusted = deployment.write(
        f"{name}-sub.pem", b"".join(c.public_bytes(serialization.Encoding.PEM) for c in sub_cas)
    )
    result = openssl(
        "verify",
        "-x509_strict",
        "-purpose",
        "sslclient",
        "-CAfile",
        str(deployment.root),
        "-untrusted",
        str(untrusted),
        str(leaf_file),
    )
    return result.stdout + result.stderr


def test_sign_over_mtls_and_with_a_token_chains_verify_with_openssl(deployment: Deployment) -> None:
    station = deployment.register()
    key = make_key()
    body = {
        "chargingStationId": station,
        "certificateType": "ChargingStationCertificate",
        "csr": make_csr(station, key=key).decode(),
    }
    signed = deployment.call("POST", "/sign", json=body)
    assert signed.status_code == 200, signed.text
    chain = signed.json()["certificateChain"]
    assert len(x509.load_pem_x509_certificates(chain.encode())) == 2  # leaf + issuing CA, no root
    assert ": OK" in _openssl_verify(deployment, chain, "signed")
    renewal = {**body, "csr": make_csr(station).decode()}
    by_token = deployment.call("POST", "/sign", auth="token", json=renewal)
    assert by_token.status_code == 200
    assert ": OK" in _openssl_verify(deployment, by_token.json()["certificateChain"], "renewed")
    anonymous = deployment.call("POST", "/sign", auth="none", json=body)
    assert anonymous.status_code == 401 and anonymous.json()["reason"] == "unauthenticated"
    # A charger's own certificate on the TLS connection is not a CSMS's.
    charger = (
        str(deployment.write("charger.pem", chain)),
        str(
            deployment.write(
                "charger.key",
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
            )
        ),
    )
    assert deployment.call("POST", "/sign", auth="none", cert=charger, json=renewal).status_code == 401
    refused = deployment.call("POST", "/sign", json={**body, "chargingStationId": "CP-NOPE"})
    assert (refused.status_code, refused.json()["reason"]) == (403, "cn_mismatch")


def test_async_sign_is_decided_by_the_serving_process(deployment: Deployment) -> None:
    station = deployment.register()
    body = {"chargingStationId": station, "csr": make_csr(station).decode()}
    accepted = deployment.call("POST", "/sign?async=1", json=body)
    assert accepted.status_code == 202
    location = f"https://localhost:{deployment.server.port}{accepted.headers['Location']}"
    deadline = time.monotonic() + 30  # bounded wait for the worker thread; normally well under a second
    while True:
        polled = deployment.call("GET", location)
        if polled.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert polled.status_code == 200 and polled.json()["status"] == "signed", polled.text
    assert ": OK" in _openssl_verify(deployment, polled.json()["certificateChain"], "async")


def test_lookups_ocsp_and_identity_check(deployment: Deployment) -> None:
    station, other = deployment.register(), deployment.register()
    signed = deployment.call(
        "POST", "/sign", json={"chargingStationId": station, "csr": make_csr(station).decode()}
    ).json()
    chain = signed["certificateChain"]
    info = deployment.call("GET", f"/certificates/{signed['fingerprintSha256']}").json()
    assert info["status"] == "good" and info["device"]["chargingStationId"] == station
    hash_data = info["certificateHashData"][0]
    assert (
        deployment.call("GET", "/certificates/by-hash", params=hash_data).json()["serialNumber"]
        == signed["serialNumber"]
    )

    request = {"ocspRequestData": {**hash_data, "responderURL": "http://127.0.0.1:8081/ocsp"}}
    answer = deployment.call("POST", "/ocsp", auth="token", json=request)
    assert answer.status_code == 200 and answer.json()["certificateStatus"] == "good"
    leaf = deployment.write(
        "ocsp-leaf.pem", x509.load_pem_x509_certificates(chain.encode())[0].public_bytes(serialization.Encoding.PEM)
    )
    response = deployment.write("ocsp.der", base64.b64decode(answer.json()["ocspResult"]))
    checked = openssl(
        "ocsp",
        "-respin",
        str(response),
        "-issuer",
        str(deployment.issuing),
        "-CAfile",
        str(deployment.root),
        "-sha256",  # the CertID hash that OCPP SHA256 hash data names (before -cert)
        "-cert",
        str(leaf),
        "-no_nonce",
    )
    assert "Response verify OK" in checked.stdout + checked.stderr and f"{leaf}: good" in checked.stdout, checked

    def identity(station_id: str) -> dict[str, Any]:
        result = deployment.call(
            "POST", "/identity-check", json={"chargingStationId": station_id, "clientCertificate": chain}
        )
        assert result.status_code == 200
        return result.json()

    assert identity(station)["allowed"] is True
    assert identity(other) == {**identity(other), "allowed": False, "reason": "cn_mismatch"}  # the impostor
    with deployment.store.session() as session:
        revoke(Work(session, "test", status=deployment.status), serial=signed["serialNumber"], reason="keyCompromise")
    assert identity(station)["reason"] == "revoked"
    assert deployment.call("GET", f"/certificates/{signed['fingerprintSha256']}").json()["status"] == "revoked"
    revoked = deployment.call("POST", "/ocsp", json=request).json()
    assert revoked["certificateStatus"] == "revoked"
    bad = deployment.call("POST", "/identity-check", data="{", headers={"Content-Type": "application/json"})
    assert (bad.status_code, bad.json()["reason"]) == (400, "malformed_json")
    assert deployment.call("GET", "/openapi.json", auth="none").json()["openapi"] == "3.1.0"
