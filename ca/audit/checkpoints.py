"""Signed checkpoints of the audit chain, so that a database writer cannot rewrite it unseen.

The hash chain (``ca/audit.py``) detects any edit that leaves the later hashes alone; someone
with write access to the database can still re-hash everything after an edit, or cut the tail
and move ``audit_head`` back, and the chain is consistent again. A checkpoint is the chain head
(sequence number and hash) signed by the audit key, which is generated in the PKCS#11 token on
first use and never leaves it. Each checkpoint is written three times: a row in the database
(so every host sees it), a line appended to ``<home>/audit-checkpoints.jsonl`` and a line on the
service log (both outside the database, for an operator to ship to a SIEM). ``verify`` checks
every checkpoint's signature against the token's key and that the chain still reaches each one
with the same hash. Threat model: database write access without the token's PIN.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ca import audit
from ca.errors import ChargepkiError, TokenError, one_line
from ca.keys.keyspec import key_spec
from ca.keys.pkcs11_token import KeyMissing, Token
from ca.keys.token_keys import token_private_key
from ca.store.models import AuditCheckpoint, AuditEvent, AuditHead

AUDIT_KEY_LABEL = "chargepki-audit"
FILE_NAME = "audit-checkpoints.jsonl"
_CONTEXT = b"chargepki audit checkpoint\n"  # the signature can never be mistaken for another statement
log = logging.getLogger("chargepki.audit")


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: datetime
    key_sha256: str
    signature: str  # base64

    def message(self) -> bytes:
        document = {"seq": self.seq, "hash": self.hash, "at": self.at.isoformat(), "key": self.key_sha256}
        return _CONTEXT + json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    def line(self) -> str:
        return json.dumps(
            {
                "seq": self.seq,
                "hash": self.hash,
                "at": self.at.isoformat(),
                "key": self.key_sha256,
                "signature": self.signature,
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def _key_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def audit_public_key(token: Token, *, create: bool = False) -> ec.EllipticCurvePublicKey:
    """The audit key's public half; with ``create``, generated in the token when missing."""
    try:
        public_key = token.public_key(AUDIT_KEY_LABEL)
    except KeyMissing:
        if not create:
            raise
        public_key = token.generate_key(key_spec("ec-p256"), AUDIT_KEY_LABEL)
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TokenError(f"the audit key {AUDIT_KEY_LABEL!r} is not an EC key")
    return public_key


_LOCK_HEAD = (
    update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq).returning(AuditHead.seq, AuditHead.hash)
)


