"""The OPCP-compatible CPO EST end to end, through the front door: `chargepki serve est` behind nginx on
loopback, set up with the CLI only (`init`, `v2g init` for ISO 15118-2 and ISO 15118-20 without Sub-CA 1,
`csms add`, `csms token`), called by a client that does what MaEVe's OPCP provider does
(`manager/services/charge_station_certificate_provider.go`: both token headers, one line of base64 DER
CSR, the leaf from `simpleenroll`, a leaf-first PEM chain built from `cacerts` by issuer name, one retry)
and as CitrineOS's Hubject client does (an OAuth 2.0 client-credentials token, then `Authorization:
Bearer` only; the chain is `cacerts` less its last certificate, which is the V2G root). OpenSSL verifies
each chain strictly against the V2G root `ca chain` prints. Every refusal is a clear 4xx, audited,
nothing issued. SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from sqlalchemy import func, select

from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.store.engine import Store
from ca.store.models import AuditEvent, Certificate
from cli.main import cli
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server
from tests.helpers import make_csr, make_key, openssl, write

ORG = "Acme Charging"


def _cli(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _pems(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode())


class HttpError(Exception):
    """MaEVe's error for any status but 200: ``http status: N`` (the body is not read)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"http status: {status}")
        self.status = status


def load_p7(der: bytes) -> list[x509.Certificate]:
    """cryptography's loader, in the certificates' order; a SET not in DER order (the root last) is read
    as BER with a warning, the only one allowed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        certificates = pkcs7.load_der_pkcs7_certificates(der)
    assert all("InvalidSetOrdering" in str(w.message) for w in caught), [str(w.message) for w in caught]
    return certificates


@dataclass
class MaeveProvider:
    """MaEVe's OpcpChargeStationCertificateProvider, request for request (fixed-token auth service)."""

    base_url: str
    token: str
    iso_version: str
    verify: str
    calls: list[tuple[str, int]] = field(default_factory=list)

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self.token, "authorization": f"Bearer {self.token}"}

    def _once(self, method: str, url: str, body: bytes | None) -> bytes:
        headers = self._headers() | ({"content-type": "application/pkcs10"} if body is not None else {})
        response = requests.request(method, url, data=body, headers=headers, verify=self.verify, timeout=30)
        self.calls.append((url, response.status_code))
        if response.status_code == 200:
            return response.content
        raise HttpError(response.status_code)

    def _with_retry(self, method: str, url: str, body: bytes | None = None) -> bytes:
        try:
            return self._once(method, url, body)
        except HttpError:
            return self._once(method, url, body)  # MaEVe retries once (with a refreshed token)

    def provide_certificate(self, pem_csr: bytes) -> str:
        """convertCSR, requestCertificateWithRetry, requestChainWithRetry, encodeLeafAndChain."""
        csr = x509.load_pem_x509_csr(pem_csr).public_bytes(serialization.Encoding.DER)
        leaf = self._with_retry("POST", f"{self.base_url}/cpo/simpleenroll/{self.iso_version}", base64.b64encode(csr))
        chain = self._with_retry("GET", f"{self.base_url}/cpo/cacerts/{self.iso_version}")
        return self.encode_leaf_and_chain(leaf, chain)

    @staticmethod
    def encode_leaf_and_chain(leaf: bytes, chain: bytes) -> str:
        issued = load_p7(base64.b64decode(leaf))[0]
        cas = load_p7(base64.b64decode(chain))
        out = [issued]
        while True:
            issuer = next((c for c in cas if c.subject == out[-1].issuer and c.subject != c.issuer), None)
            if issuer is None:
                break
            out.append(issuer)
        return "".join(
            f"subject: {c.subject.rfc4514_string()}\nissuer: {c.issuer.rfc4514_string()}\n"
            + c.public_bytes(serialization.Encoding.PEM).decode()
            for c in out
        )


