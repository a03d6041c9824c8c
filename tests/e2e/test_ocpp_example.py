"""examples/ocpp_csms, the whole story on loopback: real `chargepki serve est` (EST + CSMS API),
the example CSMS (OCPP 2.1 and 2.0.1 over TLS with client certificates, by WebSocket subprotocol) and
the charger simulators.

Chargers enroll at the "factory" over EST, connect with their certificates, get a verified OCSP
response for them through OCPP GetCertificateStatus (the CSMS asks `POST /api/v1/ocsp`) and renew
through OCPP SignCertificate / CertificateSigned; a revoked charger and an impostor (station A's valid
certificate used to connect as station B) are refused before the WebSocket upgrade. An OCPP 2.1
station installs the roots the CSMS pushes, obtains an ISO 15118-2 and an ISO 15118-20 SECC
certificate (V2GCertificate, V2G20Certificate, with requestId and hashRootCertificate) and checks
both chains with GetCertificateChainStatus.
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
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ca.config import EstSettings, Pkcs11Settings
from ca.store.engine import Store
from cli.main import cli
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import ROOT, make_csr, make_key, oem_root_pem, write

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
        for iso in ("15118-2", "15118-20"):  # both V2G hierarchies, for the OCPP 2.1 station
            _cli(home, "v2g", "init", "--iso", iso, "--org", "Acme Charging", "--country", "DE")
        _cli(home, "csms", "oem-root", "add", str(write(tmp / "oem-root.pem", oem_root_pem())))
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
    assert "connected CP-OCPP-1 (ocpp2.0.1)" in log  # the subprotocol chose the OCPP 2.0.1 handlers
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


def test_an_ocpp_2_1_station_obtains_both_secc_certificates_and_checks_their_chains(story: Story) -> None:
    station = "CP-OCPP21-1"
    directory = story.enroll(station)
    _cli(story.home, "crl", "publish")  # the sub-CAs' status comes from the published CRLs
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "charger21.py"), "--csms", f"wss://localhost:{story.csms_port}/ocpp",
         "--root", str(story.root), "--id", station, "--dir", str(directory), "--secc-id", "DE*ACM*E2100*1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "BootNotification Accepted (OCPP 2.1)" in out
    for kind in ("CSMSRootCertificate", "OEMRootCertificate"):
        assert f"installed {kind}" in out, out
    assert out.count("installed V2GRootCertificate") == 2
    assert "SignCertificate V2GCertificate requestId 1 Accepted" in out
    assert "SignCertificate V2G20Certificate requestId 2 Accepted" in out
    for iso, curve, digest in (("15118-2", "secp256r1", "sha256"), ("15118-20", "secp521r1", "sha512")):
        leaf, *sub_cas = x509.load_pem_x509_certificates((directory / f"secc-{iso}.pem").read_bytes())
        assert leaf.public_key().curve.name == curve  # type: ignore[union-attr]
        assert leaf.signature_hash_algorithm is not None and leaf.signature_hash_algorithm.name == digest
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "DE*ACM*E2100*1"
        assert len(sub_cas) == 2  # Sub-CA 2 and Sub-CA 1; the V2G root is the EV's trust anchor
        assert out.count(f"{iso} chain status ") == 3
        assert f"{iso} chain status {leaf.serial_number:X} by OCSP: Good" in out
    assert out.count(" by CRL: Good") == 4 and "Failed" not in out
    log = story.csms_log.read_text()
    assert f"connected {station} (ocpp2.1)" in log
    assert f"CertificateSigned to {station}: Accepted (V2G20Certificate, requestId 2)" in log
    assert f"GetCertificateChainStatus for {station}: OCSP Good, CRL Good, CRL Good" in log


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


def test_get_certificate_chain_status_answers_every_entry_failed_when_the_api_refuses() -> None:
    csms = _load("csms")

    class RefusingApi:
        def chain_status(self, entries: list[dict[str, object]]) -> list[dict[str, object]]:
            assert set(entries[0]) == {"certificateHashData", "source", "urls"}  # OCPP's names for the API
            assert set(entries[0]["certificateHashData"]) == {  # type: ignore[arg-type]
                "hashAlgorithm", "issuerNameHash", "issuerKeyHash", "serialNumber"
            }  # fmt: skip
            raise csms.Refused("unknown_issuer", "no CA of this installation has these issuer hashes")

    station = csms.Station21("CP-X", None, RefusingApi())
    data = {"hash_algorithm": "SHA256", "issuer_name_hash": "00" * 32, "issuer_key_hash": "00" * 32,
            "serial_number": "1"}  # fmt: skip
    entries = [{"certificate_hash_data": data, "source": source, "urls": ["http://x/"]} for source in ("OCSP", "CRL")]
    answer = asyncio.run(station.on_get_certificate_chain_status(certificate_status_requests=entries))
    assert [entry["status"] for entry in answer.certificate_status] == ["Failed", "Failed"]
    assert [entry["source"] for entry in answer.certificate_status] == ["OCSP", "CRL"]
    assert answer.certificate_status[0]["certificate_hash_data"] == data
    assert datetime.fromisoformat(answer.certificate_status[0]["next_update"]) > datetime.now(UTC)
