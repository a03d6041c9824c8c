"""One CRL writer at a time (crl/leader.py), on SQLite and PostgreSQL: racing claimers get one
leader, a leader paused past its lease is fenced off (its next CRL number is refused) while a
successor takes over, and CRL numbers rise strictly across every change of leader."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from ca.authorities.hierarchy import Hierarchy
from ca.store.engine import Store
from ca.store.models import Authority
from crl.leader import Lease, NotLeader, current_leader
from crl.publisher import next_crl_number

DEADLINE = 60.0  # a hang guard only


def test_racing_claimers_elect_exactly_one_leader(store: Store) -> None:
    url = store.url.render_as_string(hide_password=False)
    start = threading.Barrier(8)
    leaders: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        own = Store(url)  # its own engine and connections, as another process would have
        lease = Lease(name, seconds=60)
        try:
            with own.session() as session:
                start.wait(timeout=DEADLINE)
                for _ in range(10):
                    if lease.claim(session):
                        leaders.append((name, lease.term))  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=claimer, args=(f"publisher-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert not errors, errors
    assert {name for name, _ in leaders} == {leaders[0][0]} and len(leaders) == 10, "one leader, renewing"
    assert {term for _, term in leaders} == {1}, "renewals keep the term"
    with store.session() as session:
        assert current_leader(session) == (leaders[0][0], 1, True)
        session.commit()


def test_a_leader_paused_past_its_lease_is_fenced_and_numbers_rise_across_terms(
    store: Store, hierarchy: Hierarchy
) -> None:
    url = store.url.render_as_string(hide_password=False)
    allocated: list[tuple[int, int]] = []  # (CRL number, term it was allocated under)
    fenced: list[bool] = []
    errors: list[BaseException] = []
    end = time.monotonic() + DEADLINE

    def publisher(name: str) -> None:
        own = Store(url)
        lease = Lease(name, seconds=0.3)
        try:
            with own.session() as session:
                authority = session.get(Authority, hierarchy.issuing.id)
                assert authority is not None
                while len(allocated) < 24 and time.monotonic() < end:
                    if not lease.claim(session):
                        time.sleep(0.02)
                        continue
                    try:
                        for _ in range(2):
                            allocated.append(
                                (next_crl_number(session, authority, datetime.now(UTC), lease=lease), lease.term)
                            )  # type: ignore[arg-type]
                    except NotLeader:
                        # A host slower than the lease lapsed before it got here: refused, as it must be,
                        # and the publisher goes back to following (what ``crl publish --watch`` does).
                        session.rollback()
                        lease.drop()
                        continue
                    time.sleep(0.4)  # paused (or cut off) past its lease: a successor may take over
                    try:
                        next_crl_number(session, authority, datetime.now(UTC), lease=lease)
                        fenced.append(False)
                    except NotLeader:
                        session.rollback()
                        fenced.append(True)
                    lease.drop()
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=publisher, args=(f"publisher-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert not errors, errors
    assert len(allocated) >= 24
    assert fenced and all(fenced), "a lapsed lease never allocates a CRL number"
    numbers = [number for number, _ in allocated]
    assert len(set(numbers)) == len(numbers), "every CRL number is allocated once"
    terms_by_number = [term for _, term in sorted(allocated)]
    assert terms_by_number == sorted(terms_by_number), "no number of an older term after a newer term began"
    assert len(set(terms_by_number)) >= 12, "every pause ended a term"
