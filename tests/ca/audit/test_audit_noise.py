"""Anonymous noise stays out of the audit chain: refusals of callers that established no identity
are counted per address and minute and summarised, nothing lost, race-free. SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for
from ca.enrollment.pipeline import Credentials, enroll
from ca.errors import AuthenticationError, InputError
from ca.keys.pkcs11_token import Token
from ca.registry.csms import record_call
from ca.store.engine import Store
from ca.store.models import AuditEvent, AuditNoise
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr

START = datetime(2026, 12, 3, 10, 0, 0, tzinfo=UTC)  # an injected clock: never compared with the real one


class Clock:
    def __init__(self) -> None:
        self.at = START

    def __call__(self) -> datetime:
        return self.at


def _summaries(session: Session) -> list[dict]:
    rows = session.scalars(select(AuditEvent).where(AuditEvent.action == audit.NOISE).order_by(AuditEvent.seq))
    result = [json.loads(row.details) | {"address": row.subject} for row in rows]
    session.commit()
    return result


def test_ten_thousand_anonymous_refusals_add_a_few_dozen_rows(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    """EST without credentials, EST with an unparseable CSR, and API calls with a bad token,
    from three addresses over about two minutes: a handful of summary entries, every refusal in them.
    10,000 on SQLite; 1,000 on PostgreSQL keep the suite short (the race test covers its concurrency)."""
    clock = Clock()
    csr = make_csr("CP-NOISE")
    before = session.scalar(select(func.count()).select_from(AuditEvent))
    session.commit()
    addresses = ("192.0.2.1", "192.0.2.2", "2001:db8::3")
    total = 10_000 if session.get_bind().dialect.name == "sqlite" else 1_000
    for n in range(total):
        clock.at = START + timedelta(milliseconds=120_000 * n // total)  # 120 s in all
        address = addresses[n % 3]
        if n % 3 == 2:
            record_call(
                Work(session, "test", now=clock),
                None,
                "sign",
                address=address,
                subject=None,
                outcome={"reason": "unauthenticated"},
            )
            continue
        credentials = Credentials(address=address, username="CP-1" if n % 2 else None, password="x" if n % 2 else None)
        with pytest.raises(InputError if n % 2 else AuthenticationError):
            enroll(
                Work(
                    session,
                    "test",
                    status=status,
                    issuers=lambda authority: issuer_for(authority, token),
                    now=clock,
                ),
                authority=hierarchy.issuing,
                csr=b"\x30\x03\x02\x01\x00" if n % 2 else csr,
                credentials=credentials,
            )
    audit.flush_all_noise(session, now=clock)
    added = session.scalar(select(func.count()).select_from(AuditEvent)) - before
    session.commit()
    assert added <= 12, added  # three addresses × three minutes (two full, and the one being read)
    summaries = _summaries(session)
    assert sum(summary["count"] for summary in summaries) == total
    reasons = {key for summary in summaries for key in summary["refusals"]}
    assert reasons == {
        "enrollment.refused unauthenticated",
        "enrollment.refused bad_csr",
        "csms.api.sign unauthenticated",
    }
    assert session.scalar(select(func.count()).select_from(AuditNoise)) == 0
    assert audit.verify(session).ok


def test_a_finished_minute_is_summarised_when_the_next_refusal_comes_and_on_read(session: Session) -> None:
    clock = Clock()
    for _ in range(3):
        audit.count_noise(session, address="192.0.2.9", action="enrollment.refused", code="bad_csr", now=clock)
        session.commit()
    assert _summaries(session) == []
    clock.at = START + timedelta(minutes=1, seconds=5)
    audit.count_noise(session, address="192.0.2.9", action="enrollment.refused", code="unauthenticated", now=clock)
    session.commit()
    (first,) = _summaries(session)
    assert first == {
        "address": "192.0.2.9",
        "minute": START.isoformat(),
        "count": 3,
        "refusals": {"enrollment.refused bad_csr": 3},
    }
    audit.events(session)  # reading summarises the running minute too
    assert [summary["count"] for summary in _summaries(session)] == [3, 1]


def test_counting_and_flushing_race_without_losing_a_refusal(store: Store) -> None:
    """Four counting threads across a minute boundary and a flusher reading all the while."""
    ticks = itertools.count()
    lock = threading.Lock()

    def now() -> datetime:
        with lock:
            return START + timedelta(seconds=next(ticks))  # 200 counts: three minutes

    def count(n: int) -> None:
        with store.session() as session:
            audit.count_noise(
                session, address=f"192.0.2.{n % 2}", action="csms.api.sign", code="unauthenticated", now=now
            )
            session.commit()

    stop = threading.Event()

    def flush() -> None:
        while not stop.is_set():
            with store.session() as session:
                audit.flush_all_noise(session, now=now)

    flusher = threading.Thread(target=flush)
    flusher.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(count, range(200)))
    finally:
        stop.set()
        flusher.join()
    with store.session() as session:
        audit.flush_all_noise(session, now=now)
        assert sum(summary["count"] for summary in _summaries(session)) == 200
        assert audit.verify(session).ok
