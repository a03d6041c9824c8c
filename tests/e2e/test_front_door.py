"""The front door: real nginx started by `chargepki serve est` / `serve ocsp` from the installation's
settings, in front of gunicorn and the OCSP responder over Unix sockets, on loopback.

One installation (SQLite, the session's token) and one EST and one OCSP front door serve the whole
module; the application servers run with one worker each, so a handful of held connections would
take them off the air without the proxy. Outcomes only: who answers what, never how fast.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from ca.config import Config, EstSettings, FrontDoorSettings, OcspSettings, Pkcs11Settings, write_config
from ca.frontdoor import CLIENT_CERT_HEADER
from ca.store.engine import Store
from cli.main import cli
from tests.est_server import EstServer, free_port, start_server
from tests.helpers import chargepki, make_key

ORG = "Acme Charging"
DOOR = FrontDoorSettings(
    header_timeout_seconds=3, body_timeout_seconds=3, send_timeout_seconds=3, keepalive_timeout_seconds=5
)


def _cli(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@dataclass
class Door:
    home: Path
    est: EstServer
    ocsp: EstServer
    root: Path
    issuing: x509.Certificate
    pin: str

    @property
    def est_url(self) -> str:
        return f"https://localhost:{self.est.port}/.well-known/est"

    @property
    def ocsp_url(self) -> str:
        return f"http://127.0.0.1:{self.ocsp.port}"


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, token_settings: tuple[Pkcs11Settings, str]) -> Iterator[Door]:
    tmp = tmp_path_factory.mktemp("front-door")
    url = f"sqlite:///{tmp / 'chargepki.db'}"
    home = tmp / "home"
    write_config(
        Config(
            home=home,
            database_url=url,
            pkcs11=token_settings[0],
            est=EstSettings(workers=1),
            ocsp=OcspSettings(workers=1),
            front_door=DOOR,
        )
    )
    Store(url, create=True).upgrade()
    _cli(home, "init", "--org", ORG)
    chain = _cli(home, "ca", "chain").split("-----END CERTIFICATE-----\n")
    root = tmp / "root.pem"
    root.write_text(chain[1] + "-----END CERTIFICATE-----\n")
    issuing = x509.load_pem_x509_certificate((chain[0] + "-----END CERTIFICATE-----\n").encode())
    pin = token_settings[1]
    est = start_server(home, free_port(), workers=1, direct=False)
    # The PIN in the environment, as an operator might give it: only the signer may keep it.
    responder = start_server(
        home, free_port(), workers=1, service="ocsp", direct=False, environ={"CHARGEPKI_PKCS11_PIN": pin}
    )
    try:
        yield Door(home, est, responder, root, issuing, pin)
    finally:
        responder.stop()
        est.stop()
    for server in (est, responder):
        log = server.log.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
    assert not (home / "run" / "est.sock").exists() and not (home / "run" / "ocsp.sock").exists()


def _enroll(door: Door, serial: str) -> tuple[x509.Certificate, object]:
    _cli(door.home, "device", "add", serial)
    secret = _cli(door.home, "token", "issue", serial).strip().splitlines()[-1]
    key = make_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, serial)]
            )
        )
        .sign(key, hashes.SHA256())
    )
    response = requests.post(
        f"{door.est_url}/simpleenroll",
        data=base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)),
        headers={"Content-Type": "application/pkcs10"},
        auth=(serial, secret),
        verify=str(door.root),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    from cryptography.hazmat.primitives.serialization import pkcs7

    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))[0], key


def _ocsp_status(door: Door, certificate: x509.Certificate) -> ocsp.OCSPCertStatus:
    request = ocsp.OCSPRequestBuilder().add_certificate(certificate, door.issuing, hashes.SHA1()).build()
    response = requests.post(
        f"{door.ocsp_url}/ocsp",
        data=request.public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
        timeout=10,
    )
    assert response.status_code == 200
    return ocsp.load_der_ocsp_response(response.content).certificate_status


class Attack:
    """Idle, slow-header and slow-body connections that keep trickling (one byte each per half second)."""

    def __init__(self) -> None:
        self.idle: list[socket.socket] = []
        self.slow: list[tuple[socket.socket, bytes]] = []  # (socket, what it trickles)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)

    def hold(
        self, port: int, *, tls_root: Path | None, idle: int, slow_headers: int, slow_bodies: int, path: str
    ) -> None:
        for _ in range(idle):
            self.idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        context = ssl.create_default_context(cafile=str(tls_root)) if tls_root else None
        for index in range(slow_headers + slow_bodies):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname="localhost")
            if index < slow_headers:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode())
                self.slow.append((sock, b"X"))  # a header line that never ends
            else:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 16000\r\n\r\n".encode())
                self.slow.append((sock, b"0"))

    def _trickle(self) -> None:
        while not self.stop.wait(0.5):
            for sock, byte in self.slow:
                with contextlib.suppress(OSError):
                    sock.sendall(byte)

    def __enter__(self) -> Attack:
        self.thread.start()
        return self

    def still_held(self) -> int:
        """How many trickling connections the proxy still holds open (not closed by any side)."""
        held = 0
        for sock, byte in self.slow:
            try:
                sock.sendall(byte)
                held += 1
            except OSError:
                pass
        return held

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in [*self.idle, *(s for s, _ in self.slow)]:
            sock.close()


def test_slow_and_idle_clients_do_not_stop_enrollment_or_ocsp(door: Door) -> None:
    """More held connections than gunicorn (1 worker × 4 threads) and the responder have threads."""
    with Attack() as attack:
        attack.hold(door.est.port, tls_root=door.root, idle=16, slow_headers=8, slow_bodies=8,
                    path="/.well-known/est/simpleenroll")  # fmt: skip
        attack.hold(door.ocsp.port, tls_root=None, idle=16, slow_headers=8, slow_bodies=16, path="/ocsp")
        certificate, _key = _enroll(door, "CP-DOOR-1")
        cacerts = requests.get(f"{door.est_url}/cacerts", verify=str(door.root), timeout=10)
        assert cacerts.status_code == 200
        assert _ocsp_status(door, certificate) == ocsp.OCSPCertStatus.GOOD
        assert attack.still_held() > 0  # the attack was still on when the legitimate clients were served
    # and revocation still reaches clients through the proxy (nothing caches a `good`)
    _cli(door.home, "revoke", f"{certificate.serial_number:x}", "--reason", "keyCompromise")
    deadline = time.monotonic() + 10
    while _ocsp_status(door, certificate) != ocsp.OCSPCertStatus.REVOKED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ocsp_status(door, certificate) == ocsp.OCSPCertStatus.REVOKED


@pytest.mark.parametrize("service", ["est", "ocsp"])
def test_oversized_bodies_get_413_from_the_proxy(door: Door, service: str) -> None:
    if service == "est":
        response = requests.post(
            f"{door.est_url}/simpleenroll",
            data=b"A" * 40_000,
            headers={"Content-Type": "application/pkcs10"},
            verify=str(door.root),
            timeout=10,
        )
        limit = "32768"
    else:
        response = requests.post(
            f"{door.ocsp_url}/ocsp",
            data=b"0" * 20_000,
            headers={"Content-Type": "application/ocsp-request"},
            timeout=10,
        )
        limit = "16384"
    assert response.status_code == 413
    assert response.headers["Server"] == "nginx" and limit in response.text


def _access_log_has(door: Door, service: str, needle: str) -> bool:
    log = door.home / "run" / f"nginx-{service}" / "access.log"
    deadline = time.monotonic() + 5  # nginx flushes its buffered access log every second
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("part", ["head", "body"])
def test_never_finished_requests_are_cut_off_by_the_proxy_with_408(door: Door, part: str) -> None:
    """A request head or body that stalls past its timeout: nginx logs 408 and resets the connection
    (``reset_timedout_connection``); it sends no answer, since nginx ends a request that timed out
    while being read without writing a response (its 408 is a log status, never sent). So the client
    gets a connection reset and not a byte; the application never sees the request."""
    marker = f"never-finished-{part}"
    head = f"POST /ocsp?{marker} HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n".encode()
    with socket.create_connection(("127.0.0.1", door.ocsp.port), timeout=30) as sock:
        sock.sendall(head + (b"Content-Length: 100\r\n\r\n0\x01" if part == "body" else b"X-Slow: 1"))
        with pytest.raises(ConnectionResetError):
            sock.recv(1000)
    assert _access_log_has(door, "ocsp", f'"POST /ocsp?{marker} HTTP/1.1" 408')


def test_a_client_certificate_header_sent_by_a_client_is_ignored(door: Door) -> None:
    certificate, key = _enroll(door, "CP-DOOR-2")
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(certificate.subject)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    body = base64.encodebytes(csr)
    headers = {"Content-Type": "application/pkcs10"}
    forged = requests.post(
        f"{door.est_url}/simplereenroll",
        data=body,
        headers={**headers, CLIENT_CERT_HEADER: quote(pem.decode()), "X-SSL-Client-Cert": quote(pem.decode())},
        verify=str(door.root),
        timeout=30,
    )
    assert forged.status_code == 401, forged.text
    # the same request with the certificate in the TLS handshake: verified by nginx, passed on by it
    directory = door.home.parent
    (directory / "cp2.pem").write_bytes(pem)
    (directory / "cp2.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    real = requests.post(
        f"{door.est_url}/simplereenroll",
        data=body,
        headers=headers,
        cert=(str(directory / "cp2.pem"), str(directory / "cp2.key")),
        verify=str(door.root),
        timeout=30,
    )
    assert real.status_code == 200, real.text


def test_the_responder_behind_the_proxy_still_gets_the_headers_it_reads(door: Door) -> None:
    """Only the media type and If-None-Match are passed to the responder: a media type with a
    parameter is accepted, a wrong one refused, and a GET with the answer's ETag gets 304."""
    certificate, _ = _enroll(door, "CP-HEADERS")
    der = ocsp.OCSPRequestBuilder().add_certificate(certificate, door.issuing, hashes.SHA1()).build()
    body = der.public_bytes(serialization.Encoding.DER)
    for content_type, expected in (("Application/OCSP-Request; q=1", 200), ("text/plain", 415)):
        posted = requests.post(f"{door.ocsp_url}/ocsp", data=body, headers={"Content-Type": content_type}, timeout=10)
        assert posted.status_code == expected, content_type
    url = f"{door.ocsp_url}/ocsp/{base64.b64encode(body).decode()}"
    first = requests.get(url, timeout=10)
    assert first.status_code == 200 and first.headers["ETag"]
    assert requests.get(url, headers={"If-None-Match": first.headers["ETag"]}, timeout=10).status_code == 304
    assert requests.get(url, headers={"If-None-Match": '"other"'}, timeout=10).status_code == 200


