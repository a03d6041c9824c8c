"""Faults, end to end on loopback: the token going away (directory gone, wrong PIN, module
missing, signatures failing), the database going away (PostgreSQL behind a forwarder the test
cuts; SQLite locked or moved), and `kill -9` of the EST service in the middle of a load run.
Each service is a real `chargepki serve` process; the assertions read the database directly."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.authorities.issuers import issuer_for
from ca.config import EstSettings, Pkcs11Settings, find_softhsm_module
from ca.issuance.csr import read_csr
from ca.issuance.flow import abandon_stale_pending, issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.store.engine import Store
from ca.store.models import AuditEvent, Certificate
from ca.work import Work
from crl.publisher import PublishError, publish_crl, status_counter
from ocsp.presign import Presigner
from ocsp.responder import Responder
from ocsp.signing import TRY_LATER
from ocsp.source import CachedSource, StoreSource
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.fault_helpers import (
    TcpProxy,
    certificate_of,
    chargepki,
    children,
    csr_body,
    embedded_home,
    enroll,
    fingerprint,
    issuing_certificate,
    ocsp_answer,
    register,
    root_pem,
    token_directory,
)
from tests.helpers import make_csr

DEADLINE = 20.0  # seconds to wait for a service to recover (it normally takes one or two)


def _until(condition: Callable[[], object], what: str, deadline: float = DEADLINE) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``deadline``."""
    end = time.monotonic() + deadline
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline} s")
        time.sleep(0.2)


def _events(store: Store, action: str) -> list[AuditEvent]:
    with store.session() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))
        session.commit()
        return rows


