"""examples/nginx: Debian's nginx terminating mutual TLS for chargers on loopback, checking
revocation with chargepki's OCSP responder (server A) and with its CRL bundle (server B).

A good charger gets in; a revoked one, one without a certificate and one from a foreign CA do
not; a revocation made while nginx runs is refused through OCSP at once and through the CRL
after the publisher's ``--on-change`` hook has reloaded nginx.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from ca.config import Pkcs11Settings
from ca.store.engine import Store
from cli.main import cli
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import ROOT, make_csr, make_key, write

RUN_SH = ROOT / "examples" / "nginx" / "run.sh"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Gateway:
    home: Path
    work: Path
    root: Path
    port_ocsp: int
    port_crl: int
    ocsp: EstServer


def _cli(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"nginx did not listen on {port}: {log.read_text(errors='replace')}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Gateway]:
    assert os.path.exists(NGINX), "nginx is missing: `make test` installs Debian's nginx-light"
    tmp = tmp_path_factory.mktemp(f"nginx-{request.param}")
    with database(request.param, tmp) as url:
        home = write_home(tmp / "home", url, token_settings[0])
        Store(url).upgrade()
        _cli(home, "init", "--org", "Acme Charging")
        root = write(tmp / "root.pem", _cli(home, "ca", "chain", "--ca", "production-root-1").encode())
        ocsp = start_server(home, free_port(), service="ocsp")
        work = tmp / "nginx"
        port_ocsp, port_crl = free_port(), free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
        environment.update(
            CHARGEPKI=str(Path(sys.executable).with_name("chargepki")),
            CHARGEPKI_HOME=str(home),
            OCSP_URL=f"http://127.0.0.1:{ocsp.port}/ocsp",
            PORT_OCSP=str(port_ocsp),
            PORT_CRL=str(port_crl),
            NGINX=NGINX,
        )
        # A charger revoked before nginx starts: in the first CRL and in the responder's store.
        _charger(home, tmp, "CP-REVOKED-EARLY", revoke=True)
        log = tmp / "run.log"
        process = subprocess.Popen(
            ["bash", str(RUN_SH), str(work)], env=environment, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        try:
            _wait_for_port(port_ocsp, process, log)
            _wait_for_port(port_crl, process, log)
            yield Gateway(home, work, root, port_ocsp, port_crl, ocsp)
        finally:
            process.terminate()
            process.wait(timeout=10)
            ocsp.stop()
        assert "Traceback" not in ocsp.log.read_text(errors="replace")


def _charger(home: Path, directory: Path, cn: str, *, revoke: bool = False) -> tuple[Path, Path, str]:
    key = make_key()
    key_file = write(
        directory / f"{cn}.key",
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    csr = write(directory / f"{cn}.csr", make_csr(cn, key=key))
    cert = directory / f"{cn}.pem"
    output = _cli(home, "issue", "--profile", "charger", "--csr", str(csr), "--out", str(cert))
    serial = output.split("serial ")[1].split()[0]
    if revoke:
        _cli(home, "revoke", serial, "--reason", "keyCompromise")
    return cert, key_file, serial


def _connect(gateway: Gateway, port: int, cert: Path | None = None, key: Path | None = None) -> tuple[int, str]:
    """A charger's TLS connection through curl: (HTTP status, body); nginx answers a refused
    client certificate with 400 after the handshake."""
    client = ["--cert", str(cert), "--key", str(key)] if cert and key else []
    result = subprocess.run(
        ["curl", "-sS", "--cacert", str(gateway.root), *client, "-w", "\n%{http_code}",
         "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def test_a_good_charger_gets_in_through_both_checks(gateway: Gateway) -> None:
    cert, key, _serial = _charger(gateway.home, gateway.work, "CP-GOOD")
    for port in (gateway.port_ocsp, gateway.port_crl):
        status, body = _connect(gateway, port, cert, key)
        assert status == 200 and "CN=CP-GOOD" in body and "verify: SUCCESS" in body, body


def test_revoked_missing_and_foreign_certificates_are_refused(gateway: Gateway, tmp_path: Path) -> None:
    revoked = (gateway.home.parent / "CP-REVOKED-EARLY.pem", gateway.home.parent / "CP-REVOKED-EARLY.key")
    key = make_key()
    key_file = write(
        tmp_path / "foreign.key",
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    foreign = tmp_path / "foreign.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-key", str(key_file), "-subj", "/O=Acme Charging/CN=CP-GOOD", "-days", "1",
         "-out", str(foreign)],
        check=True, capture_output=True,
    )  # fmt: skip
    for port in (gateway.port_ocsp, gateway.port_crl):
        assert _connect(gateway, port, *revoked)[0] == 400
        assert _connect(gateway, port)[0] == 400
        assert _connect(gateway, port, foreign, key_file)[0] == 400
    errors = (gateway.work / "error.log").read_text(errors="replace")
    assert "certificate revoked" in errors  # the CRL server's refusal, in nginx's words


def test_a_revocation_while_running_is_refused_by_ocsp_at_once_and_by_crl_after_reload(gateway: Gateway) -> None:
    cert, key, serial = _charger(gateway.home, gateway.work, "CP-LATE")
    assert _connect(gateway, gateway.port_ocsp, cert, key)[0] == 200
    assert _connect(gateway, gateway.port_crl, cert, key)[0] == 200
    _cli(gateway.home, "revoke", serial, "--reason", "keyCompromise")
    time.sleep(1)  # the responder's propagation bound; nginx keeps no OCSP cache here
    assert _connect(gateway, gateway.port_ocsp, cert, key)[0] == 400
    assert _connect(gateway, gateway.port_crl, cert, key)[0] == 200  # nginx still holds the old CRL
    reload = f"{NGINX} -e {gateway.work / 'error.log'} -p {gateway.work} -c {gateway.work / 'nginx.conf'} -s reload"
    _cli(gateway.home, "crl", "publish", "--dir", str(gateway.work / "pki"), "--on-change", reload)
    deadline = time.monotonic() + 10
    while _connect(gateway, gateway.port_crl, cert, key)[0] != 400:
        assert time.monotonic() < deadline, "nginx did not pick up the new CRL after the reload"
        time.sleep(0.2)
