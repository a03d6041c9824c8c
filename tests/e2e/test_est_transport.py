"""EST transport options: a TLS-terminating proxy's client-certificate header (trusted only
from configured addresses) and RFC 7030 §3.5 tls-unique channel binding over TLS 1.2."""

from __future__ import annotations

import base64
import http.client
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.issuers import default_issuing_ca, issuer_for
from ca.config import EstSettings, Pkcs11Settings
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device, get_device
from ca.registry.secrets import issue_secret
from ca.store.engine import Store
from ca.work import Work
from ocsp.presign import Presigner
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import make_key

ORG = "Acme Charging"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def installation(request, tmp_path_factory, token: Token) -> Iterator[tuple[Store, Path, Path]]:
    status = Presigner(token)
    tmp = tmp_path_factory.mktemp(f"transport-{request.param}")
    with database(request.param, tmp) as url:
        store = Store(url)
        store.upgrade()
        with store.session() as session:
            hierarchy = init_hierarchy(
                Work(session=session, actor="test", status=status, token=token),
                request=HierarchyRequest(organization=ORG),
            )
        root = tmp / "root.pem"
        root.write_bytes(
            x509.load_der_x509_certificate(hierarchy.root.certificate_der).public_bytes(serialization.Encoding.PEM)
        )
        yield store, root, tmp
        store.dispose()


def _server(installation, token_settings: tuple[Pkcs11Settings, str], name: str, est: EstSettings) -> EstServer:
    store, _root, tmp = installation
    home = write_home(tmp / name, str(store.url.render_as_string(hide_password=False)), token_settings[0], est)
    return start_server(home, free_port(), scheme="https" if est.tls else "http")


def _device_certificate(store: Store, token: Token, serial: str) -> tuple[x509.Certificate, object]:
    status = Presigner(token)
    key = make_key()
    with store.session() as session:
        add_device(Work(session, "test"), serial=serial)
        authority = default_issuing_ca(session, "production")
        row = issue(
            Work(session, "test", status=status),
            issuer=issuer_for(authority, token),
            request=IssueRequest(
                get_profile("charger"), key.public_key(), serial, device_id=get_device(session, serial).id
            ),
        )
    return x509.load_der_x509_certificate(row.der), key


def _csr_b64(serial: str, key, challenge: bytes | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, serial)])
    )
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge)
    return base64.encodebytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize("trusted", [True, False])
def test_proxy_header_is_trusted_only_from_configured_proxies(
    installation, token: Token, token_settings, trusted: bool
) -> None:
    store = installation[0]
    est = EstSettings(
        tls=False,
        client_cert_header="X-SSL-Client-Cert",
        trusted_proxies=("127.0.0.1/32",) if trusted else ("10.9.9.9",),
    )
    server = _server(installation, token_settings, f"proxy-{trusted}", est)
    try:
        serial = f"CP-PROXY-{int(trusted)}"
        certificate, key = _device_certificate(store, token, serial)
        header = quote(certificate.public_bytes(serialization.Encoding.PEM).decode())  # nginx $ssl_client_escaped_cert
        response = requests.post(
            f"{server.url}/simplereenroll",
            data=_csr_b64(serial, key),
            timeout=30,
            headers={"Content-Type": "application/pkcs10", "X-SSL-Client-Cert": header},
        )
        if trusted:
            assert response.status_code == 200, response.text
            assert pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
        else:
            assert response.status_code == 401 and "current certificate" in response.text
    finally:
        server.stop()


def _tls12_post(server: EstServer, root: Path, path: str, body_for_binding, auth: tuple[str, str]) -> tuple[int, str]:
    """POST over a TLS 1.2 connection, building the body from that connection's tls-unique value."""
    context = ssl.create_default_context(cafile=str(root))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    connection = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=30)
    connection.connect()
    binding = connection.sock.get_channel_binding("tls-unique")
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    connection.request(
        "POST",
        f"/.well-known/est/{path}",
        body=body_for_binding(binding),
        headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {token}"},
    )
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    return response.status, text


def test_tls_unique_binding_is_checked_and_can_be_required(installation, token: Token, token_settings) -> None:
    store, root, _tmp = installation
    server = _server(installation, token_settings, "binding", EstSettings(require_tls_unique=True))
    try:
        secrets = {}
        for serial in ("CP-BIND-OK", "CP-BIND-WRONG", "CP-BIND-NONE"):
            with store.session() as session:
                add_device(Work(session, "test"), serial=serial)
                secrets[serial] = issue_secret(Work(session, "test"), device=get_device(session, serial))
        key = make_key()
        status, text = _tls12_post(
            server,
            root,
            "simpleenroll",
            lambda binding: _csr_b64("CP-BIND-OK", key, base64.b64encode(binding)),
            ("CP-BIND-OK", secrets["CP-BIND-OK"]),
        )
        assert status == 200, text
        status, text = _tls12_post(
            server,
            root,
            "simpleenroll",
            lambda binding: _csr_b64("CP-BIND-WRONG", make_key(), b"bm90LXRoaXMtc2Vzc2lvbg=="),
            ("CP-BIND-WRONG", secrets["CP-BIND-WRONG"]),
        )
        assert status == 403 and "does not match this TLS session" in text
        status, text = _tls12_post(
            server,
            root,
            "simpleenroll",
            lambda binding: _csr_b64("CP-BIND-NONE", make_key()),
            ("CP-BIND-NONE", secrets["CP-BIND-NONE"]),
        )
        assert status == 403 and "requires the tls-unique value" in text
        response = requests.get(f"{server.url}/csrattrs", verify=str(root), timeout=10)
        assert b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x09\x07" in base64.b64decode(response.content)
    finally:
        server.stop()
