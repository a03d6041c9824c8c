"""The tamper-evident audit log: append-only rows chained by SHA-256.

Each entry's hash covers the previous entry's hash and the entry's own canonical JSON,
so editing, deleting or reordering any row breaks the chain at that row. The one-row
``audit_head`` names the last entry; appending updates it first, which makes concurrent
writers queue up instead of forking the chain, and lets ``verify`` notice a cut-off tail.
Within one transaction the head is locked after its first entry, so the entries after it chain
on the tail this transaction wrote (``ca.store.transaction_state``) instead of reading the head
again: a group-committed batch of issuances pays for the head's lock once, not once per entry.
Callers must never pass secrets in ``details``.

Refusals of callers that established no identity (no credentials, or refused before the
credentials were checked) are noise an attacker can send at line rate: ``count_noise`` counts
them in ``audit_noise`` (one upsert) and ``flush_noise`` writes one summary entry
(``anonymous.refused``) per address and minute with the count per action and code, deleting
exactly the rows it summarised in the same transaction, so nothing is lost or counted twice.
A known actor's frequent, harmless events (the fleet console's page views) are counted the same
way by ``count_activity`` and summarised as ``activity.summary`` per actor, address and minute.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ca.store.models import AuditEvent, AuditHead, AuditNoise
from ca.store.prepared import Prepared
from ca.store.transaction_state import transaction_state

GENESIS = "0" * 64


def _canonical(seq: int, at: datetime, actor: str, action: str, subject: str | None, details: str) -> bytes:
    document = {
        "seq": seq,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "subject": subject,
        "details": details,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(
    prev_hash: str, seq: int, at: datetime, actor: str, action: str, subject: str | None, details: str
) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + _canonical(seq, at, actor, action, subject, details)).hexdigest()


_HEAD = AuditHead.__table__
# Prepared (``ca.store.prepared``): every issuance and revocation sends these.
_ADVANCE_HEAD = Prepared(
    update(_HEAD).where(_HEAD.c.id == 1).values(seq=_HEAD.c.seq + 1).returning(_HEAD.c.seq, _HEAD.c.hash)
)
_SET_HEAD_HASH = Prepared(update(_HEAD).where(_HEAD.c.id == 1).values(hash=bindparam("hash")))
_SET_HEAD = Prepared(update(_HEAD).where(_HEAD.c.id == 1).values(seq=bindparam("seq"), hash=bindparam("hash")))
_EVENTS = AuditEvent.__table__
_EVENT_COLUMNS = ("seq", "at", "actor", "action", "subject", "details", "prev_hash", "hash")
# e_: not audit_head's names (the PostgreSQL statement below binds both tables)
_EVENT_VALUES = {name: bindparam(f"e_{name}", type_=_EVENTS.c[name].type) for name in _EVENT_COLUMNS}
_INSERT_EVENT = Prepared(insert(_EVENTS).values(_EVENT_VALUES))
# PostgreSQL: the entry and the head's new hash in one statement (a data-modifying CTE), one round trip
# fewer while the head's row lock is held. SQLite has no DML in a CTE: two statements there.
_APPENDED = insert(_EVENTS).values(_EVENT_VALUES)
_APPENDED = _APPENDED.returning(_EVENTS.c.hash).cte("appended")
_INSERT_EVENT_AND_SET_HEAD = Prepared(
    update(_HEAD).where(_HEAD.c.id == 1).values(hash=select(_APPENDED.c.hash).scalar_subquery())
)
# A later entry of the same transaction: the head's lock is already held, its seq moves with the hash.
_INSERT_EVENT_AND_MOVE_HEAD = Prepared(
    update(_HEAD).where(_HEAD.c.id == 1).values(seq=bindparam("h_seq"), hash=select(_APPENDED.c.hash).scalar_subquery())
)
_TAIL = "audit.tail"  # this transaction's last entry: (seq, hash)


def record(
    session: Session,
    action: str,
    *,
    actor: str,
    subject: str | None = None,
    details: dict[str, Any] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    """Append an entry in the caller's transaction (it commits or rolls back with the work it records).

    Call it last before committing: the head row stays locked until the commit. Returns the sequence number.
    The first entry of a transaction advances the head (its lock); a later one of the same transaction
    chains on the tail it remembers and moves the head in the statement that writes it.
    """
    session.flush()
    tail = transaction_state(session).get(_TAIL)
    if tail is None:
        head = _ADVANCE_HEAD.run(session).rows[0]
        seq, prev_hash = head.seq, head.hash
    else:
        seq, prev_hash = tail[0] + 1, tail[1]
    at = now().astimezone(UTC)
    text = json.dumps(details or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    digest = entry_hash(prev_hash, seq, at, actor, action, subject, text)
    # Prepared Core statements, not ORM objects: this runs on every issuance and the ORM costs more.
    parameters = {
        "e_seq": seq,
        "e_at": at,
        "e_actor": actor,
        "e_action": action,
        "e_subject": subject,
        "e_details": text,
        "e_prev_hash": prev_hash,
        "e_hash": digest,
    }
    if session.get_bind().dialect.name == "postgresql":
        if tail is None:
            _INSERT_EVENT_AND_SET_HEAD.run(session, parameters)
        else:
            _INSERT_EVENT_AND_MOVE_HEAD.run(session, {**parameters, "h_seq": seq})
    else:
        _INSERT_EVENT.run(session, parameters)
        if tail is None:
            _SET_HEAD_HASH.run(session, {"hash": digest})
        else:
            _SET_HEAD.run(session, {"seq": seq, "hash": digest})
    transaction_state(session)[_TAIL] = (seq, digest)
    return seq


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    problem: str | None = None
    broken_seq: int | None = None


def verify(session: Session, batch: int = 5000, *, flush: bool = True) -> VerifyResult:
    """Walk the chain from the start; report the first entry that does not fit.

    ``flush``: first summarise the counted noise, so what is verified is everything recorded.
    """
    if flush:
        flush_all_noise(session)
    expected_seq, prev_hash, count = 1, GENESIS, 0
    for event in _stream(session, batch):
        if event.seq != expected_seq:
            return VerifyResult(False, count, f"entry {expected_seq} is missing (next is {event.seq})", expected_seq)
        if event.prev_hash != prev_hash:
            return VerifyResult(False, count, f"entry {event.seq} does not follow entry {event.seq - 1}", event.seq)
        digest = entry_hash(prev_hash, event.seq, event.at, event.actor, event.action, event.subject, event.details)
        if digest != event.hash:
            return VerifyResult(False, count, f"entry {event.seq} was altered", event.seq)
        prev_hash, expected_seq, count = event.hash, expected_seq + 1, count + 1
    head = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one_or_none()
    if head is None:
        return VerifyResult(False, count, "the audit head row is missing", None)
    if head.seq != count:
        return VerifyResult(
            False, count, f"entries after {count} were removed (the head names entry {head.seq})", count + 1
        )
    if head.hash != prev_hash:
        return VerifyResult(
            False, count, f"entry {count} was rewritten (its hash is not the one the head holds)", count
        )
    return VerifyResult(True, count)


def _stream(session: Session, batch: int) -> Iterator[Any]:
    """Plain rows in ``seq`` order, a batch at a time (no ORM identity map to grow)."""
    columns = (
        AuditEvent.seq,
        AuditEvent.at,
        AuditEvent.actor,
        AuditEvent.action,
        AuditEvent.subject,
        AuditEvent.details,
        AuditEvent.prev_hash,
        AuditEvent.hash,
    )
    last = 0
    while True:
        rows = session.execute(
            select(*columns).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


NOISE = "anonymous.refused"
ACTIVITY = "activity.summary"
_NOISE = AuditNoise.__table__
_NOISE_KEY = (_NOISE.c.address, _NOISE.c.minute, _NOISE.c.action, _NOISE.c.code, _NOISE.c.actor)
_COUNT_NOISE = {
    "sqlite": sqlite_insert(_NOISE).on_conflict_do_update(
        index_elements=list(_NOISE_KEY), set_={"count": _NOISE.c.count + 1}
    ),
    "postgresql": postgresql_insert(_NOISE).on_conflict_do_update(
        index_elements=list(_NOISE_KEY), set_={"count": _NOISE.c.count + 1}
    ),
}
_FORGET_NOISE = delete(_NOISE).where(and_(*(column == bindparam(f"k_{column.name}") for column in _NOISE_KEY)))


def _minute(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(second=0, microsecond=0)


def count_noise(
    session: Session,
    *,
    address: str | None,
    action: str,
    code: str,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Count a refusal of a caller that established no identity, in the caller's transaction.

    The count is one atomic upsert; finished minutes are summarised after it, because the summary
    appends to the chain and the audit head must be the last lock a transaction takes (a count
    waiting for a row after taking the head, while a flush holding that row waits for the head,
    was a deadlock on PostgreSQL).
    """
    _count(session, "", address, action, code, now)


