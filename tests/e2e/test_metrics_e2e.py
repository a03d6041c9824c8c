"""Metrics end to end: `chargepki serve est` and `serve ocsp` (two workers each) and `crl publish --watch`
in their own processes on loopback, scraped by a plain HTTP client on their metrics listeners and parsed
with prometheus_client's parser. The counts must match what the test did, summed over both workers of
each service (multiprocess mode), on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from prometheus_client.parser import text_string_to_metric_families

from ca.config import Config, EstSettings, MetricsSettings, Pkcs11Settings, load_config, write_config
from ca.store.engine import Store
from cli.main import cli
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server
from tests.fault_helpers import certificate_of, children, csr_body, enroll, register, service_environment

ORG = "Acme Charging"
ROOT = Path(__file__).resolve().parent.parent.parent
LABELS = {"route": "enroll", "environment": "production", "profile": "charger"}


def _cli(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@dataclass
class Services:
    home: Path
    store: Store
    est: EstServer
    ocsp: EstServer
    crl: subprocess.Popen[bytes]
    root: Path
    issuing: x509.Certificate
    metrics: MetricsSettings
    pin: str
    secrets: list[str]

    def scrape(self, service: str) -> Exposition:
        return scrape(self.metrics.port(service))

    def register(self, *serials: str) -> dict[str, str]:
        issued = register(self.store, serials)
        self.secrets += issued.values()
        return issued


class Exposition:
    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(
            sample.value
            for family in self.families.values()
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def names(self) -> set[str]:
        """Every name a query may use: families, and their samples' names (``_total``, ``_bucket`` …)."""
        found = set(self.families)
        for family in self.families.values():
            found |= {sample.name for sample in family.samples}
            if family.type == "counter":
                found.add(family.name + "_total")
            if family.type == "histogram":
                found |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        return found


def scrape(port: int) -> Exposition:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return Exposition(response.text)