def checkpoint(
    session: Session,
    token: Token,
    home: Path | None,
    *,
    only_if_advanced: bool = False,
    interval: timedelta | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Checkpoint | None:
    """Sign the chain head now (summarising counted noise first) and record the checkpoint.

    The head row is locked for the whole step, so the head cannot move under the signature and
    two processes cannot create the audit key at once. The file and the log line are written
    before the commit: a checkpoint outside the database is never missing one inside it.
    ``only_if_advanced`` (the periodic caller): nothing when the head is already checkpointed,
    nor (with ``interval``) when the last checkpoint, by anyone, is younger than ``interval``.
    """
    at = now().astimezone(UTC)
    # Counted noise into the chain first: all of it on demand, finished minutes only when periodic.
    audit.flush_noise(session, before=at.replace(second=0, microsecond=0) if only_if_advanced else None, now=now)
    head = session.execute(_LOCK_HEAD).one()
    if only_if_advanced:
        # Read under the head's lock, which every checkpoint takes: of any number of periodic
        # writers (EST workers, the OCSP refresher, crl publish --watch, other hosts), the first in
        # an interval writes and the others then see its row.
        last = session.execute(
            select(AuditCheckpoint.seq, AuditCheckpoint.at).order_by(AuditCheckpoint.id.desc()).limit(1)
        ).first()
        if last is not None and (last.seq >= head.seq or (interval is not None and last.at > at - interval)):
            session.rollback()
            return None
    public_key = audit_public_key(token, create=True)
    unsigned = Checkpoint(head.seq, head.hash, at, _key_sha256(public_key), "")
    signature = token_private_key(token, AUDIT_KEY_LABEL, public_key).sign(
        unsigned.message(), ec.ECDSA(hashes.SHA256())
    )
    made = Checkpoint(
        unsigned.seq, unsigned.hash, unsigned.at, unsigned.key_sha256, base64.b64encode(signature).decode()
    )
    public_key.verify(signature, made.message(), ec.ECDSA(hashes.SHA256()))  # every signature is checked before use
    if home is not None:
        _append(home / FILE_NAME, made.line())
    log.info("audit checkpoint %s", made.line())
    session.add(
        AuditCheckpoint(seq=made.seq, hash=made.hash, at=made.at, key_sha256=made.key_sha256, signature=made.signature)
    )
    session.commit()
    return made


def periodic_checkpoint(
    session: Session,
    token: Token,
    home: Path | None,
    *,
    interval: timedelta,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Checkpoint | None:
    """What the long-running services call every ``interval`` (``[audit] checkpoint_interval_seconds``):
    a checkpoint when the chain grew since the last one and that one is at least ``interval`` old.
    However many processes call it, one checkpoint is written per interval."""
    return checkpoint(session, token, home, only_if_advanced=True, interval=interval, now=now)


class CheckpointTimer:
    """A service's periodic checkpoint: ``due()`` every ``interval`` (monotonic), ``run`` makes one
    when the database rule above allows; failures (token or database away) are logged and retried at
    the next interval, never raised into the service."""

    def __init__(self, interval: timedelta, *, name: str) -> None:
        self.interval = interval
        self.name = name
        self._next = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def run(self, session: Session, token: Callable[[], Token], home: Path | None) -> Checkpoint | None:
        self._next = time.monotonic() + self.interval.total_seconds()
        try:
            return periodic_checkpoint(session, token(), home, interval=self.interval)
        except (ChargepkiError, SQLAlchemyError, OSError) as exc:
            session.rollback()
            log.warning("%s: no audit checkpoint: %s", self.name, one_line(exc))
            return None


def _append(path: Path, line: str) -> None:
    """One line appended and synced (O_APPEND: concurrent writers never interleave a line); 0600."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, (line + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _from_file(path: Path) -> tuple[list[Checkpoint], list[str]]:
    found, problems = [], []
    if not path.exists():
        return found, problems
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
            found.append(
                Checkpoint(
                    int(data["seq"]), str(data["hash"]), datetime.fromisoformat(data["at"]), str(data["key"]),
                    str(data["signature"]),
                )
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            problems.append(f"line {number} of {path.name} is not a checkpoint")
    return found, problems


@dataclass(frozen=True)
class CheckpointResult:
    ok: bool
    checkpoints: int  # distinct checkpoints checked
    problem: str | None = None
    broken_seq: int | None = None  # the first entry that can no longer be trusted


@dataclass(frozen=True)
class LatestCheckpoint:
    """The newest checkpoint in the database and whether it still holds (``problem`` None)."""

    checkpoint: Checkpoint
    problem: str | None


def _signed_by(made: Checkpoint, public_key: ec.EllipticCurvePublicKey) -> bool:
    try:
        if made.key_sha256 != _key_sha256(public_key):
            return False
        public_key.verify(base64.b64decode(made.signature), made.message(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def latest(session: Session, public_key: Callable[[], ec.EllipticCurvePublicKey]) -> LatestCheckpoint | None:
    """The newest checkpoint, checked on its own: signed by the audit key, and its entry still has the
    signed hash. Cheap enough for every view of the console's audit page; ``audit verify`` checks all.
    ``public_key`` is asked for only when there is a checkpoint."""
    row = session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)).first()
    if row is None:
        session.commit()
        return None
    made = Checkpoint(row.seq, row.hash, row.at, row.key_sha256, row.signature)
    found = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == made.seq)) if made.seq else audit.GENESIS
    session.commit()
    if not _signed_by(made, public_key()):
        return LatestCheckpoint(made, f"the checkpoint of entry {made.seq} is not signed by the audit key")
    if found != (made.hash if made.seq else audit.GENESIS):
        return LatestCheckpoint(made, f"entry {made.seq} is not the one the checkpoint signed")
    return LatestCheckpoint(made, None)


def verify(session: Session, token: Callable[[], Token], home: Path | None) -> CheckpointResult:
    """Every checkpoint (database and file) carries a good signature by the token's audit key, and
    the chain still reaches each one with the same hash. Run after ``audit.verify`` passed.
    ``token`` is asked for only when there are checkpoints to check."""
    from_file, problems = _from_file(home / FILE_NAME) if home is not None else ([], [])
    rows = session.scalars(select(AuditCheckpoint)).all()
    stored = [Checkpoint(r.seq, r.hash, r.at, r.key_sha256, r.signature) for r in rows]
    session.commit()
    if problems:
        return CheckpointResult(False, 0, problems[0])
    unique = {(c.seq, c.hash, c.at, c.signature): c for c in [*from_file, *stored]}
    checkpoints = sorted(unique.values(), key=lambda c: (c.seq, c.at))
    if not checkpoints:
        return CheckpointResult(True, 0)
    public_key = audit_public_key(token())
    for made in checkpoints:
        if not _signed_by(made, public_key):
            return CheckpointResult(
                False,
                len(checkpoints),
                f"the checkpoint of entry {made.seq} ({made.at:%Y-%m-%d %H:%M:%S}) is not signed by the audit key",
            )
    trusted = 0  # the last entry a good checkpoint vouches for
    for made in checkpoints:
        found = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == made.seq)) if made.seq else audit.GENESIS
        if found is None:
            last = session.scalar(select(AuditHead.seq).where(AuditHead.id == 1)) or 0
            session.commit()
            return CheckpointResult(
                False,
                len(checkpoints),
                f"entries after {min(last, made.seq - 1)} were removed: a signed checkpoint names entry {made.seq}",
                min(last, made.seq - 1) + 1,
            )
        if found != (made.hash if made.seq else audit.GENESIS):
            session.commit()
            return CheckpointResult(
                False,
                len(checkpoints),
                f"entry {made.seq} is not the one signed at {made.at:%Y-%m-%d %H:%M:%S}: an entry from {trusted + 1} "
                f"to {made.seq} was rewritten, removed or inserted, and what follows re-hashed",
                trusted + 1,
            )
        trusted = made.seq
    session.commit()
    return CheckpointResult(True, len(checkpoints))
