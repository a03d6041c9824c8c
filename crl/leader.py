"""One CRL writer at a time: a lease row in the database that watching publishers compete for.

Every ``crl publish --watch`` process, on any number of hosts, tries to hold the one row of
``crl_leader``; the holder (the leader) publishes, the others (followers) only watch the lease. The
lease is taken and renewed by one conditional ``UPDATE`` against the database's clock, so hosts
with skewed clocks agree on when it expires, and ``term`` rises with every change of holder.

Why a lease and not an advisory lock: a session-level advisory lock belongs to a connection, and a
leader cut off from the database keeps it until the server notices the dead connection (TCP
keepalives, minutes by default), while the cut-off leader cannot tell whether it still holds it. A
lease expires on the database's clock whatever happened to the leader's connection, and the leader
knows its own deadline: it stops at ``lease`` seconds after the moment it *sent* its last successful
renewal, which is before the database lets anyone else take over.

Fencing: the CRL number is allocated by an ``UPDATE`` that also requires the lease to be held by this
holder and term and unexpired (``Lease.fence``), so a leader that lost the lease without noticing
(paused, partitioned) cannot publish a CRL after its successor started: the allocation finds no row.
A CRL whose number was allocated under the lease may still be written after it lapsed (building it
takes time); CRL numbers stay strictly increasing across leaders because they come from the database.

Take-over: a follower takes over at most ``lease`` seconds after the leader's last renewal (renewed
every third of the lease), plus one follower check (``FOLLOWER_CHECK`` seconds).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, Float, and_, case, exists, or_, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from ca.errors import ChargepkiError
from ca.store.models import CrlLeader

DEFAULT_LEASE_SECONDS = 15
FOLLOWER_CHECK = 1.0  # seconds between a follower's looks at the lease


class NotLeader(ChargepkiError):
    """This publisher no longer holds the CRL writer lease: another one publishes."""

    code = "not_leader"


class _DbNow(FunctionElement[float]):
    """The database's clock in Unix seconds (every host compares against the same clock)."""

    type = Float()
    inherit_cache = True


@compiles(_DbNow)
def _db_now(element: _DbNow, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(_DbNow, "sqlite")
def _db_now_sqlite(element: _DbNow, compiler: SQLCompiler, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


def holder_name() -> str:
    """This process, recognisably: host, process id and a random part (a restarted process is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"[:200]


class Lease:
    """One publisher's claim on the lease; ``held()`` is its own, conservative view of it."""

    def __init__(
        self, holder: str, seconds: float = DEFAULT_LEASE_SECONDS, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.holder = holder
        self.seconds = seconds
        self.clock = clock
        self.term: int | None = None
        self._valid_until = 0.0  # on this process's monotonic clock
        self._next_look = 0.0

    def held(self) -> bool:
        return self.term is not None and self.clock() < self._valid_until

    def renewal_due(self) -> bool:
        """The leader renews every third of the lease; a follower looks every ``FOLLOWER_CHECK``."""
        return not self.held() or self.clock() >= self._valid_until - self.seconds * 2 / 3

    def look_due(self) -> bool:
        """A follower looks at the lease at most every ``FOLLOWER_CHECK`` seconds."""
        now = self.clock()
        if now < self._next_look:
            return False
        self._next_look = now + FOLLOWER_CHECK
        return True

    def claim(self, session: Session) -> bool:
        """Take the lease when it is free or expired, renew it when held; commits. True: leading.

        One statement, so racing publishers cannot both win: on PostgreSQL the row lock makes the
        second re-check the condition against the first one's update; SQLite serialises writers.
        """
        started = self.clock()
        now = _DbNow()
        mine = and_(
            CrlLeader.holder == self.holder,
            CrlLeader.term == (self.term if self.term is not None else -1),
            CrlLeader.expires > now,
        )
        row = session.execute(
            update(CrlLeader)
            .where(CrlLeader.id == 1, or_(mine, CrlLeader.expires <= now))
            .values(
                holder=self.holder,
                term=case((mine, CrlLeader.term), else_=CrlLeader.term + 1),
                expires=now + self.seconds,
            )
            .returning(CrlLeader.term)
        ).first()
        session.commit()
        if row is None:
            self.term = None
            return False
        self.term, self._valid_until = int(row[0]), started + self.seconds
        return True

    def free(self, session: Session) -> bool:
        """Whether a claim could succeed now (a read: followers look before they write)."""
        expires = session.scalar(select(CrlLeader.expires).where(CrlLeader.id == 1, CrlLeader.expires <= _DbNow()))
        return expires is not None

    def release(self, session: Session) -> None:
        """Let a follower take over at once (a leader stopping cleanly); commits."""
        if self.term is not None:
            session.execute(
                update(CrlLeader)
                .where(CrlLeader.id == 1, CrlLeader.holder == self.holder, CrlLeader.term == self.term)
                .values(expires=_DbNow())
            )
            session.commit()
        self.term = None

    def drop(self) -> None:
        """Forget the lease (the database said another publisher holds it)."""
        self.term = None

    def fence(self) -> ColumnElement[bool]:
        """A condition for the statement that allocates a CRL number: this lease is still held."""
        return exists().where(
            CrlLeader.id == 1,
            CrlLeader.holder == self.holder,
            CrlLeader.term == (self.term if self.term is not None else -1),
            CrlLeader.expires > _DbNow(),
        )


def current_leader(session: Session) -> tuple[str | None, int, bool]:
    """(holder, term, unexpired) of the lease, for status and tests."""
    holder, term, live = session.execute(
        select(CrlLeader.holder, CrlLeader.term, CrlLeader.expires > _DbNow()).where(CrlLeader.id == 1)
    ).one()
    return holder, int(term), bool(live)