def _wait_for_port(port: int, alive: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert alive(), "the service stopped"
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def _until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def services(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp(f"metrics-{request.param}")
    with database(request.param, tmp) as url:
        home = tmp / "home"
        metrics = MetricsSettings(est_port=free_port(), ocsp_port=free_port(), crl_port=free_port(), cache_seconds=0)
        write_config(
            Config(
                home=home,
                database_url=url,
                pkcs11=token_settings[0],
                est=EstSettings(default_environment="production"),
                metrics=metrics,
            )
        )
        store = Store(url)
        store.upgrade()
        _cli(home, "init", "--org", ORG)
        chain = _cli(home, "ca", "chain").split("-----END CERTIFICATE-----\n")
        root = tmp / "root.pem"
        root.write_text(chain[1] + "-----END CERTIFICATE-----\n")
        issuing = x509.load_pem_x509_certificate((chain[0] + "-----END CERTIFICATE-----\n").encode())
        # What an earlier run left in the multiprocess directory is not this run's.
        stale = home / "run" / "metrics-est"
        stale.mkdir(parents=True)
        (stale / "counter_999999.db").write_bytes(b"left over")
        est = start_server(home, free_port(), workers=2)
        responder = start_server(home, free_port(), workers=2, service="ocsp")
        log = (home / "crl.log").open("wb")
        crl = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "--home", str(home), "crl", "publish", "--watch"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=service_environment(),
            cwd=ROOT,
        )
        try:
            for service, process in (("est", est.process), ("ocsp", responder.process), ("crl", crl)):
                _wait_for_port(metrics.port(service), lambda p=process: p.poll() is None)
            yield Services(home, store, est, responder, crl, root, issuing, metrics, token_settings[1], [])
        finally:
            crl.terminate()
            crl.wait(15)
            responder.stop()
            est.stop()
            store.dispose()
        for server in (est, responder):
            text = server.log.read_text(errors="replace")
            assert "Traceback" not in text, text[-3000:]


def _ocsp_request(certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _post_ocsp(services: Services, body: bytes) -> ocsp.OCSPResponse:
    response = requests.post(
        f"http://127.0.0.1:{services.ocsp.port}/ocsp",
        data=body,
        headers={"Content-Type": "application/ocsp-request"},
        timeout=10,
    )
    assert response.status_code == 200
    return ocsp.load_der_ocsp_response(response.content)


def _enrolled(services: Services, serial: str) -> x509.Certificate:
    secret = services.register(serial)[serial]
    response = enroll(services.est.port, serial, secret, services.root)
    return certificate_of(response)


# -- counts ------------------------------------------------------------------------------------------
def test_enrollments_and_refusals_are_counted_by_route_environment_profile_and_code(services: Services) -> None:
    before = services.scrape("est")
    serials = [f"CP-M-{services.est.port}-{i}" for i in range(4)]
    secrets = services.register(*serials)
    for serial in serials[:3]:
        assert enroll(services.est.port, serial, secrets[serial], services.root).status_code == 200
    wrong = enroll(services.est.port, serials[3], "not-the-secret", services.root)
    assert wrong.status_code == 401, wrong.text
    mismatch = enroll(services.est.port, serials[3], secrets[serials[3]], services.root, body=csr_body("CP-OTHER"))
    assert mismatch.status_code in (400, 403), mismatch.text
    after = services.scrape("est")

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("chargepki_enrollments_total", **LABELS) == 3
    assert delta("chargepki_enrollment_refusals_total", **LABELS, code="unauthenticated") == 1
    assert delta("chargepki_enrollment_refusals_total", **LABELS) == 2
    codes = {
        sample.labels["code"]
        for sample in after.families["chargepki_enrollment_refusals"].samples
        if sample.name.endswith("_total") and delta(sample.name, **sample.labels) == 1
    }
    assert codes == {"unauthenticated", "cn_mismatch"}, codes
    assert delta("chargepki_issuance_seconds_count", profile="charger") == 3
    assert delta("chargepki_token_sign_seconds_count") >= 3  # one signature each (plus their OCSP responses)
    rule = "/.well-known/est/simpleenroll"
    assert delta("chargepki_http_requests_total", route=rule, method="POST", status="200") == 3
    assert delta("chargepki_http_requests_total", route=rule, method="POST", status="401") == 1


def test_requests_of_both_workers_are_summed(services: Services) -> None:
    """Connections spread over gunicorn's two workers: each writes its own file, the listener sums them."""
    directory = services.home / "run" / "metrics-est"
    assert not (directory / "counter_999999.db").exists(), "the directory is emptied at start"
    url = f"https://localhost:{services.est.port}/.well-known/est/cacerts"
    before = services.scrape("est").value("chargepki_http_requests_total", route="/.well-known/est/cacerts")
    sent = 0
    workers = children(services.est.process.pid)
    assert len(workers) == 2

    def writers() -> set[int]:
        return {int(p.stem.rsplit("_", 1)[1]) for p in directory.glob("counter_*.db")} & set(workers)

    def get(_: int) -> int:
        return requests.get(url, verify=str(services.root), timeout=10).status_code

    for _burst in range(10):  # a burst of concurrent connections reaches both workers almost surely
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(get, range(40))) == {200}
        sent += 40
        if len(writers()) == 2:
            break
    assert len(writers()) == 2, "both workers answered and counted"
    after = services.scrape("est").value("chargepki_http_requests_total", route="/.well-known/est/cacerts")
    assert after - before == sent


def test_ocsp_requests_by_status_and_source(services: Services) -> None:
    certificate = _enrolled(services, f"CP-OCSP-{services.est.port}")
    time.sleep(1.0)  # the responders' watchers saw the enrollment's status change (their caches emptied)
    before = services.scrape("ocsp")
    body = _ocsp_request(certificate, services.issuing)
    for _ in range(10):
        assert _post_ocsp(services, body).certificate_status == ocsp.OCSPCertStatus.GOOD
    # An unknown serial of a served CA: signed on demand, status "unknown".
    request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        _issuer_name_hash(services.issuing), _issuer_key_hash(services.issuing), 0x1234, hashes.SHA1()
    )
    unknown_body = request.build().public_bytes(serialization.Encoding.DER)
    assert _post_ocsp(services, unknown_body).certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    assert _post_ocsp(services, b"\x30\x03\x02\x01\x01").response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    after = services.scrape("ocsp")

    def delta(**labels: str) -> float:
        return after.value("chargepki_ocsp_requests_total", **labels) - before.value(
            "chargepki_ocsp_requests_total", **labels
        )

    assert delta(status="successful", source="store") + delta(status="successful", source="cache") == 10
    assert delta(status="successful", source="store") >= 1
    if services.store.is_sqlite:
        # Each of the two workers reads the store once, then answers from its memory. (On PostgreSQL
        # every schema of the shared test database NOTIFYs on the same channel: other tests' status
        # changes empty these responders' caches at any moment.)
        assert delta(status="successful", source="cache") >= 5
    assert delta(status="successful", source="signer") == 1
    assert delta(status="malformed_request", source="none") == 1
    assert delta() == 12