@dataclass
class Site:
    home: Path
    server: EstServer
    store: Store
    tls_root: Path
    v2g_roots: dict[str, Path]  # ISO version path name → the V2G root `ca chain` printed
    token: str
    disabled_token: str
    tmp: Path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.server.port}"

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None, token: str | None = None) -> Any:
        token = token or self.token
        sent = {"x-api-key": token, "authorization": f"Bearer {token}", "content-type": "application/pkcs10"}
        return requests.post(
            self.url + path, data=body, headers=sent | (headers or {}), verify=str(self.tls_root), timeout=30
        )

    def count(self, model: type, *where: Any) -> int:
        with self.store.session() as session:
            found = session.scalar(select(func.count()).select_from(model).where(*where)) or 0
            session.commit()
            return found

    def entries(self, action: str) -> list[dict[str, Any]]:
        with self.store.session() as session:
            found = session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq))
            details = [json.loads(event.details) | {"actor": event.actor} for event in found]
            session.commit()
            return details


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp(f"opcp-e2e-{request.param}")
    with database(request.param, tmp) as url:
        home = tmp / "home"
        write_config(Config(home=home, database_url=url, pkcs11=token_settings[0], est=EstSettings(workers=1)))
        store = Store(url)
        store.upgrade()
        _cli(home, "init", "--org", ORG)
        _cli(home, "v2g", "init", "--org", ORG, "--country", "DE")
        _cli(home, "v2g", "init", "--iso", "15118-20", "--without-sub-ca-1", "--org", ORG, "--country", "DE")
        tls_root = write(
            tmp / "tls-root.pem", _pems(_cli(home, "ca", "chain"))[-1].public_bytes(serialization.Encoding.PEM)
        )
        v2g_roots = {}
        for version, sub_ca_2 in (
            ("ISO15118-2", "production-cpo-sub-ca2-1"),
            ("ISO15118-20", "production-cpo20-sub-ca2-1"),
        ):
            root = _pems(_cli(home, "ca", "chain", "--ca", sub_ca_2))[-1]
            v2g_roots[version] = write(tmp / f"{version}-root.pem", root.public_bytes(serialization.Encoding.PEM))
        tokens = []
        for name in ("csms-maeve", "csms-off"):
            _cli(home, "csms", "add", name, "--no-certificate")
            tokens.append(_cli(home, "csms", "token", name).strip().splitlines()[-1])
        _cli(home, "csms", "disable", "csms-off")
        server = start_server(home, free_port(), workers=1, direct=False)  # behind the front door (nginx)
        _until_answering(f"https://localhost:{server.port}/.well-known/est/cacerts", tls_root)
        try:
            yield Site(home, server, store, tls_root, v2g_roots, tokens[0], tokens[1], tmp)
        finally:
            server.stop()
            store.dispose()
        log = server.log.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


