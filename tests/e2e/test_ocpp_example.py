"""examples/ocpp_csms, the whole story on loopback: real `chargepki serve est` (EST + CSMS API),
the example CSMS (OCPP 2.0.1 over TLS with client certificates) and the charger simulator.

Chargers enroll at the "factory" over EST, connect with their certificates, get a verified OCSP
response for them through OCPP GetCertificateStatus (the CSMS asks `POST /api/v1/ocsp`) and renew
through OCPP SignCertificate / CertificateSigned; a revoked charger and an impostor (station A's valid
certificate used to connect as station B) are refused before the WebSocket upgrade.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.config import EstSettings, Pkcs11Settings
from ca.store.engine import Store
from cli.main import cli
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import ROOT, make_csr, make_key, write

EXAMPLE = ROOT / "examples" / "ocpp_csms"


@dataclass
class Story:
    home: Path
    tmp: Path
    est: EstServer
    csms_port: int
    csms_log: Path
    root: Path

    def charger(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(EXAMPLE / "charger.py"), *args, "--root", str(self.root)],
            capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def enroll(self, station_id: str) -> Path:
        _cli(self.home, "device", "add", station_id)
        secret = _cli(self.home, "token", "issue", station_id).split()[-1]
        directory = self.tmp / station_id
        done = self.charger(
            "enroll", "--est", f"https://localhost:{self.est.port}/.well-known/est", "--id", station_id,
            "--dir", str(directory), env={"CHARGEPKI_SECRET": secret},  # never on the command line
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return directory

    def connect(self, station_id: str, directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.charger(
            "connect", "--csms", f"wss://localhost:{self.csms_port}/ocpp", "--id", station_id, "--dir", str(directory),
            *extra,
        )  # fmt: skip


def _cli(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def story(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Story]:
    tmp = tmp_path_factory.mktemp(f"ocpp-{request.param}")
    with database(request.param, tmp) as url:
        home = write_home(tmp / "home", url, token_settings[0], EstSettings(default_environment="production"))
        Store(url).upgrade()
        _cli(home, "init", "--org", "Acme Charging")
        chain = _cli(home, "ca", "chain")  # issuing CA, then root
        client_ca = write(tmp / "chain.pem", chain.encode())
        root = write(tmp / "root.pem", _cli(home, "ca", "chain", "--ca", "production-root-1").encode())
        _cli(home, "csms", "add", "example-csms", "--no-certificate")
        api_token = _cli(home, "csms", "token", "example-csms").strip().split()[-1]
        # The CSMS's own TLS certificate (its key is the CSMS's, generated here).
        key = make_key()
        key_file = write(
            tmp / "csms.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        csr = write(tmp / "csms.csr", make_csr("localhost", key=key, dns_names=("localhost",)))
        _cli(home, "issue", "--profile", "csms-server", "--csr", str(csr), "--out", str(tmp / "csms-leaf.pem"))
        issuing = chain.split("-----END CERTIFICATE-----\n")[0] + "-----END CERTIFICATE-----\n"
        server_chain = write(tmp / "csms.pem", (tmp / "csms-leaf.pem").read_bytes() + issuing.encode())
        est = start_server(home, free_port())
        csms_port, csms_log = free_port(), tmp / "csms.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
        csms = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "csms.py"), "--port", str(csms_port), "--cert", str(server_chain),
             "--key", str(key_file), "--client-ca", str(client_ca), "--api", f"https://localhost:{est.port}",
             "--api-token-file", str(write(tmp / "token.txt", api_token.encode())), "--api-ca", str(root)],
            stdout=csms_log.open("wb"), stderr=subprocess.STDOUT, env=environment,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                assert csms.poll() is None, csms_log.read_text()
                try:
                    socket.create_connection(("127.0.0.1", csms_port), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, csms_log.read_text()
                    time.sleep(0.1)
            yield Story(home, tmp, est, csms_port, csms_log, root)
        finally:
            csms.terminate()
            csms.wait(timeout=10)
            est.stop()
        for log in (csms_log, est.log):
            text = log.read_text(errors="replace")
            assert "Traceback" not in text and '" 500 ' not in text, text[-3000:]


def test_a_charger_enrolls_connects_and_renews_through_sign_certificate(story: Story) -> None:
    directory = story.enroll("CP-OCPP-1")
    first = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    connected = story.connect("CP-OCPP-1", directory)
    assert connected.returncode == 0 and "BootNotification Accepted" in connected.stdout, connected.stderr
    assert "GetCertificateStatus Accepted, OCSP says good (signature verified)" in connected.stdout

    renewed = story.connect("CP-OCPP-1", directory, "--renew")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert "SignCertificate Accepted" in renewed.stdout and "installed a new certificate" in renewed.stdout
    second = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    assert second.serial_number != first.serial_number and second.public_key() != first.public_key()
    assert renewed.stdout.count("BootNotification Accepted") == 2  # reconnected with the new certificate
    assert renewed.stdout.count("GetCertificateStatus Accepted, OCSP says good") == 2  # the old one, then the new
    log = story.csms_log.read_text()
    assert "CertificateSigned to CP-OCPP-1: Accepted" in log
    assert f"GetCertificateStatus for CP-OCPP-1: serial {second.serial_number:X} answered" in log
    # The renewal superseded the factory certificate: it no longer opens a connection.
    assert "superseded" in _cli(story.home, "cert", "show", f"{first.serial_number:x}")


def test_an_impostor_and_a_revoked_charger_are_refused_before_the_upgrade(story: Story) -> None:
    genuine = story.enroll("CP-OCPP-A")
    story.enroll("CP-OCPP-B")
    impostor = story.connect("CP-OCPP-A", genuine, "--as", "CP-OCPP-B")
    assert impostor.returncode == 3 and "403" in impostor.stderr and "cn_mismatch" in impostor.stderr, impostor.stderr

    revoked = story.enroll("CP-OCPP-R")
    serial = x509.load_pem_x509_certificate((revoked / "cert.pem").read_bytes()).serial_number
    _cli(story.home, "revoke", f"{serial:x}", "--reason", "keyCompromise")
    refused = story.connect("CP-OCPP-R", revoked)
    assert refused.returncode == 3 and "revoked" in refused.stderr, refused.stderr
    assert "refused CP-OCPP-B: cn_mismatch" in story.csms_log.read_text()


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_get_certificate_status_fails_with_the_ca_s_reason_when_the_api_refuses() -> None:
    csms = _load("csms")

    class RefusingApi:
        def ocsp(self, request_data: dict[str, str]) -> str:
            fields = {"hashAlgorithm", "issuerNameHash", "issuerKeyHash", "serialNumber", "responderURL"}
            assert set(request_data) == fields
            raise csms.Refused("unknown_issuer", "no CA of this installation has these issuer hashes")

    station = csms.Station("CP-X", None, RefusingApi())
    data = {"hash_algorithm": "SHA256", "issuer_name_hash": "00" * 32, "issuer_key_hash": "00" * 32,
            "serial_number": "1", "responder_url": ""}  # fmt: skip
    answer = asyncio.run(station.on_get_certificate_status(ocsp_request_data=data))
    assert answer.status == "Failed" and answer.ocsp_result is None
    assert answer.status_info.reason_code == "unknown_issuer"
