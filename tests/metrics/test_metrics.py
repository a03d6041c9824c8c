"""The metrics' parts without servers: settings, the core's observer, the store queries (SQLite and
PostgreSQL), the published CRLs, the multiprocess sums and the OCSP answers' status."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ca import observe
from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for
from ca.authorities.rotation import rotate_issuing_ca
from ca.config import CONFIG_NAME, load_config
from ca.enrollment.auth_limits import AuthLimits, record_failure, request_keys
from ca.enrollment.pipeline import Credentials, enroll, reenroll
from ca.errors import AuthenticationError, ConfigError, TokenError
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.campaigns import start_campaign
from ca.registry.devices import add_device
from ca.registry.secrets import issue_secret
from ca.store.engine import Store
from ca.store.models import CampaignDevice, Certificate, OcspResponse
from ca.work import Work
from crl.publisher import publish_crl
from metrics import instruments as instruments_module
from metrics.instruments import Recorder, configure, instruments, watch_token
from metrics.listener import Workers, bind, prepare_directory
from metrics.store import (
    CrlFiles,
    StoreCollector,
    active_lockouts,
    environments,
    expiring_certificates,
    ocsp_least_remaining,
    open_campaigns,
)
from ocsp.presign import Presigner
from ocsp.responder import MALFORMED, TRY_LATER_ANSWER, UNAUTHORIZED_ANSWER, Answer
from ocsp.signing import INTERNAL_ERROR
from tests.helpers import make_csr, make_key


# -- settings --------------------------------------------------------------------------------------
def _config(tmp_path: Path, table: str):  # type: ignore[no-untyped-def]
    (tmp_path / CONFIG_NAME).write_text(table, encoding="utf-8")
    return load_config(tmp_path, {})


def test_metrics_settings_default_to_loopback_and_distinct_ports(tmp_path: Path) -> None:
    settings = load_config(tmp_path, {}).metrics
    assert (settings.enabled, settings.address) == (True, "127.0.0.1")
    assert (settings.port("est"), settings.port("ocsp"), settings.port("crl")) == (9810, 9811, 9812)
    changed = _config(tmp_path, "[metrics]\nenabled = false\nocsp_port = 9900\ncache_seconds = 0\n").metrics
    assert (changed.enabled, changed.ocsp_port, changed.cache_seconds) == (False, 9900, 0)


@pytest.mark.parametrize(
    "table, message",
    [
        ("port = 1", "unknown setting metrics.port"),
        ('est_port = "9810"', "metrics.est_port must be of type int"),
        ("est_port = 9811", "must differ"),
        ("crl_port = 70000", "between 1 and 65535"),
        ("cache_seconds = -1", "cache_seconds"),
        ('address = ""', "address"),
    ],
)
def test_bad_metrics_settings_are_refused_by_name(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, f"[metrics]\n{table}\n")


def test_a_port_in_use_is_reported_and_the_service_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = load_config(Path("/nonexistent"), {}).metrics
        assert bind(replace(settings, est_port=taken.getsockname()[1]), "est") is None
    assert "runs without metrics" in capsys.readouterr().err


# -- the core's observer -------------------------------------------------------------------------------
class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[object, ...]]] = []

    def enrollment(self, *args: object) -> None:
        self.seen.append(("enrollment", args))

    def issued(self, *args: object) -> None:
        self.seen.append(("issued", args))

    def signed(self, *args: object) -> None:
        self.seen.append(("signed", args))


class Broken:
    def enrollment(self, *_: object) -> None:
        raise RuntimeError("observer bug")

    issued = signed = enrollment


@pytest.fixture
def events() -> Iterator[Events]:
    seen, broken = Events(), Broken()
    observe.register(broken)  # a failing observer is logged, never the request's failure
    observe.register(seen)
    try:
        yield seen
    finally:
        observe.unregister(seen)
        observe.unregister(broken)


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def _work(session: Session, token: Token, status: Presigner) -> Work:
    return Work(session, "test", status=status, issuers=lambda authority: issuer_for(authority, token))


def test_the_pipeline_reports_enrollments_and_refusals_with_their_codes(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, events: Events
) -> None:
    device = add_device(Work(session, "test"), serial="CP-OBS")
    secret = issue_secret(Work(session, "test"), device=device)
    with pytest.raises(AuthenticationError):
        enroll(
            _work(session, token, status),
            authority=hierarchy.issuing,
            csr=_der(make_csr("CP-OBS")),
            credentials=Credentials(username="CP-OBS", password="wrong"),
        )
    enroll(
        _work(session, token, status),
        authority=hierarchy.issuing,
        csr=_der(make_csr("CP-OBS")),
        credentials=Credentials(username="CP-OBS", password=secret),
    )
    outcomes = [args for kind, args in events.seen if kind == "enrollment"]
    assert outcomes == [
        ("enroll", "production", "charger", "unauthenticated"),
        ("enroll", "production", "charger", None),
    ]
    issued = [args for kind, args in events.seen if kind == "issued"]
    assert len(issued) == 1 and issued[0][0] == "charger" and 0 < issued[0][1] < 60
    signed = [args for kind, args in events.seen if kind == "signed"]
    assert signed and all(isinstance(m, str) and 0 < s < 60 for m, s in signed)  # certificate + OCSP response


def test_the_token_check_is_a_round_trip(token: Token) -> None:
    token.check()
    assert token.health.failure is None


def test_a_signing_process_checks_its_token_from_a_thread(token: Token) -> None:
    configure(None)
    tokens: list[Token | None] = [token]

    def current() -> Token:
        if tokens[0] is None:
            raise TokenError("token 't' became unavailable: gone")
        return tokens[0]

    watch_token("t-watch", current, every=0.05)
    gauge = instruments().token_up.labels("t-watch")
    _until(lambda: gauge._value.get() == 1)
    tokens[0] = None
    _until(lambda: gauge._value.get() == 0)
    tokens[0] = token
    _until(lambda: gauge._value.get() == 1)


def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_recorder_counts_into_its_process(tmp_path: Path) -> None:
    configure(None)
    parts = instruments()
    recorder = Recorder()
    before = parts.refusals.labels("relayed", "staging", "charger", "cn_mismatch")._value.get()
    recorder.enrollment("relayed", "staging", "charger", "cn_mismatch")
    recorder.enrollment("relayed", "staging", "charger", None)
    recorder.issued("charger", 0.02)
    recorder.signed("ECDSA", 0.001)
    assert parts.refusals.labels("relayed", "staging", "charger", "cn_mismatch")._value.get() == before + 1
    registry = CollectorRegistry()
    parts.register(registry)
    names = {family.name for family in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {"chargepki_enrollments", "chargepki_issuance_seconds", "chargepki_token_sign_seconds"} <= names


# -- the multiprocess sums -----------------------------------------------------------------------------
def test_two_processes_are_summed_and_a_dead_ones_live_gauge_is_swept(tmp_path: Path) -> None:
    directory = tmp_path / "metrics-est"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left by an earlier run")
    prepare_directory(directory)
    assert list(directory.iterdir()) == [], "emptied at start"
    pids = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker: counts three enrollments, stays in flight, exits without its hook
            os.close(read)
            try:
                configure(directory)
                recorder = Recorder()
                for _ in range(3):
                    recorder.enrollment("enroll", "production", "charger", None)
                instruments().in_flight.labels("est").inc()
                os.write(write, b"x")
            finally:
                os._exit(0)
        os.close(write)
        assert os.read(read, 1) == b"x"
        os.close(read)
        os.waitpid(pid, 0)
        pids.append(pid)
    assert {f"counter_{pid}.db" for pid in pids} <= {p.name for p in directory.iterdir()}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Workers(directory))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    (enrollments,) = [s for s in families["chargepki_enrollments"].samples if s.name.endswith("_total")]
    assert enrollments.value == 6 and enrollments.labels == {
        "route": "enroll",
        "environment": "production",
        "profile": "charger",
    }
    # Both exited: the scrape swept their live gauges (mark_process_dead), the counts stay.
    assert not list(directory.glob("gauge_livesum_*.db"))
    in_flight = families.get("chargepki_http_requests_in_flight")
    assert in_flight is None or sum(sample.value for sample in in_flight.samples) == 0
    configure(None)


def test_configure_switches_this_process_between_memory_and_a_directory(tmp_path: Path) -> None:
    configure(tmp_path)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
    assert instruments_module.multiprocess_directory() == tmp_path
    configure(None)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ and instruments_module.multiprocess_directory() is None


# -- OCSP answers --------------------------------------------------------------------------------------
def test_the_answer_status_is_read_from_the_response(session: Session, hierarchy: Hierarchy, status: Presigner) -> None:
    assert MALFORMED.status == "malformed_request"
    assert UNAUTHORIZED_ANSWER.status == "unauthorized"
    assert TRY_LATER_ANSWER.status == "try_later"
    assert Answer(INTERNAL_ERROR).status == "internal_error"
    assert Answer(b"").status == "unknown" and Answer(b"\x30\x03\x02\x01\x00").status == "unknown"
    (stored,) = session.scalars(select(OcspResponse.der).limit(1))
    assert Answer(stored, source="store").status == "successful"  # a long-form length (a real response)


# -- the store ----------------------------------------------------------------------------------------
def _issue(
    session: Session,
    token: Token,
    status: Presigner,
    hierarchy: Hierarchy,
    cn: str,
    days: float,
    profile: str = "charger",
) -> Certificate:
    request = IssueRequest(get_profile(profile), make_key().public_key(), cn, validity=timedelta(days=days))
    return issue(Work(session, "test", status=status), issuer=issuer_for(hierarchy.issuing, token), request=request)


def test_expiring_certificates_per_environment_and_profile(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    for i, days in enumerate((3, 20, 60, 400)):
        _issue(session, token, status, hierarchy, f"CP-EXP-{i}", days)
    renewed = _issue(session, token, status, hierarchy, "CP-EXP-R", 5)
    session.execute(update(Certificate).where(Certificate.id == renewed.id).values(revoke_after=datetime.now(UTC)))
    session.commit()
    now = datetime.now(UTC)
    counts = expiring_certificates(session, now, environments(session))
    assert counts[("production", "charger")] == [1, 2, 3]  # the renewed one (revoke_after set) left out
    assert counts[("production", "ocsp-signer")] == [0, 2, 2]  # the two delegated signers (30 days)
    later = expiring_certificates(session, now + timedelta(days=30), environments(session))
    assert later[("production", "charger")] == [0, 1, 1]


def test_active_lockouts_per_kind(session: Session) -> None:
    limits = AuthLimits(max_failures_per_device=2)
    now = datetime.now(UTC)
    keys = request_keys("CP-LOCKED", True, None, "192.0.2.7")
    for _ in range(2):
        record_failure(session, limits, keys, actor="test", now=now, address="192.0.2.7")
    session.commit()
    counts = active_lockouts(session, now)
    assert counts["device"] == 1 and counts["address"] == 0 and set(counts) >= {"cert", "token", "csmscert"}
    assert active_lockouts(session, now + timedelta(hours=1))["device"] == 0


def test_ocsp_least_remaining_skips_responses_of_expired_certificates(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    now = datetime.now(UTC)
    remaining = ocsp_least_remaining(session, now)
    assert remaining is not None and 23 * 3600 < remaining <= 24 * 3600  # just signed, 24 h
    leaf = _issue(session, token, status, hierarchy, "CP-OLD", 400)
    # The leaf expired an hour ago; its response, no longer refreshed, runs out in 2 h, then lies in the past.
    session.execute(update(Certificate).where(Certificate.id == leaf.id).values(not_after=now - timedelta(hours=1)))
    responses = update(OcspResponse).where(OcspResponse.serial == leaf.serial)
    session.execute(responses.values(next_update=now + timedelta(hours=2)))
    session.commit()
    assert ocsp_least_remaining(session, now) > 23 * 3600
    session.execute(responses.values(next_update=now - timedelta(days=30)))
    session.commit()
    assert ocsp_least_remaining(session, now) > 23 * 3600
    # A current certificate whose response the refresher left to age is what the value shows.
    stale = _issue(session, token, status, hierarchy, "CP-STALE", 400)
    session.execute(
        update(OcspResponse).where(OcspResponse.serial == stale.serial).values(next_update=now + timedelta(hours=3))
    )
    session.commit()
    assert 2.9 * 3600 < ocsp_least_remaining(session, now) <= 3 * 3600
    # Every current response older than the lookback: the plain minimum (at least that old) is reported.
    session.execute(update(OcspResponse).values(next_update=now - timedelta(days=2)))
    session.commit()
    assert ocsp_least_remaining(session, now) == -2 * 86400


def test_campaign_progress_is_read_without_enlisting(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    certificates = {}
    for serial in ("CP-C1", "CP-C2"):
        device = add_device(Work(session, "test"), serial=serial)
        secret = issue_secret(Work(session, "test"), device=device)
        key = make_key()
        certificates[serial] = (
            enroll(
                _work(session, token, status),
                authority=hierarchy.issuing,
                csr=_der(make_csr(serial, key=key)),
                credentials=Credentials(username=serial, password=secret),
            ),
            key,
        )
    work = Work(session, "test", status=status, token=token)
    rotation = rotate_issuing_ca(work, environment="production")
    start_campaign(Work(session, "test"), from_ca=hierarchy.issuing.name)
    first, key = certificates["CP-C1"]
    reenroll(
        _work(session, token, status),
        authority=rotation.issuing,
        csr=_der(make_csr("CP-C1", key=key)),
        credentials=Credentials(client_certificate=first.der),
    )
    members = session.scalar(select(func.count()).select_from(CampaignDevice))
    (found,) = open_campaigns(session, datetime.now(UTC))
    assert found[1] == {"reenrolled": 1, "pending": 1, "failed": 0}
    assert session.scalar(select(func.count()).select_from(CampaignDevice)) == members == 2


def test_published_crls_and_a_missing_one(
    session: Session, hierarchy: Hierarchy, token: Token, tmp_path: Path, store: Store
) -> None:
    now = datetime.now(UTC)
    published = publish_crl(session, issuer_for(hierarchy.issuing, token), hierarchy.issuing, tmp_path, now=now)
    files = CrlFiles(tmp_path)
    facts = files.facts(hierarchy.issuing.name, "production")
    assert facts.number == published.number and facts.size == published.path.stat().st_size
    assert facts.this_update == now.replace(microsecond=0)
    assert files.facts(hierarchy.issuing.name, "production") is facts  # parsed once per version
    reader = Store(store.url.render_as_string(hide_password=False), read_only=True)
    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StoreCollector("crl", reader, cache_seconds=60, publication_dir=tmp_path))
        text = generate_latest(registry).decode()
    finally:
        reader.dispose()
    samples = {(s.name, s.labels.get("ca")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("chargepki_crl_number", hierarchy.issuing.name)] == published.number
    assert samples[("chargepki_crl_age_seconds", hierarchy.root.name)] == math.inf  # the root's was never published
    assert ("chargepki_crl_number", hierarchy.root.name) not in samples
    assert samples[("chargepki_store_up", None)] == 1


def test_the_store_collector_caches_and_says_when_the_store_is_away(tmp_path: Path) -> None:
    gone = Store(f"sqlite:///{tmp_path / 'missing.db'}", read_only=True)
    registry = CollectorRegistry(auto_describe=False)
    collector = StoreCollector("est", gone, cache_seconds=3600)
    registry.register(collector)
    first = generate_latest(registry)
    assert b"chargepki_store_up 0.0" in first
    assert (
        generate_latest(registry).split(b"chargepki_metrics_collect_seconds")[1]
        == first.split(b"chargepki_metrics_collect_seconds")[1]
    ), "within cache_seconds the same computation is served"
    gone.dispose()


# -- the documents -------------------------------------------------------------------------------------
def test_the_alert_rules_parse_and_pass_promtool() -> None:
    """Which metrics they use is checked against running services (tests/e2e/test_metrics_e2e.py)."""
    path = Path(__file__).resolve().parent.parent.parent / "docs" / "prometheus-alerts.yml"
    rules = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert all(rule["expr"] and rule["alert"] for group in rules["groups"] for rule in group["rules"])
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
