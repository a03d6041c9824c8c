"""The audit log is a hash chain: any edited, deleted or reordered entry is detected and named."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ca import audit
from ca.store.engine import Store
from ca.store.models import AuditEvent


@pytest.fixture
def chain(session: Session) -> Session:
    for number in range(1, 6):
        audit.record(session, "test.event", actor="tester", subject=f"S{number}", details={"n": number})
    session.commit()
    return session


def test_an_untouched_chain_verifies(chain: Session) -> None:
    result = audit.verify(chain)
    assert result.ok and result.entries == 5


def test_an_empty_chain_verifies(session: Session) -> None:
    assert audit.verify(session).ok


def test_an_edited_entry_is_named(chain: Session) -> None:
    chain.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(details='{"n":99}'))
    chain.commit()
    result = audit.verify(chain)
    assert not result.ok and result.broken_seq == 3 and "altered" in (result.problem or "")


def test_an_edited_actor_is_named(chain: Session) -> None:
    chain.execute(update(AuditEvent).where(AuditEvent.seq == 2).values(actor="someone-else"))
    chain.commit()
    assert audit.verify(chain).broken_seq == 2


def test_a_deleted_entry_is_named(chain: Session) -> None:
    chain.execute(delete(AuditEvent).where(AuditEvent.seq == 4))
    chain.commit()
    result = audit.verify(chain)
    assert not result.ok and result.broken_seq == 4 and "missing" in (result.problem or "")


def test_a_deleted_tail_is_detected(chain: Session) -> None:
    chain.execute(delete(AuditEvent).where(AuditEvent.seq == 5))
    chain.commit()
    result = audit.verify(chain)
    assert not result.ok and result.broken_seq == 5 and "removed" in (result.problem or "")


def test_reordered_entries_are_detected(chain: Session) -> None:
    """Swap the content of entries 2 and 3 (keeping their sequence numbers)."""
    rows = {e.seq: e for e in chain.scalars(select(AuditEvent).where(AuditEvent.seq.in_([2, 3])))}
    fields = ("at", "actor", "action", "subject", "details", "prev_hash", "hash")
    two, three = ({f: getattr(rows[n], f) for f in fields} for n in (2, 3))
    chain.execute(update(AuditEvent).where(AuditEvent.seq == 2).values(**three))
    chain.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(**two))
    chain.commit()
    result = audit.verify(chain)
    assert not result.ok and result.broken_seq == 2


def test_a_rewritten_suffix_with_fresh_hashes_still_breaks_at_the_head(chain: Session) -> None:
    """An attacker who recomputes the hashes after an edit must also fix the head row to hide it."""
    last = chain.scalar(select(AuditEvent).where(AuditEvent.seq == 5))
    assert last is not None
    forged = audit.entry_hash(last.prev_hash, 5, last.at, last.actor, last.action, last.subject, '{"n":0}')
    chain.execute(update(AuditEvent).where(AuditEvent.seq == 5).values(details='{"n":0}', hash=forged))
    chain.commit()
    result = audit.verify(chain)
    assert not result.ok and result.broken_seq == 5 and "rewritten" in (result.problem or "")


def test_concurrent_writers_keep_the_chain_linear(store: Store) -> None:
    def write(n: int) -> None:
        with store.session() as session:
            audit.record(session, "test.concurrent", actor=f"writer-{n % 4}", subject=str(n))
            session.commit()

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, range(40)))
    with store.session() as session:
        result = audit.verify(session)
        assert result.ok and result.entries == 40
        subjects = set(session.scalars(select(AuditEvent.subject)))
        assert subjects == {str(n) for n in range(40)}
