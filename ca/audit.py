"""The tamper-evident audit log: append-only rows chained by SHA-256.

Each entry's hash covers the previous entry's hash and the entry's own canonical JSON,
so editing, deleting or reordering any row breaks the chain at that row. The one-row
``audit_head`` names the last entry; appending updates it first, which makes concurrent
writers queue up instead of forking the chain, and lets ``verify`` notice a cut-off tail.
Callers must never pass secrets in ``details``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from ca.models import AuditEvent, AuditHead

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
_ADVANCE_HEAD = update(_HEAD).where(_HEAD.c.id == 1).values(seq=_HEAD.c.seq + 1).returning(_HEAD.c.seq, _HEAD.c.hash)
_SET_HEAD_HASH = update(_HEAD).where(_HEAD.c.id == 1).values(hash=bindparam("hash"))
_INSERT_EVENT = insert(AuditEvent.__table__)


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
    """
    session.flush()
    head = session.execute(_ADVANCE_HEAD).one()
    seq, prev_hash = head.seq, head.hash
    at = now().astimezone(UTC)
    text = json.dumps(details or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    digest = entry_hash(prev_hash, seq, at, actor, action, subject, text)
    # Prepared Core statements, not ORM objects: this runs on every issuance and the ORM costs more.
    session.execute(
        _INSERT_EVENT,
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": text,
            "prev_hash": prev_hash,
            "hash": digest,
        },
    )
    session.execute(_SET_HEAD_HASH, {"hash": digest})
    return seq


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    problem: str | None = None
    broken_seq: int | None = None


def verify(session: Session, batch: int = 5000) -> VerifyResult:
    """Walk the chain from the start; report the first entry that does not fit."""
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


def events(
    session: Session, *, action: str | None = None, subject: str | None = None, limit: int = 100
) -> list[AuditEvent]:
    """The newest ``limit`` entries (optionally filtered), oldest first."""
    query = select(AuditEvent)
    if action:
        query = query.where(AuditEvent.action == action)
    if subject:
        query = query.where(AuditEvent.subject == subject)
    rows = session.scalars(query.order_by(AuditEvent.seq.desc()).limit(limit)).all()
    return list(reversed(rows))
