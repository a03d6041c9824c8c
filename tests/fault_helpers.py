"""Helpers for the fault and concurrency tests: installations set up by the real CLI, EST and OCSP
clients, and a TCP forwarder between a service and PostgreSQL that a test can cut and restore."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from sqlalchemy import select

from ca.registry.devices import add_device
from ca.registry.secrets import issue_secret
from ca.store.engine import Store
from ca.store.models import Authority, Device
from ca.work import Work
from tests.est_server import free_port
from tests.helpers import make_csr, make_key

ORG = "Acme Charging"
REPO = Path(__file__).parent.parent


def service_environment(**extra: str) -> dict[str, str]:
    """The environment of a chargepki process the tests start: none of the caller's CHARGEPKI_ settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")} | extra


def chargepki(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own process (so a test process never shares a token with it)."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=service_environment(),
        cwd=REPO,
        timeout=timeout,
    )


def embedded_home(home: Path, db_url: str) -> Path:
    """`chargepki init` with the embedded SoftHSM2 token of its own (tokens under <home>/softhsm)."""
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "--home", str(home), "init", "--org", ORG],
        capture_output=True,
        text=True,
        env=service_environment(CHARGEPKI_DATABASE_URL=db_url),
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return home


def token_directory(home: Path) -> Path:
    (directory,) = [p for p in (home / "softhsm" / "tokens").iterdir() if p.is_dir()]
    return directory


def root_pem(store: Store, path: Path) -> Path:
    with store.session() as session:
        der = session.scalar(select(Authority.certificate_der).where(Authority.role == "root"))
        session.commit()
    path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    return path


def register(store: Store, serials: Iterable[str]) -> dict[str, str]:
    """Registered devices and a one-time secret each."""
    secrets = {}
    with store.session() as session:
        for serial in serials:
            add_device(Work(session, "test"), serial=serial)
            device = session.scalar(select(Device).where(Device.serial == serial))
            secrets[serial] = issue_secret(Work(session, "test"), device=device)
    return secrets


def csr_body(serial: str) -> bytes:
    der = x509.load_pem_x509_csr(make_csr(serial, organization=ORG, key=make_key())).public_bytes(
        serialization.Encoding.DER
    )
    return base64.encodebytes(der)


def enroll(
    port: int, serial: str, secret: str, root: Path, body: bytes | None = None, timeout: float = 30
) -> requests.Response:
    return requests.post(
        f"https://localhost:{port}/.well-known/est/simpleenroll",
        data=body if body is not None else csr_body(serial),
        auth=(serial, secret),
        headers={"Content-Type": "application/pkcs10"},
        verify=str(root),
        timeout=timeout,
    )


def certificate_of(response: requests.Response) -> x509.Certificate:
    assert response.status_code == 200, response.text
    (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    return certificate


def fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def issuing_certificate(store: Store) -> x509.Certificate:
    with store.session() as session:
        der = session.scalar(select(Authority.certificate_der).where(Authority.role == "issuing"))
        session.commit()
    return x509.load_der_x509_certificate(der)


def ocsp_answer(port: int, certificate: x509.Certificate, issuer: x509.Certificate) -> str:
    """GOOD / REVOKED / UNKNOWN, or the error status (TRY_LATER …) of a POSTed request."""
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    response = requests.post(
        f"http://127.0.0.1:{port}/ocsp",
        data=request,
        headers={"Content-Type": "application/ocsp-request"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    parsed = ocsp.load_der_ocsp_response(response.content)
    if parsed.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return parsed.response_status.name
    return parsed.certificate_status.name


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (gunicorn's workers of its master), without the service's
    metrics listener (a child too, when it got its port)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split() if not _is_metrics_listener(int(child))]


def _is_metrics_listener(pid: int) -> bool:
    try:
        return b"metrics.exporter" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class TcpProxy:
    """A forwarder on a loopback port to PostgreSQL, standing in for the network between a service
    and its database: ``cut`` closes the port and every connection through it (as a database
    restart or a broken link does), ``restore`` opens the port again. The shared server never stops.
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def url(self, direct_url: str) -> str:
        return direct_url.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}")

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the forwarding thread
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, destination in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, destination), daemon=True).start()

    def _pipe(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, destination):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class SilentProxy:
    """A forwarder to PostgreSQL that can fall silent: ``partition`` stops forwarding in both
    directions without closing anything (no FIN, no RST: what a dropped link looks like to a
    process whose kernel still acknowledges), new connections are accepted and held; ``heal``
    forwards again, what waited included, as TCP's retransmissions would after a partition.

    Loopback cannot drop packets, so TCP keepalives and ``tcp_user_timeout`` never fire here (the
    proxy's kernel acknowledges): what this tests is the application's own deadlines.
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, direct_url: str) -> str:
        return direct_url.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}")

    def partition(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()  # a connection made during the partition reaches the server after it
        if self._closed:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets += [client, upstream]
        for source, destination in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(source, destination), daemon=True).start()

    def _pipe(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._open.wait()  # partitioned: hold the bytes (unsent, unanswered) until healed
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, destination):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