def test_symlinks_in_the_publication_directory_are_refused(door: Door, token_settings) -> None:
    published = door.home / "pki"
    published.mkdir(exist_ok=True)
    (published / "plain.pem").write_text("public\n")
    pin_file = token_settings[0].pin_file
    (published / "pin.pem").symlink_to(pin_file)
    (published / "again.pem").symlink_to(published / "plain.pem")
    assert requests.get(f"{door.ocsp_url}/pki/plain.pem", timeout=10).text == "public\n"
    for name in ("pin.pem", "again.pem"):
        response = requests.get(f"{door.ocsp_url}/pki/{name}", timeout=10)
        assert response.status_code == 404 and door.pin not in response.text


def _processes_of(home: Path) -> dict[int, tuple[str, bytes]]:
    """pid → (command line, environment) of every process whose command line names this home."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(home) in command:
                found[int(entry.name)] = (command, (entry / "environ").read_bytes())
        except OSError:
            continue
    return found


def test_no_pin_in_the_environment_of_the_responder_or_the_proxy(door: Door) -> None:
    processes = _processes_of(door.home)
    keyless = {
        pid: facts
        for pid, facts in processes.items()
        if "nginx" in facts[0] or ("--unix-socket" in facts[0] and " ocsp " in facts[0])
    }
    assert any("nginx-ocsp" in command for command, _ in keyless.values())
    assert any("--unix-socket" in command for command, _ in keyless.values())
    for pid, (command, environ) in keyless.items():
        assert door.pin.encode() not in environ, f"{pid}: {command}"
    for command, _ in processes.values():
        assert door.pin not in command
    # the check can see a PIN where one is: the OCSP front door's own process was given it
    assert any(
        door.pin.encode() in environ for command, environ in processes.values() if "serve ocsp --port" in command
    )


def test_tls_unique_required_is_refused_with_the_front_door(door: Door, tmp_path: Path) -> None:
    config_text = (door.home / "chargepki.toml").read_text()
    other = tmp_path / "home"
    other.mkdir(mode=0o700)
    (other / "chargepki.toml").write_text(
        config_text.replace("require_tls_unique = false", "require_tls_unique = true")
    )
    result = CliRunner().invoke(cli, ["--home", str(other), "serve", "est", "--port", str(free_port())])
    assert result.exit_code == 1
    assert "tls-unique cannot cross a TLS-terminating proxy" in result.output and "direct" in result.output


def test_two_installations_on_one_host_stay_independent(door: Door, tmp_path: Path) -> None:
    """A second installation (its own embedded token and database) with its own front door: separate
    sockets and gunicorn control sockets (none under the user's home), separate CAs, and stopping one
    leaves the other serving."""
    other = tmp_path / "second"
    user_home = tmp_path / "user"
    user_home.mkdir()
    environ = {"HOME": str(user_home), "CHARGEPKI_ORG": "Other Charging"}
    # in a process of its own, as `make run` does: its embedded token is not this process's
    result = chargepki(other, "run", "--setup-only", env=environ)
    assert result.returncode == 0, result.stdout + result.stderr
    second = start_server(other, free_port(), workers=1, direct=False, environ=environ)
    try:
        deadline = time.monotonic() + 15  # gunicorn opens its control socket once its workers have booted
        while not (other / "run" / "gunicorn-est.ctl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for home in (door.home, other):
            assert (home / "run" / "gunicorn-est.ctl").exists() and (home / "run" / "est.sock").exists()
        assert not (user_home / ".gunicorn").exists()
        second_root = other / "root.pem"
        chain = chargepki(other, "ca", "chain", env=environ).stdout
        second_root.write_text(chain.split("-----END CERTIFICATE-----\n")[1] + "-----END CERTIFICATE-----\n")
        mine = requests.get(f"{door.est_url}/cacerts", verify=str(door.root), timeout=10).content
        theirs = requests.get(
            f"https://localhost:{second.port}/.well-known/est/cacerts", verify=str(second_root), timeout=10
        ).content
        assert mine != theirs
    finally:
        second.stop()
    assert not (other / "run" / "gunicorn-est.ctl").exists()
    assert requests.get(f"{door.est_url}/cacerts", verify=str(door.root), timeout=10).status_code == 200
    assert (door.home / "run" / "gunicorn-est.ctl").exists()


def _key_id(certificate: x509.Certificate) -> bytes:
    return certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""


def test_the_proxy_trusts_a_new_ca_after_a_rotation(door: Door) -> None:
    """nginx loaded the bundle at start; a rotation adds a CA, and the front door (which compares the
    store's CAs with what nginx loaded) reloads it: an RA of the new CA gets in with its certificate."""
    _cli(door.home, "ca", "rotate")
    directory = door.home.parent
    _cli(door.home, "ra", "add", "ra-new-ca", "--out-dir", str(directory))
    ra = x509.load_pem_x509_certificate((directory / "ra-new-ca.pem").read_bytes())
    old_ski = door.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert _key_id(ra) != old_ski  # issued by the new CA
    serial = "CP-DOOR-BY-RA"
    _cli(door.home, "device", "add", serial)
    key = make_key()
    body = base64.encodebytes(
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, serial)]
            )
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    deadline = time.monotonic() + 15
    while True:
        response = requests.post(
            f"{door.est_url}/simpleenroll",
            data=body,
            headers={"Content-Type": "application/pkcs10"},
            cert=(str(directory / "ra-new-ca.pem"), str(directory / "ra-new-ca.key")),
            verify=str(door.root),
            timeout=30,
        )
        if response.status_code != 400 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # 400: nginx refused the certificate (its CA not loaded yet)
    assert response.status_code == 200, response.text