def count_activity(
    session: Session,
    *,
    actor: str,
    address: str | None,
    action: str,
    code: str,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Count a known actor's frequent event (a console page view: ``action`` and the page as ``code``),
    summarised per actor, address and minute like the noise; in the caller's transaction."""
    if not actor:
        raise ValueError("count_activity needs an actor (anonymous events are count_noise's)")
    _count(session, actor, address, action, code, now)


def _count(
    session: Session, actor: str, address: str | None, action: str, code: str, now: Callable[[], datetime]
) -> None:
    minute = _minute(now())
    session.execute(
        _COUNT_NOISE[session.get_bind().dialect.name],
        {
            "address": (address or "?")[:128], "minute": minute, "action": action[:64], "code": code[:64],
            "actor": actor[:128], "count": 1,
        },
    )  # fmt: skip
    flush_noise(session, before=minute, now=now)


def flush_noise(
    session: Session, *, before: datetime | None = None, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> int:
    """Summarise counted noise (minutes before ``before``; None: all of it) into the chain, in the
    caller's transaction (which must commit). Returns the number of summary entries written."""
    # A flush never waits for a row: rows another transaction holds (a count in flight, another
    # flush) are skipped and left for the next flush; the only lock it waits for is the audit head,
    # taken last. A count waits at most for a row's holder, which never waits for a row in turn.
    query = select(_NOISE).order_by(_NOISE.c.minute, _NOISE.c.address, _NOISE.c.action, _NOISE.c.code, _NOISE.c.actor)
    if before is not None:
        query = query.where(_NOISE.c.minute < before)
    if session.get_bind().dialect.name == "postgresql":
        # counts cannot move between this read and the delete
        query = query.with_for_update(skip_locked=True)
    rows = session.execute(query).all()
    if not rows:
        return 0
    summaries: dict[tuple[str, str, datetime], dict[str, int]] = {}
    for row in rows:
        counted = summaries.setdefault((row.actor, row.address, row.minute), {})
        key = f"{row.action} {row.code}"
        counted[key] = counted.get(key, 0) + row._mapping["count"]
    for (actor, address, minute), counted in summaries.items():
        # the anonymous ones' details keep their name ("refusals"); a known actor's are its "events"
        record(
            session,
            ACTIVITY if actor else NOISE,
            actor=actor or f"anonymous@{address}"[:128],
            subject=address,
            now=now,
            details={
                "minute": minute.isoformat(),
                "count": sum(counted.values()),
                "events" if actor else "refusals": counted,
            },
        )
    # Exactly the rows read: a row another writer added since is left for the next flush.
    session.execute(
        _FORGET_NOISE,
        [{f"k_{key}": getattr(row, key) for key in ("address", "minute", "action", "code", "actor")} for row in rows],
    )
    return len(summaries)


def flush_all_noise(session: Session, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    """The flush on read: every counted refusal, the running minute's too, into the chain (committed)."""
    written = flush_noise(session, now=now)
    session.commit()
    return written


def events(
    session: Session,
    *,
    action: str | None = None,
    subject: str | None = None,
    actor: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """The newest ``limit`` entries (optionally filtered; ``before``: with a smaller sequence number, the
    next page back), oldest first, counted noise summarised first."""
    flush_all_noise(session)
    query = select(AuditEvent)
    if action:
        query = query.where(AuditEvent.action == action)
    if subject:
        query = query.where(AuditEvent.subject == subject)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if before is not None:
        query = query.where(AuditEvent.seq < before)
    rows = session.scalars(query.order_by(AuditEvent.seq.desc()).limit(limit)).all()
    return list(reversed(rows))