def _issuer_name_hash(issuer: x509.Certificate) -> bytes:
    digest = hashes.Hash(hashes.SHA1())
    digest.update(issuer.subject.public_bytes())
    return digest.finalize()


def _issuer_key_hash(issuer: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest


def test_store_derived_values(services: Services) -> None:
    est = services.scrape("est")
    # The OCSP signers (30 days) and the EST service's own certificate (90 days) need renewing soonest.
    assert est.value("chargepki_certificates_expiring", environment="production", profile="ocsp-signer", days="30") == 2
    assert est.value("chargepki_certificates_expiring", profile="ocsp-signer", days="7") == 0
    assert est.value("chargepki_certificates_expiring", profile="csms-server", days="90") == 1
    assert est.value("chargepki_certificates_expiring", profile="charger", days="90") == 0
    assert est.value("chargepki_token_up", token=load_config(services.home, {}).pkcs11.token_label) == 1
    assert est.value("chargepki_store_up") == 1
    ocsp_side = services.scrape("ocsp")
    remaining = ocsp_side.value("chargepki_ocsp_response_min_remaining_seconds")
    assert 11 * 3600 < remaining <= 24 * 3600
    assert ocsp_side.value("chargepki_token_up") == 1  # checked by the signer: the responder holds no token
    crl = services.scrape("crl")
    for ca in ("production-root-1", "production-issuing-1"):
        assert crl.value("chargepki_crl_number", ca=ca, environment="production") > 1_700_000_000
        assert 0 <= crl.value("chargepki_crl_age_seconds", ca=ca) < 600
        assert crl.value("chargepki_crl_size_bytes", ca=ca) == (services.home / "pki" / f"{ca}.crl").stat().st_size
        assert 6 * 86400 < crl.value("chargepki_crl_remaining_seconds", ca=ca) <= 7 * 86400
    assert crl.value("chargepki_token_up") == 1


def test_a_lockout_is_counted(services: Services) -> None:
    serial = f"CP-LOCK-{services.est.port}"
    services.register(serial)
    assert services.scrape("est").value("chargepki_auth_lockouts", kind="device") == 0
    codes = [enroll(services.est.port, serial, f"wrong-{i}", services.root).status_code for i in range(6)]
    assert codes == [401] * 5 + [429]
    after = services.scrape("est")
    assert after.value("chargepki_auth_lockouts", kind="device") == 1
    refused = after.value("chargepki_enrollment_refusals_total", **LABELS, code="rate_limited")
    assert refused >= 1


# -- the listener ------------------------------------------------------------------------------------
def test_a_stalled_scraper_holds_nothing_but_its_own_connection(services: Services) -> None:
    """Scrapers that stop mid-request or never read: EST, OCSP and other scrapes are answered meanwhile."""
    held = []
    for service in ("est", "ocsp"):
        for partial in (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"):
            sock = socket.create_connection(("127.0.0.1", services.metrics.port(service)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.sendall(partial)  # then neither finish the request nor read the answer
            held.append(sock)
    try:
        started = time.monotonic()
        cacerts = requests.get(
            f"https://localhost:{services.est.port}/.well-known/est/cacerts", verify=str(services.root), timeout=5
        )
        assert cacerts.status_code == 200
        health = requests.get(f"http://127.0.0.1:{services.ocsp.port}/healthz", timeout=5)
        assert health.status_code == 200
        for service in ("est", "ocsp", "est"):
            assert services.scrape(service).value("chargepki_store_up") == 1
        assert time.monotonic() - started < 5
    finally:
        for sock in held:
            sock.close()


def test_the_listener_is_loopback_only_and_not_on_the_service_ports(services: Services) -> None:
    assert MetricsSettings().address == "127.0.0.1"
    assert services.metrics.address == "127.0.0.1"
    for url in (
        f"https://localhost:{services.est.port}/metrics",
        f"https://localhost:{services.est.port}/.well-known/est/metrics",
    ):
        assert requests.get(url, verify=str(services.root), timeout=10).status_code == 404
    assert requests.get(f"http://127.0.0.1:{services.ocsp.port}/metrics", timeout=10).status_code == 404
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    for service in ("est", "ocsp", "crl"):
        with pytest.raises(OSError), socket.create_connection((address, services.metrics.port(service)), timeout=3):
            pass


def _non_loopback_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent by a UDP connect
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_no_secret_or_pin_in_any_exposition_or_the_keyless_listener(services: Services) -> None:
    texts = [services.scrape(service).text for service in ("est", "ocsp", "crl")]
    assert services.secrets and services.pin
    for text in texts:
        assert services.pin not in text
        for secret in services.secrets:
            assert secret not in text
        assert "not-the-secret" not in text and "wrong-" not in text
        assert not re.search(r'="[0-9A-F]{30,40}"', text), "no serial in a label"
    for server in (services.est, services.ocsp):  # the listeners sign nothing: they never see the PIN
        children_of = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        listeners = [int(pid) for pid in children_of.read_text().split() if _is_listener(int(pid))]
        assert len(listeners) == 1
        assert services.pin.encode() not in Path(f"/proc/{listeners[0]}/environ").read_bytes()


def _is_listener(pid: int) -> bool:
    try:
        return b"metrics.exporter" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# -- workers coming and going --------------------------------------------------------------------------
def test_a_worker_that_exits_leaves_the_live_sums_and_its_counts_stay(services: Services) -> None:
    directory = services.home / "run" / "metrics-est"
    before = services.scrape("est")
    total = before.value("chargepki_http_requests_total")
    live = {int(p.stem.rsplit("_", 1)[1]) for p in directory.glob("gauge_livesum_*.db")}
    worker = next(pid for pid in children(services.est.process.pid) if pid in live)
    os.kill(worker, signal.SIGTERM)  # gunicorn's child_exit hook: mark_process_dead
    _until(lambda: not (directory / f"gauge_livesum_{worker}.db").exists(), "the worker's live gauges to go")
    _until(lambda: len(children(services.est.process.pid)) == 2, "gunicorn to start another worker")
    after = services.scrape("est")
    assert after.value("chargepki_http_requests_total") >= total  # what the worker counted is kept
    assert after.value("chargepki_http_requests_in_flight") >= 0
    # A granian worker killed outright: what it counted stays in the sums, the scrapes go on.
    ocsp_directory = services.home / "run" / "metrics-ocsp"
    for _ in range(4):
        _post_ocsp(services, b"\x30\x03\x02\x01\x01")
    counted = services.scrape("ocsp").value("chargepki_ocsp_requests_total")
    responders = [int(p.stem.rsplit("_", 1)[1]) for p in ocsp_directory.glob("counter_*.db")]
    victim = next(pid for pid in responders if _alive(pid))
    os.kill(victim, signal.SIGKILL)
    _until(lambda: not _alive(victim), "the responder worker to die")
    _until(lambda: _answers(services), "the responder to answer again")
    assert services.scrape("ocsp").value("chargepki_ocsp_requests_total") >= counted


def _answers(services: Services) -> bool:
    try:
        return _post_ocsp(services, b"\x30\x03\x02\x01\x01").response_status is not None
    except (AssertionError, requests.RequestException):
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- the documents -------------------------------------------------------------------------------------
def test_the_alert_rules_and_the_dashboard_use_only_metrics_the_services_expose(services: Services) -> None:
    # Make sure every instrument has a value: a refusal, an enrollment, an OCSP answer.
    serial = f"CP-DOCS-{services.est.port}"
    secret = services.register(serial)[serial]
    assert enroll(services.est.port, serial, "wrong", services.root).status_code == 401
    assert enroll(services.est.port, serial, secret, services.root).status_code == 200
    _post_ocsp(services, b"\x30\x03\x02\x01\x01")
    exposed = set().union(*(services.scrape(service).names() for service in ("est", "ocsp", "crl")))
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text(encoding="utf-8"))
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert {rule["alert"] for group in rules["groups"] for rule in group["rules"]} >= {
        "ChargepkiOcspResponsesExpiring",
        "ChargepkiCrlStale",
        "ChargepkiTokenDown",
        "ChargepkiEnrollmentRefusalsSpiking",
        "ChargepkiCertificatesExpiringUnrenewed",
    }
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expression in expressions for name in re.findall(r"\bchargepki_[a-z0-9_]+", expression)}
    assert used and used <= exposed, sorted(used - exposed)
    documented = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    families = {
        name + ("_total" if family.type == "counter" else "")
        for service in ("est", "ocsp", "crl")
        for name, family in services.scrape(service).families.items()
        if name.startswith("chargepki_")
    }
    assert all(f"`{name}`" in documented for name in families), [n for n in families if f"`{n}`" not in documented]