def test_front_door_settings_are_checked_and_rendered(tmp_path: Path) -> None:
    """No process: the [front_door] table is validated, and nginx's configuration never caches and always
    sets the client-certificate header itself (empty unless nginx verified a certificate)."""
    from ca.config import load_config
    from ca.errors import ConfigError
    from ca.frontdoor import Site, Tls, render

    for table, message in (
        ('[front_door]\nmode = "haproxy"\n', "front_door.mode must be nginx or direct"),
        ("[front_door]\nconnections_per_address = 0\n", "front_door.connections_per_address must be positive"),
        ("[front_door]\nrate = 1\n", "unknown setting front_door.rate"),
    ):
        (tmp_path / "chargepki.toml").write_text(table)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path, {})
    tls = Tls(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")
    est = render(DOOR, Site("est", "127.0.0.1", 1, tmp_path / "est.sock", 32768, tls), tmp_path)
    ocsp_conf = render(DOOR, Site("ocsp", "::1", 2, tmp_path / "ocsp.sock", 16384), tmp_path)
    for conf in (est, ocsp_conf):
        assert "proxy_cache" not in conf
    assert f'proxy_set_header {CLIENT_CERT_HEADER} "$chargepki_client_cert";' in est
    # The responder gets no client header but the three it reads (so no client certificate header either).
    assert "proxy_pass_request_headers off;" in ocsp_conf and CLIENT_CERT_HEADER not in ocsp_conf
    assert "proxy_pass_request_headers" not in est
    assert "ssl_verify_client optional;" in est and "limit_req zone=rate" in est
    assert "listen [::1]:2;" in ocsp_conf and "limit_req " not in ocsp_conf  # OCSP: no rate limit by default


def test_too_many_connections_from_one_address_get_429_from_the_proxy(door: Door) -> None:
    """connections_per_address (64) requests in progress from 127.0.0.7: the next one from that address
    gets 429, while another address is served. The held bodies trickle a byte every half second, so
    none reaches the body timeout however long the TLS handshakes take on a loaded machine."""
    context = ssl.create_default_context(cafile=str(door.root))
    held: list[ssl.SSLSocket] = []
    lock = threading.Lock()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            with lock:
                for sock in held:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"A")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for _ in range(DOOR.connections_per_address):
            sock = socket.create_connection(("127.0.0.1", door.est.port), timeout=5, source_address=("127.0.0.7", 0))
            tls = context.wrap_socket(sock, server_hostname="localhost")
            tls.sendall(
                b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nA"
            )
            with lock:
                held.append(tls)
        sock = socket.create_connection(("127.0.0.1", door.est.port), timeout=5, source_address=("127.0.0.7", 0))
        with context.wrap_socket(sock, server_hostname="localhost") as extra:
            extra.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = extra.recv(200)
        assert answer.startswith(b"HTTP/1.1 429"), answer
        assert requests.get(f"{door.est_url}/cacerts", verify=str(door.root), timeout=10).status_code == 200
    finally:
        stop.set()
        trickler.join(5)
        for sock in held:
            sock.close()