def _until_answering(url: str, tls_root: Path, timeout: float = 30.0) -> None:
    """Once the port accepts connections, also wait for an HTTPS answer through nginx (under load, the
    first request right after start-up was once refused)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, verify=str(tls_root), timeout=5)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _verify(site: Site, version: str, pem_chain: str, name: str) -> x509.Certificate:
    """`openssl verify -x509_strict` of the chain's leaf, the chain as untrusted certificates and the V2G
    root of `ca chain` as the only trust anchor."""
    chain = write(site.tmp / f"{name}-chain.pem", pem_chain.encode())
    leaf = _pems(pem_chain)[0]
    target = write(site.tmp / f"{name}-leaf.pem", leaf.public_bytes(serialization.Encoding.PEM))
    root = str(site.v2g_roots[version])
    result = openssl("verify", "-x509_strict", "-CAfile", root, "-untrusted", str(chain), str(target))
    assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), result.stdout + result.stderr
    return leaf


@pytest.mark.parametrize(("version", "curve", "length"), [("ISO15118-2", "ec-p256", 3), ("ISO15118-20", "ec-p521", 2)])
def test_a_maeve_provider_enrolls_through_the_front_door(site: Site, version: str, curve: str, length: int) -> None:
    provider = MaeveProvider(site.url, site.token, version, str(site.tls_root))
    secc_id = f"DE*ACM*E{length}001*1"
    before = site.count(Certificate)
    pem_chain = provider.provide_certificate(make_csr(secc_id, key=make_key(curve)))
    assert [status for _url, status in provider.calls] == [200, 200]  # no retry needed
    assert pem_chain.count("-----BEGIN CERTIFICATE-----") == length  # leaf, Sub-CA 2[, Sub-CA 1]: no root
    assert pem_chain.startswith("subject: ")  # MaEVe's text lines before each PEM block
    leaf = _verify(site, version, pem_chain, f"maeve-{version}")
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == secc_id
    assert site.count(Certificate) == before + 1
    last = site.entries("csms.opcp.simpleenroll")[-1]
    assert (last["actor"], last["status"], last["iso"]) == ("csms:csms-maeve", 200, version)


def test_a_citrineos_client_enrolls_on_the_well_known_paths(site: Site) -> None:
    """Its newest Hubject client: an OAuth 2.0 client-credentials token first, then the version-less paths."""
    form = {"grant_type": "client_credentials", "client_id": "csms-maeve", "client_secret": site.token}
    response = requests.post(
        f"{site.url}/.well-known/cpo/oauth/token",
        data=form | {"audience": site.url},
        verify=str(site.tls_root),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    token = f"Bearer {response.json()['access_token']}"
    pem = make_csr("DE*ACM*E5001*1", key=make_key())
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))  # extractEncodedContentFromCSR
    headers = {"Accept": "application/pkcs10", "Authorization": token, "Content-Type": "application/pkcs10"}
    response = requests.post(
        f"{site.url}/.well-known/cpo/simpleenroll", data=body, headers=headers, verify=str(site.tls_root), timeout=30
    )
    assert response.status_code == 200, response.text
    leaf = load_p7(base64.b64decode(response.text))[0]
    headers = {"Accept": "application/pkcs10, application/pkcs7", "Authorization": token}
    response = requests.get(
        f"{site.url}/.well-known/cpo/cacerts", headers=headers, verify=str(site.tls_root), timeout=30
    )
    assert response.status_code == 200, response.text
    cacerts = load_p7(base64.b64decode(response.text))
    root = x509.load_pem_x509_certificate(site.v2g_roots["ISO15118-2"].read_bytes())
    assert cacerts[-1] == root  # getRootCACertificateFromExternalCA: the last certificate
    chain = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in [leaf, *cacerts[:-1]])
    _verify(site, "ISO15118-2", chain, "citrineos")


def _refusal(response: requests.Response, status: int, reason: str | None) -> None:
    assert response.status_code == status, response.text
    if reason is None:  # nginx's own answer
        assert response.headers["Content-Type"].startswith("text/plain")
        return
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    assert response.json()["reason"] == reason, response.json()
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def _b64(secc_id: str, curve: str = "ec-p256") -> bytes:
    pem = make_csr(secc_id, key=make_key(curve))
    return base64.b64encode(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))


REFUSALS = {
    # case: (path, body, extra headers, token (None: the CSMS's own, "off": the disabled CSMS's), status, reason)
    "bad token": ("/cpo/simpleenroll/ISO15118-2", _b64("DE*ACM*E6001*1"), {}, "cpk_wrong", 401, "unauthenticated"),
    "disabled client": ("/cpo/simpleenroll/ISO15118-2", _b64("DE*ACM*E6002*1"), {}, "off", 401, "unauthenticated"),
    "wrong content type": (
        "/cpo/simpleenroll/ISO15118-2",
        _b64("DE*ACM*E6003*1"),
        {"content-type": "text/plain"},
        None,
        415,
        "unsupported_media_type",
    ),
    "garbage body": ("/cpo/simpleenroll/ISO15118-2", b"%%% not base64 %%%", {}, None, 400, "bad_request"),
    "P-256 key on ISO15118-20": (
        "/cpo/simpleenroll/ISO15118-20",
        _b64("DE*ACM*E6004*1"),
        {},
        None,
        403,
        "key_not_allowed",
    ),
    "P-521 key on ISO15118-2": (
        "/cpo/simpleenroll/ISO15118-2",
        _b64("DE*ACM*E6005*1", "ec-p521"),
        {},
        None,
        403,
        "key_not_allowed",
    ),
    "CN not an EVSE ID": ("/cpo/simpleenroll/ISO15118-2", _b64("CP-000123"), {}, None, 403, "bad_secc_id"),
    "unknown ISO version": (
        "/cpo/simpleenroll/ISO15118-3",
        _b64("DE*ACM*E6006*1"),
        {},
        None,
        404,
        "unknown_iso_version",
    ),
    "oversized body (nginx)": ("/cpo/simpleenroll/ISO15118-2", b"A" * 40_000, {}, None, 413, None),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_through_the_front_door_are_clear_audited_and_issue_nothing(site: Site, case: str) -> None:
    path, body, headers, token, status, reason = REFUSALS[case]
    token = site.disabled_token if token == "off" else token
    certificates = site.count(Certificate)
    calls, refused = len(site.entries("csms.opcp.simpleenroll")), len(site.entries("v2g.refused"))
    _refusal(site.post(path, body, headers, token), status, reason)
    assert site.count(Certificate) == certificates
    entries = site.entries("csms.opcp.simpleenroll")[calls:]
    if status in (401, 413):  # no identity (counted into the address's summary), or nginx answered alone
        assert entries == []
    else:
        assert [(e["actor"], e["status"], e["reason"]) for e in entries] == [("csms:csms-maeve", status, reason)]
    pipeline = reason in ("key_not_allowed", "bad_secc_id")  # refused inside the enrollment pipeline
    assert len(site.entries("v2g.refused")) == refused + pipeline


def test_a_refusal_reaches_maeve_as_its_http_error(site: Site) -> None:
    provider = MaeveProvider(site.url, site.token, "ISO15118-2", str(site.tls_root))
    with pytest.raises(HttpError, match="http status: 403"):
        provider.provide_certificate(make_csr("not an EVSE ID"))
    assert [status for _url, status in provider.calls] == [403, 403]  # its one retry, refused again