def _audit_ok(home: Path) -> None:
    result = chargepki(home, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr


def _stop(*servers: EstServer | None) -> None:
    for server in servers:
        if server is not None:
            server.stop()


def _clean_log(server: EstServer) -> None:
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log and '" 500 ' not in log, log[-3000:]


@pytest.fixture(params=["sqlite", "postgresql"])
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A home made by `chargepki init` with its own SoftHSM2 token, and its database URL."""
    with database(request.param, tmp_path) as url:
        yield embedded_home(tmp_path / "home", url), url


def _set_module(home: Path, module: str) -> None:
    path = home / "chargepki.toml"
    config = tomllib.loads(path.read_text())
    config["pkcs11"]["module"] = module
    path.write_text(tomli_w.dumps(config))


# -- the token ------------------------------------------------------------------------------------
def test_token_faults_give_503_keep_ocsp_serving_are_audited_and_heal_without_restart(
    embedded: tuple[Path, str], tmp_path: Path
) -> None:
    home, url = embedded
    store = Store(url)
    root = root_pem(store, tmp_path / "root.pem")
    issuer = issuing_certificate(store)
    pin = (home / "softhsm" / "user.pin").read_text().strip()
    secrets = register(store, [f"CP-TOK-{n}" for n in range(4)])
    est = ocsp_server = None
    try:
        est = start_server(home, free_port(), workers=1)
        ocsp_server = start_server(home, free_port(), workers=1, service="ocsp")
        first = certificate_of(enroll(est.port, "CP-TOK-0", secrets["CP-TOK-0"], root))
        assert ocsp_answer(ocsp_server.port, first, issuer) == "GOOD"

        # 1. The token's directory disappears (a removed HSM): the next signature fails.
        tokens = token_directory(home)
        away = home / "softhsm" / "away"
        shutil.move(tokens, away)
        body = csr_body("CP-TOK-1")
        for _ in range(3):
            refused = enroll(est.port, "CP-TOK-1", secrets["CP-TOK-1"], root, body=body)
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "30"
            assert refused.text.startswith("temporarily unavailable: ") and "token" in refused.text
        # The responder holds no key: what is stored is still served; what needs a signature waits.
        assert ocsp_answer(ocsp_server.port, first, issuer) == "GOOD"
        never_issued = _with_serial(first, 12345)
        assert ocsp_answer(ocsp_server.port, never_issued, issuer) == "TRY_LATER"

        # 2. It comes back: the same request (the secret was not spent) succeeds without a restart.
        shutil.move(away, tokens)
        second = certificate_of(
            _until(
                lambda: (
                    (r := enroll(est.port, "CP-TOK-1", secrets["CP-TOK-1"], root, body=body)).status_code == 200 and r
                ),
                "enrollment after the token came back",
            )
        )
        assert _until(
            lambda: ocsp_answer(ocsp_server.port, never_issued, issuer) == "UNKNOWN",
            "the on-demand OCSP signer after the token came back",
        )
        assert ocsp_answer(ocsp_server.port, second, issuer) == "GOOD"

        # 3. A wrong PIN (the token needs a new login after going away once more): 503, then the
        #    corrected PIN file is read at the next login.
        (home / "softhsm" / "user.pin").write_text("wrong-pin\n")
        shutil.move(tokens, away)
        body = csr_body("CP-TOK-2")
        assert enroll(est.port, "CP-TOK-2", secrets["CP-TOK-2"], root, body=body).status_code == 503
        shutil.move(away, tokens)
        wrong = _until(
            lambda: (
                (r := enroll(est.port, "CP-TOK-2", secrets["CP-TOK-2"], root, body=body)).status_code == 503
                and "wrong PIN" in r.text
                and r.text
            ),
            "the wrong PIN reported",
        )
        assert "wrong-pin" not in wrong
        (home / "softhsm" / "user.pin").write_text(pin + "\n")
        _until(
            lambda: enroll(est.port, "CP-TOK-2", secrets["CP-TOK-2"], root, body=body).status_code == 200,
            "enrollment after the PIN file was corrected",
        )
    finally:
        _stop(est, ocsp_server)

    # 4. The PKCS#11 module is missing when the service starts (a worker opens the token lazily).
    _set_module(home, str(tmp_path / "libpkcs11-link.so"))
    est = None
    try:
        est = start_server(home, free_port(), workers=1)
        missing = enroll(est.port, "CP-TOK-3", secrets["CP-TOK-3"], root)
        assert missing.status_code == 503 and "PKCS#11 module not found" in missing.text, missing.text
        (tmp_path / "libpkcs11-link.so").symlink_to(find_softhsm_module())
        _until(
            lambda: enroll(est.port, "CP-TOK-3", secrets["CP-TOK-3"], root).status_code == 200,
            "enrollment once the module is installed",
        )
    finally:
        _stop(est)
    for server in (est,):
        _clean_log(server)

    # Every outage and every recovery is in the audit log, with its reason and never the PIN.
    lost = _events(store, "token.unavailable")
    back = _events(store, "token.available")
    reasons = " | ".join(event.details for event in lost)
    assert len(lost) >= 3 and len(back) >= 3, reasons
    assert "became unavailable" in reasons and "wrong PIN" in reasons and "module not found" in reasons
    aborted = _events(store, "certificate.aborted")
    assert aborted and "token" in aborted[0].details  # the signature that failed burnt its serial
    with store.session() as session:
        everything = " ".join(e.details + (e.subject or "") for e in session.scalars(select(AuditEvent)))
        session.commit()
    assert pin not in everything and "wrong-pin" not in everything
    for log in home.glob("*.log"):
        text = log.read_text(errors="replace")
        assert pin not in text and "wrong-pin" not in text, log
    _audit_ok(home)
    store.dispose()


def _with_serial(certificate: x509.Certificate, serial: int) -> x509.Certificate:
    """A certificate of the same issuer with another serial (only its issuer and serial go into a CertID)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(certificate.subject)
        .issuer_name(certificate.issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(certificate.not_valid_before_utc)
        .not_valid_after(certificate.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )


# -- the database ---------------------------------------------------------------------------------
def _one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _until_status_is_quiet(store: Store, quiet: float = 2.0) -> None:
    """Until the change counter has not moved for ``quiet`` seconds (within ``DEADLINE``)."""
    with store.session() as session:
        last, since = status_counter(session), time.monotonic()
    end = since + DEADLINE
    while time.monotonic() - since < quiet:
        assert time.monotonic() < end, f"the status counter kept moving for {DEADLINE} s"
        time.sleep(0.2)
        with store.session() as session:
            counter = status_counter(session)
        if counter != last:
            last, since = counter, time.monotonic()


def test_postgresql_unreachable_503_cached_ocsp_one_line_cli_and_recovery_without_restart(tmp_path: Path) -> None:
    with database("postgresql", tmp_path) as url:
        proxy = TcpProxy()
        store = Store(url)
        est = ocsp_server = None
        try:
            home = embedded_home(tmp_path / "home", proxy.url(url))
            root = root_pem(store, tmp_path / "root.pem")
            issuer = issuing_certificate(store)
            secrets = register(store, ["CP-DB-0", "CP-DB-1", "CP-DB-2"])
            est = start_server(home, free_port(), workers=1)
            ocsp_server = start_server(home, free_port(), workers=1, service="ocsp")
            cached = certificate_of(enroll(est.port, "CP-DB-0", secrets["CP-DB-0"], root))
            uncached = certificate_of(enroll(est.port, "CP-DB-1", secrets["CP-DB-1"], root))
            # Every change signal empties the responder's cache: wait until the status counter has
            # stood still (the enrollments', and whatever the signer's first refresh pass signals),
            # then give the watcher a moment to see the last one, and only then cache the answer.
            _until_status_is_quiet(store)
            time.sleep(1)
            assert ocsp_answer(ocsp_server.port, cached, issuer) == "GOOD"  # now in the responder's cache

            proxy.cut()
            body = csr_body("CP-DB-2")
            refused = enroll(est.port, "CP-DB-2", secrets["CP-DB-2"], root, body=body)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "30", refused.text
            assert "database" in refused.text
            assert ocsp_answer(ocsp_server.port, cached, issuer) == "GOOD"
            assert ocsp_answer(ocsp_server.port, uncached, issuer) == "TRY_LATER"
            _one_line_error(chargepki(home, "cert", "list"), "database unavailable")
            _one_line_error(chargepki(home, "audit", "verify"), "database unavailable")
            # A worker that (re)starts while the database is away still boots: gunicorn would
            # otherwise stop the whole service when a worker fails to boot.
            (worker,) = children(est.process.pid)
            os.kill(worker, signal.SIGKILL)
            _until(lambda: len(children(est.process.pid)) == 1 and worker not in children(est.process.pid), "respawn")
            assert enroll(est.port, "CP-DB-2", secrets["CP-DB-2"], root, body=body).status_code == 503

            proxy.restore()
            _until(
                lambda: enroll(est.port, "CP-DB-2", secrets["CP-DB-2"], root, body=body).status_code == 200,
                "enrollment after the database came back",
            )
            _until(lambda: ocsp_answer(ocsp_server.port, uncached, issuer) == "GOOD", "OCSP after the database")
            assert chargepki(home, "cert", "list").returncode == 0
            assert est.process.poll() is None and ocsp_server.process.poll() is None
            _audit_ok(home)
        finally:
            _stop(est, ocsp_server)
            proxy.close()
            store.dispose()
        _clean_log(est)


def test_sqlite_locked_beyond_its_timeout_or_moved(tmp_path: Path) -> None:
    """A file database the service holds open cannot become unreachable the way a server can
    (moving or chmod-ing it changes nothing for open descriptors, and root ignores modes); what
    happens is a lock held too long (a backup, a stuck writer) or a file that is not there."""
    db = tmp_path / "chargepki.db"
    url = f"sqlite:///{db}?timeout=1"  # how long a writer waits for the lock
    home = embedded_home(tmp_path / "home", url)
    store = Store(url)
    root = root_pem(store, tmp_path / "root.pem")
    issuer = issuing_certificate(store)
    secrets = register(store, ["CP-LK-0", "CP-LK-1"])
    est = ocsp_server = None
    try:
        est = start_server(home, free_port(), workers=1)
        ocsp_server = start_server(home, free_port(), workers=1, service="ocsp")
        issued = certificate_of(enroll(est.port, "CP-LK-0", secrets["CP-LK-0"], root))
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            body = csr_body("CP-LK-1")
            refused = enroll(est.port, "CP-LK-1", secrets["CP-LK-1"], root, body=body)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "30", refused.text
            assert ocsp_answer(ocsp_server.port, issued, issuer) == "GOOD"  # WAL: readers are not blocked
            _one_line_error(chargepki(home, "cert", "list"), "database unavailable", "locked")
        finally:
            locker.rollback()
            locker.close()
        assert enroll(est.port, "CP-LK-1", secrets["CP-LK-1"], root, body=body).status_code == 200
    finally:
        _stop(est, ocsp_server)
        store.dispose()
    _clean_log(est)

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    files = [p for p in tmp_path.iterdir() if p.name.startswith("chargepki.db")]
    for path in files:
        path.rename(moved / path.name)
    _one_line_error(chargepki(home, "audit", "verify"), "does not exist")
    _one_line_error(chargepki(home, "cert", "list"), "does not exist")
    assert not db.exists(), "no empty database was created in its place"
    for path in files:
        (moved / path.name).rename(path)
    _audit_ok(home)


# -- kill -9 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_kill_9_of_the_est_service_during_a_load_run(
    kind: str, tmp_path: Path, token: Token, token_settings: tuple[Pkcs11Settings, str]
) -> None:
    with database(kind, tmp_path) as url:
        store = Store(url)
        store.upgrade()
        with store.session() as session:
            request = HierarchyRequest(organization="Acme Charging", country="DE")
            init_hierarchy(Work(session=session, actor="test", status=Presigner(token), token=token), request=request)
        home = write_home(tmp_path / "home", url, token_settings[0], EstSettings(default_environment="production"))
        root = root_pem(store, tmp_path / "root.pem")
        secrets = register(store, [f"CP-K9-{n:04d}" for n in range(400)])
        queue = iter(sorted(secrets))
        received: dict[str, x509.Certificate] = {}
        lock, stop = threading.Lock(), threading.Event()
        server = start_server(home, free_port(), workers=2, process_group=True)

        def client() -> None:
            with requests.Session() as http:
                while not stop.is_set():
                    with lock:
                        serial = next(queue, None)
                    if serial is None:
                        return
                    try:
                        response = http.post(
                            f"https://localhost:{server.port}/.well-known/est/simpleenroll",
                            data=csr_body(serial),
                            auth=(serial, secrets[serial]),
                            headers={"Content-Type": "application/pkcs10"},
                            verify=str(root),
                            timeout=30,
                        )
                    except requests.RequestException:
                        continue  # the service is gone
                    if response.status_code == 200:
                        with lock:
                            received[serial] = certificate_of(response)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            _until(lambda: len(received) >= 60, "60 enrollments before the kill", deadline=60)
            os.killpg(server.process.pid, signal.SIGKILL)  # the master and every worker, mid-request
            server.process.wait()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        restarted = start_server(home, free_port(), workers=2, process_group=True)
        try:
            later = [s for s in sorted(secrets) if s not in received][-3:]  # never reached before the kill
            for serial in later:
                received[serial] = certificate_of(enroll(restarted.port, serial, secrets[serial], root))
        finally:
            restarted.stop()

        with store.session() as session:
            rows = {r.serial: r for r in session.scalars(select(Certificate).where(Certificate.profile == "charger"))}
            issued_events = session.scalars(select(AuditEvent).where(AuditEvent.action == "certificate.issued"))
            issued = {event.subject: event for event in issued_events}
            total, distinct = session.execute(
                select(func.count(Certificate.id), func.count(func.distinct(Certificate.serial)))
            ).one()
            session.commit()
        assert total == distinct, "no serial is ever reused"
        for serial, certificate in received.items():
            row = rows.get(format(certificate.serial_number, "X"))
            assert row is not None and row.status == "valid", f"{serial}: a certificate handed out is recorded"
            assert row.der == certificate.public_bytes(serialization.Encoding.DER)
            assert row.common_name == serial
            assert fingerprint(certificate) in issued[row.serial].details, "and audited"
        pending = [r.serial for r in rows.values() if r.status == "pending"]
        handed_out = {format(c.serial_number, "X") for c in received.values()}
        assert not handed_out & set(pending)
        _audit_ok(home)
        print(f"{kind}: {len(received)} received, {len(pending)} reservations left pending by the kill")

        # The sweep marks what the crash left (once it is old enough to belong to no live process).
        with store.session() as session:
            assert abandon_stale_pending(session, actor="test") == []  # too recent yet
            later_now = datetime.now(UTC) + timedelta(hours=1)
            swept = abandon_stale_pending(session, actor="test", now=lambda: later_now)
            assert sorted(swept) == sorted(pending)
            statuses = {s: session.scalar(select(Certificate.status).where(Certificate.serial == s)) for s in swept}
            session.commit()
        assert set(statuses.values()) <= {"aborted"}
        aborted = {e.subject for e in _events(store, "certificate.aborted")}
        assert set(swept) <= aborted
        with store.session() as session:
            assert audit.verify(session).ok
            session.commit()
        store.dispose()


def test_the_responder_serves_its_cached_responses_until_next_update_while_the_store_is_away(
    tmp_path: Path, token: Token
) -> None:
    """Stale-if-error: past the cache's TTL, with the store unreachable, a cached response is still
    served within the stale bound (a good one) or until its own nextUpdate (a permanent revocation:
    tests/ocsp/test_ocsp.py, tests/e2e/test_store_partition.py)."""
    with database("postgresql", tmp_path) as url:
        direct = Store(url)
        direct.upgrade()
        status = Presigner(token)
        with direct.session() as session:
            request = HierarchyRequest(organization="Acme Charging")
            hierarchy = init_hierarchy(Work(session=session, actor="t", status=status, token=token), request=request)
            issuer = issuer_for(hierarchy.issuing, token)
            wanted = request_from_csr(get_profile("charger"), read_csr(make_csr("CP-STALE")), issuer)
            row = issue(Work(session, "t", status=status), issuer=issuer, request=wanted)
        leaf = x509.load_der_x509_certificate(row.der)
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(leaf, issuer.certificate, hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        proxy = TcpProxy()
        source = CachedSource(StoreSource(Store(proxy.url(url), read_only=True)), ttl=0.0)
        try:
            served = Responder(source, None).answer(request)
            assert ocsp.load_der_ocsp_response(served.body).certificate_status == ocsp.OCSPCertStatus.GOOD
            proxy.cut()
            assert Responder(source, None).answer(request).body == served.body
            other = _with_serial(leaf, 4242)  # never cached: nothing to fall back on
            unknown = ocsp.OCSPRequestBuilder().add_certificate(other, issuer.certificate, hashes.SHA1()).build()
            assert Responder(source, None).answer(unknown.public_bytes(serialization.Encoding.DER)).body == TRY_LATER
        finally:
            source.close()
            proxy.close()
            direct.dispose()


# -- the publication directory ----------------------------------------------------------------------
@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: really full, or really read-only (root writes through any mode bits)."""
    mountpoint = tmp_path / "pki"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_a_full_or_read_only_publication_directory_keeps_the_previous_crl(
    session: Session, hierarchy: Hierarchy, token: Token, small_filesystem: Path
) -> None:
    issuer = issuer_for(hierarchy.issuing, token)
    first = publish_crl(session, issuer, hierarchy.issuing, small_filesystem, now=datetime.now(UTC))
    before = first.path.read_bytes()

    with open(small_filesystem / "filler", "wb", buffering=0) as filler:  # until the disk is full
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with pytest.raises(PublishError, match="No space left on device"):
        publish_crl(session, issuer, hierarchy.issuing, small_filesystem, now=datetime.now(UTC))
    assert first.path.read_bytes() == before
    assert not [p for p in small_filesystem.iterdir() if p.name.endswith(".tmp")]

    (small_filesystem / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    with pytest.raises(PublishError, match="Read-only file system"):
        publish_crl(session, issuer, hierarchy.issuing, small_filesystem, now=datetime.now(UTC))
    assert first.path.read_bytes() == before
    subprocess.run(["mount", "-o", "remount,rw", str(small_filesystem)], check=True)
    again = publish_crl(session, issuer, hierarchy.issuing, small_filesystem, now=datetime.now(UTC))
    assert again.replaced and again.number > first.number