def _descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _command_line(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def _process_group(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return os.getpgid(pid)
    return None


def test_ctrl_c_stops_the_direct_granian_responder_under_load(door: Door) -> None:
    """`serve ocsp --direct` (granian, 2 workers) answering keep-alive clients gets the terminal's SIGINT
    (the whole process group, as Ctrl-C sends it): it exits by itself with status 0 and leaves no worker.

    Each worker has left the terminal's process group, so only granian's main process gets the SIGINT and
    stops the workers with SIGTERM (a worker that also got the SIGINT under load sometimes never finished
    its graceful stop). A worker that still misses its stop under CPU pressure (granian's own shutdown
    signalling has had such lost wake-ups upstream) is killed after the kill timeout: the stop is bounded
    either way, which is what this specifies, not that no worker is ever killed."""
    server = start_server(door.home, free_port(), workers=2, service="ocsp", process_group=True)
    try:
        deadline = time.monotonic() + 60
        while server.log.read_text(errors="replace").count("Started worker") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        children = _descendants(server.process.pid)  # granian's workers, the metrics exporter, the signer
        main = _command_line(server.process.pid)
        workers = {pid for pid in children if _command_line(pid) == main}  # forked from granian's main
        assert len(workers) == 2, [_command_line(pid) for pid in children]
        while time.monotonic() < deadline and any(_process_group(pid) != pid for pid in workers):
            time.sleep(0.05)
        assert all(_process_group(pid) == pid for pid in workers)  # each worker leads a group of its own
        request = ocsp.OCSPRequestBuilder().add_certificate(door.issuing, door.issuing, hashes.SHA1()).build()
        body = request.public_bytes(serialization.Encoding.DER)
        stop = threading.Event()
        answered = [0]

        def client() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    try:
                        response = session.post(
                            f"http://127.0.0.1:{server.port}/ocsp",
                            data=body,
                            headers={"Content-Type": "application/ocsp-request"},
                            timeout=5,
                        )
                        answered[0] += response.status_code == 200
                    except requests.RequestException:
                        time.sleep(0.05)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for thread in clients:
            thread.start()
        while answered[0] < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answered[0] >= 50  # the workers were busy with keep-alive clients
        os.killpg(server.process.pid, signal.SIGINT)
        try:
            code = server.process.wait(60)
        finally:
            stop.set()
            for thread in clients:
                thread.join(10)
        assert code == 0
        assert not [pid for pid in children if _alive(pid)]
        log = server.log.read_text(errors="replace")
        assert "Granian shutdown completed" in log, log[-2000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def _text_if_any(path: Path) -> str:
    """The file's text, or nothing while it does not exist."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _nginx_workers(home: Path) -> list[int]:
    """uids of the nginx worker processes whose master serves this home."""
    masters = {pid for pid, (command, _) in _processes_of(home).items() if command.startswith("nginx: master")}
    uids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) in masters:
                    status = (entry / "status").read_text()
                    uids.append(int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]))
    return uids


def _as_account(user: str, command: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``command`` run by /bin/sh as ``user`` with its own groups only (as nginx's workers run)."""
    import pwd

    entry = pwd.getpwnam(user)
    result = subprocess.run(
        ["/bin/sh", "-c", command],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        timeout=30,
    )
    assert result.returncode == 0 or not check, result.stderr
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can start nginx with unprivileged workers")
def test_started_as_root_nginx_workers_run_unprivileged_and_logs_are_size_capped(
    token_settings: tuple[Pkcs11Settings, str],
) -> None:
    """As root, nginx's workers run as nobody: they reach the responder's socket and nothing else of the
    home (no listing, no file), and the service works. Its logs are capped (1 MiB here): the supervisor
    moves a full access.log to access.log.1 and nginx logs into a fresh one."""
    import pwd

    base = Path(tempfile.mkdtemp(prefix="chargepki-door-"))
    try:
        base.chmod(0o755)  # like /srv or /var/lib: enterable by everyone
        home = base / "home"
        url = f"sqlite:///{home / 'chargepki.db'}"
        door = replace(DOOR, log_max_megabytes=1)
        write_config(
            Config(home=home, database_url=url, pkcs11=token_settings[0], ocsp=OcspSettings(workers=1), front_door=door)
        )
        Store(url, create=True).upgrade()
        _cli(home, "init", "--org", ORG)
        (home / "pki").mkdir(exist_ok=True)
        (home / "pki" / "hello.pem").write_text("hello\n")
        server = start_server(home, free_port(), workers=1, service="ocsp", direct=False)
        try:
            nobody = pwd.getpwnam("nobody").pw_uid
            assert _nginx_workers(home) and set(_nginx_workers(home)) == {nobody}
            assert "user nobody nogroup;" in (home / "run" / "nginx-ocsp" / "nginx.conf").read_text()
            base_url = f"http://127.0.0.1:{server.port}"
            assert requests.get(f"{base_url}/pki/hello.pem", timeout=10).text == "hello\n"
            # what the worker account can and cannot do in the home
            sock = home / "run" / "ocsp.sock"
            probe = _as_account(
                "nobody", f"curl -sS --fail --unix-socket {sock} http://localhost/pki/hello.pem", check=True
            )
            assert probe.stdout == "hello\n"
            for command in (
                f"ls {home}",
                f"cat {home / 'chargepki.toml'}",
                f"ls {home / 'run'}",
                f"ls {home / 'run' / 'nginx-ocsp'}",
                f"head -c 16 {home / 'chargepki.db'}",
            ):
                assert "Permission denied" in _as_account("nobody", command).stderr, command
            # the size cap: long (404) request lines fill access.log past 1 MiB
            log = home / "run" / "nginx-ocsp" / "access.log"
            rotated = log.parent / "access.log.1"
            deadline = time.monotonic() + 120
            with requests.Session() as session:
                while not rotated.exists() and time.monotonic() < deadline:
                    for _ in range(50):
                        session.get(f"{base_url}/pki/{'x' * 7000}", timeout=10)
                    time.sleep(0.2)
                assert rotated.stat().st_size > 1024 * 1024
                # Between the rename and nginx's reopening (USR1) there is no access.log for a moment.
                while "after-rotation" not in _text_if_any(log) and time.monotonic() < deadline:
                    session.get(f"{base_url}/pki/after-rotation", timeout=10)
                    time.sleep(0.5)
            assert "after-rotation" in _text_if_any(log)
            assert log.stat().st_size < 1024 * 1024
        finally:
            server.stop()
        assert "Traceback" not in server.log.read_text(errors="replace")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_flooding_address_gets_429_while_another_address_is_served(
    tmp_path: Path, token_settings: tuple[Pkcs11Settings, str]
) -> None:
    """The per-address request rate (limit_req, here OCSP's at 5 a second with a burst of 5): one address
    asking 40 times in a row over keep-alive gets 429 from nginx (with Retry-After) once past it, while
    another loopback address asking at the same moment is answered."""
    home = tmp_path / "home"
    url = f"sqlite:///{tmp_path / 'chargepki.db'}"
    door = replace(DOOR, ocsp_requests_per_second=5)
    write_config(
        Config(home=home, database_url=url, pkcs11=token_settings[0], ocsp=OcspSettings(workers=1), front_door=door)
    )
    Store(url, create=True).upgrade()
    (home / "pki").mkdir(parents=True, exist_ok=True)
    (home / "pki" / "crl.pem").write_text("published\n")
    server = start_server(home, free_port(), workers=1, service="ocsp", direct=False, extra=("--no-signer",))

    def ask(connection: http.client.HTTPConnection) -> tuple[int, str, bytes]:
        connection.request("GET", "/pki/crl.pem")
        response = connection.getresponse()
        return response.status, response.getheader("Retry-After") or "", response.read()

    try:
        flood = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.3", 0))
        other = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0))
        answers = [ask(flood) for _ in range(40)]
        refused = [answer for answer in answers if answer[0] == 429]
        assert refused and all(retry == "1" and b"too many" in body for _, retry, body in refused)
        assert answers[0][0] == 200 and {status for status, _, _ in answers} == {200, 429}
        assert ask(other) == (200, "", b"published\n")  # another address, right after the flood
        flood.close()
        other.close()
    finally:
        server.stop()
