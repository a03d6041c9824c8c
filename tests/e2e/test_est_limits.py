"""Limits over the real servers on loopback: failed-authentication lockouts shared by several
gunicorn workers and two `serve est` processes, request size limits on every EST and OCSP
route, and the request time limit that closes a stalled connection. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.config import Config, EstSettings, OcspSettings, Pkcs11Settings, write_config
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device, get_device
from ca.registry.secrets import issue_secret
from ca.store.engine import Store
from ca.store.models import AuditEvent
from ca.work import Work
from ocsp.presign import Presigner
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import b64csr

LIMITS = EstSettings(
    default_environment="production",
    auth_max_failures_per_device=3,
    auth_max_failures_per_address=7,
    auth_failure_window_seconds=600,
    auth_lockout_seconds=8,  # long enough that a loaded machine still sees the lockout before it ends
    request_timeout_seconds=1,
)


class Site:
    def __init__(self, store: Store, servers: list[EstServer], root: Path) -> None:
        self.store, self.servers, self.root = store, servers, root
        self.turn = 0

    def register(self, serial: str) -> str:
        with self.store.session() as session:
            add_device(Work(session, "test"), serial=serial)
            return issue_secret(Work(session, "test"), device=get_device(session, serial))

    def enroll(self, serial: str, password: str) -> requests.Response:
        """Each attempt on a new connection, alternating between the two server processes."""
        server = self.servers[self.turn % len(self.servers)]
        self.turn += 1
        return requests.post(
            f"{server.url}/simpleenroll",
            data=b64csr(serial),
            auth=(serial, password),
            headers={"Content-Type": "application/pkcs10"},
            verify=str(self.root),
            timeout=30,
        )

    def lockouts(self) -> list[dict]:
        with self.store.session() as session:
            events = session.scalars(select(AuditEvent).where(AuditEvent.action == "auth.locked_out")).all()
            session.commit()
            return [json.loads(event.details) for event in events]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(request, tmp_path_factory, token: Token, token_settings: tuple[Pkcs11Settings, str]) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp(f"limits-{request.param}")
    with database(request.param, tmp) as url:
        store = Store(url)
        store.upgrade()
        with store.session() as session:
            hierarchy = init_hierarchy(
                Work(session=session, actor="test", status=Presigner(token), token=token),
                request=HierarchyRequest(organization="Acme Charging"),
            )
            root = tmp / "root.pem"
            root.write_bytes(
                x509.load_der_x509_certificate(hierarchy.root.certificate_der).public_bytes(serialization.Encoding.PEM)
            )
        home = write_home(tmp / "home", url, token_settings[0], LIMITS)
        servers = [start_server(home, free_port(), workers=2), start_server(home, free_port(), workers=1)]
        try:
            yield Site(store, servers, root)
        finally:
            for server in servers:
                server.stop()
            store.dispose()


def test_failed_authentications_lock_a_device_out_across_workers_and_processes(site: Site) -> None:
    secret = site.register("CP-LIMIT-1")
    other = site.register("CP-LIMIT-2")
    for _ in range(3):
        assert site.enroll("CP-LIMIT-1", "not-the-secret").status_code == 401
    locked = site.enroll("CP-LIMIT-1", secret)  # the right secret, but locked out
    assert locked.status_code == 429, locked.text
    assert 1 <= int(locked.headers["Retry-After"]) <= 8
    assert locked.headers["Content-Type"].startswith("text/plain") and locked.text.count("\n") == 1
    assert "too many failed authentications" in locked.text
    assert site.enroll("CP-LIMIT-2", other).status_code == 200, "another device is not affected"
    (event,) = site.lockouts()
    assert (event["locked"], event["device"], event["address"]) == ("device", "CP-LIMIT-1", "127.0.0.1")
    assert secret not in json.dumps(event) and "not-the-secret" not in json.dumps(event)
    time.sleep(int(locked.headers["Retry-After"]) + 0.5)  # the lockout ends by itself
    assert site.enroll("CP-LIMIT-1", secret).status_code == 200


def test_failed_authentications_lock_an_address_out(site: Site) -> None:
    secret = site.register("CP-LIMIT-3")
    # Failures of other tests may still be in the window: guess with new names until the limit of 7.
    statuses = [site.enroll(f"CP-GUESS-{index}", "guess").status_code for index in range(7)]
    assert statuses.count(401) <= 7 and set(statuses) <= {401, 429}
    locked = site.enroll("CP-LIMIT-3", secret)
    assert locked.status_code == 429 and "Retry-After" in locked.headers
    (event,) = [event for event in site.lockouts() if event["locked"] == "address"]
    assert event["address"] == "127.0.0.1" and "7 failed authentications" in event["reason"]
    time.sleep(int(locked.headers["Retry-After"]) + 0.5)
    assert site.enroll("CP-LIMIT-3", secret).status_code == 200


def test_est_bodies_are_limited_on_every_route(site: Site) -> None:
    server = site.servers[0]
    big = b"A" * (64 * 1024)
    for path in ("simpleenroll", "simplereenroll", "cacerts", "csrattrs"):
        for body in (big, iter([big[:40000], big[40000:]])):  # with Content-Length, and chunked
            response = requests.post(
                f"{server.url}/{path}",
                data=body,
                headers={"Content-Type": "application/pkcs10"},
                verify=str(site.root),
                timeout=30,
            )
            assert response.status_code in (405, 413), (path, response.status_code, response.text)
            assert response.status_code == 413 or path in ("cacerts", "csrattrs")
    huge_header = requests.get(
        f"{server.url}/cacerts", headers={"X-Junk": "x" * 10000}, verify=str(site.root), timeout=30
    )
    assert huge_header.status_code in (400, 431)
    long_line = requests.get(f"{server.url}/cacerts?{'x' * 5000}", verify=str(site.root), timeout=30)
    assert long_line.status_code in (400, 414)


def test_a_stalled_request_is_closed(site: Site) -> None:
    server = site.servers[0]
    context = ssl.create_default_context(cafile=str(site.root))
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/pkcs10\r\nContent-Length: 100\r\n\r\nMIIB"
        )  # and never the rest of the body
        started = time.monotonic()
        try:
            answer = tls.recv(4096)
            answer += tls.recv(4096)
        except (ConnectionError, ssl.SSLError):
            answer = b""
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), f"answered a request without its body: {answer!r}"
    assert time.monotonic() - started < 20  # request_timeout_seconds = 1; the socket would wait 20


@pytest.mark.parametrize("server_kind", ["granian", "gunicorn"])
def test_ocsp_requests_are_limited(tmp_path: Path, db_url: str, token_settings, server_kind: str) -> None:
    home = tmp_path / "home"
    write_config(
        Config(home=home, database_url=db_url, pkcs11=token_settings[0], ocsp=OcspSettings(request_timeout_seconds=2))
    )
    Store(db_url).upgrade()
    server = start_server(home, free_port(), service="ocsp", extra=("--no-signer", "--server", server_kind))
    base = f"http://127.0.0.1:{server.port}"
    try:
        big = requests.post(
            f"{base}/ocsp", data=b"\x30" * 20000, headers={"Content-Type": "application/ocsp-request"}, timeout=30
        )
        assert big.status_code == 413
        chunked = requests.post(
            f"{base}/ocsp", data=iter([b"\x30" * 100]), headers={"Content-Type": "application/ocsp-request"}, timeout=30
        )
        assert chunked.status_code == 411
        long_get = requests.get(f"{base}/ocsp/{'A' * 100_000}", timeout=30)
        assert 400 <= long_get.status_code < 500 or long_get.headers.get("Content-Type") == "application/ocsp-response"
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /ocsp/MAA= HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
            started = time.monotonic()
            try:
                data = sock.recv(1024)
            except ConnectionError:
                data = b""
            assert time.monotonic() - started < 30
            assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:100]
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log
