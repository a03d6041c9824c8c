"""Concurrency across processes, on SQLite and on PostgreSQL: 200 enrollments racing into a
4-worker EST service, 42 pairs of devices racing with one key each, two CRL publishers in
separate processes, revocations racing the OCSP refresher, and audit writers in several
processes. (20 clients racing for one one-time secret against the real server:
tests/e2e/test_est.py::test_twenty_parallel_enrollments_with_one_secret_yield_one_certificate,
on both databases.)"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for, public_key_sha256
from ca.config import EstSettings, Pkcs11Settings
from ca.issuance.csr import read_csr
from ca.issuance.flow import IssueRequest, issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.csms import add_client, issue_token
from ca.status.revocation import revoke
from ca.store.engine import Store
from ca.store.models import AuditEvent, AuditHead, Certificate, OcspResponse
from ca.work import Work
from ocsp.presign import Presigner, refresh
from tests import concurrency_workers as workers
from tests.est_server import free_port, start_server, write_home
from tests.fault_helpers import certificate_of, chargepki, csr_body, fingerprint, register, root_pem
from tests.helpers import make_csr, make_key, pem, write


def _token_args(token_settings: tuple[Pkcs11Settings, str]) -> workers.TokenArgs:
    settings, pin = token_settings
    return settings.module, settings.token_label, pin, str(settings.softhsm_conf)


def _run(processes: list) -> None:  # type: ignore[type-arg]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0, f"{process.name} failed (exit {process.exitcode})"


def _results(queue, count: int) -> list:  # type: ignore[no-untyped-def,type-arg]
    return [queue.get(timeout=60) for _ in range(count)]


def _chargers(session: Session, hierarchy: Hierarchy, token: Token, count: int, prefix: str) -> list[Certificate]:
    status = Presigner(token)
    issuer = issuer_for(hierarchy.issuing, token)
    profile = get_profile("charger")
    requests_ = [request_from_csr(profile, read_csr(make_csr(f"{prefix}-{n}")), issuer) for n in range(count)]
    return [issue(Work(session, "test", status=status), issuer=issuer, request=request) for request in requests_]


# -- 200 enrollments, 4 workers ---------------------------------------------------------------------
@pytest.fixture
def est_home(
    store: Store, hierarchy: Hierarchy, token_settings: tuple[Pkcs11Settings, str], tmp_path: Path
) -> Iterator[Path]:
    url = store.url.render_as_string(hide_password=False)
    yield write_home(tmp_path / "home", url, token_settings[0], EstSettings(default_environment="production"))


def test_200_concurrent_enrollments_into_4_workers(store: Store, est_home: Path, tmp_path: Path) -> None:
    root = root_pem(store, tmp_path / "root.pem")
    secrets = register(store, [f"CP-C-{n:03d}" for n in range(200)])
    bodies = {serial: csr_body(serial) for serial in secrets}
    server = start_server(est_home, free_port(), workers=4)
    start = threading.Barrier(len(secrets))

    def enroll(serial: str) -> requests.Response:
        start.wait()  # all 200 requests are in flight together
        return requests.post(
            f"https://localhost:{server.port}/.well-known/est/simpleenroll",
            data=bodies[serial],
            auth=(serial, secrets[serial]),
            headers={"Content-Type": "application/pkcs10"},
            verify=str(root),
            timeout=120,
        )

    try:
        with ThreadPoolExecutor(max_workers=len(secrets)) as pool:
            responses = dict(zip(secrets, pool.map(enroll, secrets), strict=True))
    finally:
        server.stop()
    assert sorted({r.status_code for r in responses.values()}) == [200], [r.text for r in responses.values()][:3]
    received = {serial: certificate_of(response) for serial, response in responses.items()}
    serials = {format(c.serial_number, "X") for c in received.values()}
    assert len(serials) == 200, "every serial unique"
    with store.session() as session:
        rows = {r.serial: r for r in session.scalars(select(Certificate).where(Certificate.serial.in_(serials)))}
        issued = {
            e.subject: e.details
            for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "certificate.issued"))
        }
        entries, head = session.scalar(select(func.count(AuditEvent.seq))), session.scalar(select(AuditHead.seq))
        session.commit()
    for serial, certificate in received.items():
        row = rows[format(certificate.serial_number, "X")]
        assert (row.status, row.common_name) == ("valid", serial)
        assert row.der == certificate.public_bytes(serialization.Encoding.DER), "what was received is recorded"
        assert fingerprint(certificate) in issued[row.serial], "and audited"
    assert entries == head, "gap-free: the chain has every entry up to its head"
    result = chargepki(est_home, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    log = server.log.read_text()
    assert "Traceback" not in log and '" 500 ' not in log


# -- CRL publishers in two processes ----------------------------------------------------------------
def test_two_crl_publisher_processes_race(
    store: Store, hierarchy: Hierarchy, token_settings: tuple[Pkcs11Settings, str], tmp_path: Path
) -> None:
    url = store.url.render_as_string(hide_password=False)
    context = workers.spawn()
    results = context.Queue()
    directory = tmp_path / "pki"
    path = directory / f"{hierarchy.issuing.name}.crl"
    seen: list[int] = []
    unreadable: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        """Reads the published file throughout: it must always parse, and never go back."""
        while not stop.is_set():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                crl = x509.load_der_x509_crl(data)
                seen.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
            except ValueError as exc:
                unreadable.append(str(exc))

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        publishers = [
            context.Process(
                target=workers.publish_crls,
                args=(url, _token_args(token_settings), hierarchy.issuing.id, str(directory), 10, results),
                name=f"publisher-{n}",
            )
            for n in range(2)
        ]
        _run(publishers)
    finally:
        stop.set()
        watcher.join()
    first, second = _results(results, 2)
    numbers = [n for n, _ in first + second]
    assert len(set(numbers)) == 20, "every publication got its own number"
    for own in (first, second):
        assert [n for n, _ in own] == sorted(n for n, _ in own) and len({n for n, _ in own}) == len(own)
    assert not unreadable, unreadable[:3]
    assert seen and seen == sorted(seen), "readers never see a CRL number go back"
    final = x509.load_der_x509_crl(path.read_bytes())
    assert final.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == max(numbers)
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")], "no half-written file remains"


# -- revocation racing the OCSP refresher -----------------------------------------------------------
def _stored_statuses(store: Store, serials: list[str]) -> dict[tuple[str, str], str]:
    """(serial, hash) → status, from the stored DER itself (not only the column)."""
    with store.session() as session:
        rows = session.scalars(select(OcspResponse).where(OcspResponse.serial.in_(serials))).all()
        session.commit()
    statuses = {}
    for row in rows:
        status = ocsp.load_der_ocsp_response(row.der).certificate_status.name
        assert status == row.cert_status.upper()
        statuses[(row.serial, row.hash_algorithm)] = status
    return statuses


def test_a_refresh_that_read_the_row_before_a_revocation_never_overwrites_it(
    store: Store, session: Session, hierarchy: Hierarchy, token: Token
) -> None:
    """The refresher reads a certificate as valid, then pauses before signing; meanwhile a
    revocation runs. Whatever the order of their commits, the stored response must end `revoked`.
    PostgreSQL (READ COMMITTED) needs the refresher's FOR UPDATE for this; SQLite's IMMEDIATE
    transactions serialise the two anyway."""
    (certificate,) = _chargers(session, hierarchy, token, 1, "CP-RACE")
    session.commit()
    has_read, go = threading.Event(), threading.Event()

    class PausingPresigner(Presigner):
        def store(self, session, certificates, now):  # type: ignore[no-untyped-def]
            certificates = list(certificates)
            if certificate.serial in {c.serial for c in certificates}:  # the batch that read it as valid
                assert all(c.status == "valid" for c in certificates if c.serial == certificate.serial)
                has_read.set()
                go.wait(30)
            return super().store(session, certificates, now)

    def refresher() -> None:
        with store.session() as own:
            refresh(own, PausingPresigner(token), datetime.now(UTC) + timedelta(hours=13))

    def revoker() -> None:
        with store.session() as own:
            revoke(Work(own, "test", status=Presigner(token)), serial=certificate.serial, reason="keyCompromise")

    refreshing = threading.Thread(target=refresher)
    refreshing.start()
    assert has_read.wait(30)
    revoking = threading.Thread(target=revoker)
    revoking.start()
    revoking.join(timeout=2)  # without a lock it finishes here, and the refresher would then write `good`
    go.set()
    refreshing.join(30)
    revoking.join(30)
    assert set(_stored_statuses(store, [certificate.serial]).values()) == {"REVOKED"}


def test_revocations_racing_refresher_processes_end_revoked(
    store: Store, session: Session, hierarchy: Hierarchy, token: Token, token_settings: tuple[Pkcs11Settings, str]
) -> None:
    certificates = _chargers(session, hierarchy, token, 30, "CP-RR")
    session.commit()
    serials = [c.serial for c in certificates]
    url = store.url.render_as_string(hide_password=False)
    context = workers.spawn()
    results, done = context.Queue(), context.Event()
    args = _token_args(token_settings)
    refreshers = [
        context.Process(target=workers.refresh_until, args=(url, args, 13.0, done, results), name=f"refresher-{n}")
        for n in range(2)
    ]
    for process in refreshers:
        process.start()
    revoker = context.Process(target=workers.revoke_serials, args=(url, args, serials, results), name="revoker")
    _run([revoker])
    done.set()
    for process in refreshers:
        process.join(timeout=120)
        assert process.exitcode == 0
    outcomes = _results(results, 3)
    assert 30 in outcomes and all(passes >= 1 for passes, _ in [o for o in outcomes if isinstance(o, tuple)])
    statuses = _stored_statuses(store, serials)
    assert {serial for serial, _ in statuses} == set(serials)
    assert set(statuses.values()) == {"REVOKED"}


# -- the audit chain ---------------------------------------------------------------------------------
def test_audit_writers_in_four_processes_keep_the_chain_linear(store: Store) -> None:
    url = store.url.render_as_string(hide_password=False)
    context = workers.spawn()
    results = context.Queue()
    _run(
        [
            context.Process(target=workers.write_audit, args=(url, 50, f"writer-{n}", results), name=f"writer-{n}")
            for n in range(4)
        ]
    )
    assert _results(results, 4) == [50] * 4
    with store.session() as session:
        result = audit.verify(session)
        subjects = set(session.scalars(select(AuditEvent.subject)))
        session.commit()
    assert result.ok and result.entries == 200, result.problem
    assert subjects == {f"writer-{n}-{i}" for n in range(4) for i in range(50)}


# -- one key, one identity: simultaneous enrollments of two devices with one key --------------------
# Each pair's two requests go through these routes: EST with a one-time secret, EST by an RA, the
# CSMS API's /sign; every combination appears.
_ROUTE_PAIRS = [
    ("secret", "secret"),
    ("ra", "ra"),
    ("api", "api"),
    ("secret", "ra"),
    ("ra", "api"),
    ("api", "secret"),
]
KEY_PAIRS = 42


def test_two_devices_racing_with_one_key_get_one_certificate(
    store: Store, hierarchy: Hierarchy, token: Token, est_home: Path, tmp_path: Path
) -> None:
    """42 pairs of simultaneous first enrollments, each pair two registered devices presenting the
    same public key, through EST secrets, an RA and the CSMS API, into a 4-worker service: exactly
    one certificate per key, the other refused (409 ``key_reuse``) and audited with that code."""
    root = root_pem(store, tmp_path / "root.pem")
    ra_key = make_key()
    with store.session() as session:
        ra = issue(
            Work(session, "test", status=Presigner(token)),
            issuer=issuer_for(hierarchy.issuing, token),
            request=IssueRequest(get_profile("ra"), ra_key.public_key(), "station-ra"),
        )
        api_token = issue_token(
            Work(session, "t"), client=add_client(Work(session, "t"), name="csms-race", environment="production")
        )
    ra_cert = write(tmp_path / "ra.pem", pem(ra.der or b""))
    ra_key_file = write(
        tmp_path / "ra.key",
        ra_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    keys = [make_key() for _ in range(KEY_PAIRS)]
    jobs = [
        (n, side, route, f"CP-KEY-{n:02d}-{side}")
        for n in range(KEY_PAIRS)
        for side, route in zip("ab", _ROUTE_PAIRS[n % len(_ROUTE_PAIRS)], strict=True)
    ]
    secrets = register(store, [serial for *_, serial in jobs])
    bodies = {serial: make_csr(serial, key=keys[n]) for n, _, _, serial in jobs}
    server = start_server(est_home, free_port(), workers=4)
    start = threading.Barrier(len(jobs))

    def send(job: tuple[int, str, str, str]) -> requests.Response:
        _n, _side, route, serial = job
        csr = bodies[serial]
        start.wait()
        if route == "api":
            return requests.post(
                f"https://localhost:{server.port}/api/v1/sign",
                json={"chargingStationId": serial, "csr": csr.decode()},
                headers={"Authorization": f"Bearer {api_token}"},
                verify=str(root),
                timeout=120,
            )
        der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
        return requests.post(
            f"https://localhost:{server.port}/.well-known/est/simpleenroll",
            data=base64.encodebytes(der),
            headers={"Content-Type": "application/pkcs10"},
            verify=str(root),
            timeout=120,
            **(
                {"auth": (serial, secrets[serial])} if route == "secret" else {"cert": (str(ra_cert), str(ra_key_file))}
            ),
        )

    try:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            responses = list(pool.map(send, jobs))
    finally:
        server.stop()
    outcomes: dict[int, list[int]] = {}
    for (n, *_), response in zip(jobs, responses, strict=True):
        outcomes.setdefault(n, []).append(response.status_code)
        if response.status_code != 200:
            assert response.status_code == 409 and "already certified for another identity" in response.text
            if "json" in response.headers.get("Content-Type", ""):
                assert response.json()["reason"] == "key_reuse"
    assert all(sorted(codes) == [200, 409] for codes in outcomes.values()), outcomes
    with store.session() as session:
        for key in keys:
            holders = session.scalars(
                select(Certificate.status).where(Certificate.public_key_sha256 == public_key_sha256(key.public_key()))
            ).all()
            assert holders == ["valid"], holders
        refusals = session.scalars(
            select(AuditEvent.details).where(AuditEvent.action.in_(("enrollment.refused", "csms.sign.refused")))
        ).all()
        session.commit()
    assert sum('"code":"key_reuse"' in details for details in refusals) == KEY_PAIRS
    result = chargepki(est_home, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    log = server.log.read_text()
    assert "Traceback" not in log and '" 500 ' not in log


# -- a CA revoked while enrollments race into it --------------------------------------------------------
def test_no_certificate_is_recorded_under_a_ca_after_its_revocation_commits(
    store: Store, hierarchy: Hierarchy, token: Token, est_home: Path, tmp_path: Path
) -> None:
    """80 enrollments race into a 4-worker service (each worker caching the CA and its Issuer) while
    the CA is revoked from another process's connection. The audit chain orders commits (its head
    row is locked by every writer), so every certificate the CA issued must come before
    ``ca.revoked``; whatever came later was refused, and nothing is left pending."""
    root = root_pem(store, tmp_path / "root.pem")
    secrets = register(store, [f"CP-REV-{n:03d}" for n in range(80)])
    bodies = {serial: csr_body(serial) for serial in secrets}
    server = start_server(est_home, free_port(), workers=4)
    start = threading.Barrier(len(secrets) + 1)

    def enroll(serial: str) -> requests.Response:
        start.wait()
        return requests.post(
            f"https://localhost:{server.port}/.well-known/est/simpleenroll",
            data=bodies[serial],
            auth=(serial, secrets[serial]),
            headers={"Content-Type": "application/pkcs10"},
            verify=str(root),
            timeout=120,
        )

    def revoke_when_some_are_issued() -> None:
        start.wait()
        with store.session() as session:
            issued = select(func.count()).where(Certificate.common_name.like("CP-REV-%"), Certificate.status == "valid")
            while session.scalar(issued) < 1:  # as soon as the first one is recorded
                session.commit()
            session.commit()
            revoke(
                Work(session, "test:revoker", status=Presigner(token)),
                serial=hierarchy.issuing.serial,
                reason="keyCompromise",
            )

    try:
        with ThreadPoolExecutor(max_workers=len(secrets) + 1) as pool:
            revoking = pool.submit(revoke_when_some_are_issued)
            responses = list(pool.map(enroll, secrets))
            revoking.result()
    finally:
        server.stop()
    assert {r.status_code for r in responses} <= {200, 403, 404}, {r.status_code: r.text for r in responses}
    with store.session() as session:
        revoked_at = session.scalar(select(AuditEvent.seq).where(AuditEvent.action == "ca.revoked"))
        issued = session.execute(
            select(AuditEvent.seq, AuditEvent.subject).where(
                AuditEvent.action == "certificate.issued", AuditEvent.details.like('%"cn":"CP-REV-%')
            )
        ).all()
        rows = {
            row.serial: row.status
            for row in session.scalars(select(Certificate).where(Certificate.common_name.like("CP-REV-%")))
        }
        session.commit()
    assert revoked_at is not None and issued
    assert all(seq < revoked_at for seq, _ in issued), "nothing was issued under the CA after its revocation"
    received = {format(certificate_of(r).serial_number, "X") for r in responses if r.status_code == 200}
    assert received == {serial for _, serial in issued} == {s for s, state in rows.items() if state == "valid"}
    assert "pending" not in rows.values()
    for response in responses:
        if response.status_code == 403:
            assert "signs nothing any more" in response.text
    log = server.log.read_text()
    assert "Traceback" not in log and '" 500 ' not in log
