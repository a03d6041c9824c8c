"""Group commit: concurrent writers of one process share a transaction, one commit and one fsync.

An EST worker's threads each issue a certificate in two short write transactions (the serial's
reservation, then the record). Alone, each transaction costs a writer-lock hand-over and an fsync
on SQLite, a WAL flush and the audit head's row lock on PostgreSQL: under load, writers queue on
those far longer than they run. ``GroupCommit.run`` lets whoever arrives while a transaction is
being written wait for the next one, then runs everything that queued meanwhile in one
transaction:

- the thread of the first queued unit becomes the *leader*: it opens a session, runs every queued
  unit in it, commits once, and only then releases every caller with its result (each waiting
  thread is woken once, for its outcome or to lead the next transaction). Nobody sees success
  before the commit that makes it durable; a unit costs the statements it sends, nothing more;
- when anything fails (a unit refuses, the commit fails, a connection is lost, PostgreSQL breaks
  a deadlock), the whole transaction is rolled back, so nothing of it was written, and each unit
  runs again in a transaction of its own: one caller's refusal or conflict never fails a
  neighbour that happened to share its batch, and each gets its own outcome. Refusals inside
  the write are rare (the checks run before it), so this costs less than a savepoint per unit
  (two statements, round trips on PostgreSQL); a client provoking them only undoes the batching.
  A unit must therefore be safe to run again after a rollback (it only sends statements built
  from its captured values).

Units receive the batch's session and must use only it (not a session of their own), and must
not commit, roll back or keep ORM objects they load: the session is emptied after the batch.

The leaders' session is bound to a connection the committer keeps between batches (only one
leader writes at a time): checking a connection out of the pool and back, and making a session and
a connection object, for every transaction cost more Python calls than the transaction's own
BEGIN and COMMIT (``bench/enroll_cpu.py``: 9% of an enrollment's calls, 5% of its CPU under load).
After any failure that leaves the batch's transaction in doubt (not a unit's refusal, which a
rollback answers) it is closed and the next batch checks a new one out, as it does after a fork.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

T = TypeVar("T")

MAX_BATCH = 64


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class _Unit(Generic[T]):
    work: Callable[[Session], T]
    value: Any = None
    error: BaseException | None = None
    done: bool = False
    leads: bool = False  # its thread was handed the lead of the next transaction
    # Released exactly once, by the leader that finished it or made its thread the next leader:
    # each waiting thread is woken only for its own outcome (no thundering herd on every commit).
    # (``_held_lock`` is looked up per unit, so a test can hand one unit a lock of its own.)
    wake: threading.Lock = field(default_factory=lambda: _held_lock(), repr=False)

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class GroupStats:
    """What the committer did, counted (tests and benchmarks read it)."""

    transactions: int = 0
    units: int = 0
    retried_alone: int = 0
    largest: int = 0


@dataclass(eq=False)
class GroupCommit:
    """One per process and store; thread-safe. ``sessions`` makes the batches' session: called with
    ``bind=`` a connection of its engine to keep (``ca.store.engine.Store.session`` takes it); a
    factory whose sessions are not bound to an engine makes one per batch. ``close`` gives the kept
    connection back."""

    sessions: Callable[..., Session]
    max_batch: int = MAX_BATCH
    stats: GroupStats = field(default_factory=GroupStats)
    _state: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _queue: list[_Unit[Any]] = field(default_factory=list, repr=False)
    _writing: bool = field(default=False, repr=False)
    # The kept session, its connection and the process that opened them; only a leader touches them.
    _held: tuple[Session, Connection, int] | None = field(default=None, repr=False)

    @property
    def waiting(self) -> int:
        """Units queued for the next transaction (not the one being written)."""
        with self._state:
            return len(self._queue)

    def run(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a committed transaction, possibly shared; return its value once committed."""
        unit: _Unit[T] = _Unit(work)
        with self._state:
            self._queue.append(unit)
            leading = not self._writing  # nobody writing: the queue was empty, this unit is first
            self._writing = True
        while True:
            if not leading:
                try:
                    unit.wake.acquire()  # until a leader finished this unit or handed it the lead
                except BaseException:  # e.g. KeyboardInterrupt: never leave the others waiting for it
                    self._withdraw(unit)
                    raise
                if unit.done:
                    return unit.outcome()
            batch: list[_Unit[Any]] = []
            try:
                self._write(batch)
            except BaseException as exc:  # e.g. closing the session failed: nobody is told of success
                if not batch:  # failed before taking the queue (the transaction could not begin)
                    batch.extend(self._take())
                for queued in batch:
                    if queued.error is None:
                        queued.value, queued.error = None, exc
                raise
            finally:
                self._hand_over(batch)
            if unit.done:
                return unit.outcome()
            leading = False  # not in this batch (more than ``max_batch`` queued): woken when it leads

    def _hand_over(self, batch: list[_Unit[Any]]) -> None:
        """Release the batch's callers, and make the first queued unit's thread the next leader.

        The lead passes on without ``_writing`` ever dropping while units queue, so the leader is
        always the queue's first unit, and every thread is woken once, for its own outcome or lead.
        """
        with self._state:
            for queued in batch:
                queued.done = True
            following = self._next_leader()
        for queued in batch:
            queued.wake.release()
        if following is not None:
            following.wake.release()

    def _next_leader(self) -> _Unit[Any] | None:
        """Under ``_state``: the first queued unit, marked to lead (``_writing`` stays set), or None."""
        following = self._queue[0] if self._queue else None
        if following is not None:
            following.leads = True
        self._writing = following is not None
        return following

    def _withdraw(self, unit: _Unit[Any]) -> None:
        """A thread stopped waiting without its outcome: its unit leaves the queue (one a leader took
        already still runs), and a lead handed to it passes on, so the queue never stalls on it."""
        with self._state:
            if unit.done or unit not in self._queue:
                return
            self._queue.remove(unit)
            following = self._next_leader() if unit.leads else None
        if following is not None:
            following.wake.release()

    def _take(self) -> list[_Unit[Any]]:
        with self._state:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        return batch

    def _write(self, batch: list[_Unit[Any]]) -> None:
        """Begin, then take what queued (into ``batch``), run it, commit.

        On SQLite the queue is taken only once the transaction has begun: beginning takes the writer
        lock, which another process may hold for a while, and whatever queued meanwhile joins this
        transaction instead of waiting for the next one (fewer, larger commits under load). Elsewhere
        beginning locks nothing (the first statement sends BEGIN), and that first statement must stay
        the one the session retries on a connection the server dropped (``ca.store.engine._Session``).
        """
        session, connection = self._session()
        settled = False  # every transaction of the batch ended in a commit or a rollback that returned
        try:
            if session.get_bind().dialect.name == "sqlite":
                session.connection()
            batch.extend(self._take())
            try:
                for unit in batch:
                    unit.value = unit.work(session)
                session.commit()
            except BaseException as exc:
                session.rollback()
                if len(batch) == 1 or not isinstance(exc, Exception):
                    for unit in batch:
                        unit.value, unit.error = None, exc
                    settled = isinstance(exc, Exception)
                    return
                self._alone(session, batch)  # nothing of the batch was written: each unit on its own
                settled = True
                return
            self._count(len(batch))
            settled = True
        finally:
            if settled and connection is not None and not connection.invalidated and not connection.in_transaction():
                session.expunge_all()  # kept, with its connection, for the next batch
            else:
                self._discard(session, connection)

    def _session(self) -> tuple[Session, Connection | None]:
        """The batch's session, and the connection it is bound to when it is the kept one."""
        if self._held is not None:
            session, connection, pid = self._held
            if pid == os.getpid():
                return session, connection
            self._held = None  # opened before a fork: the parent's connection, never used here
        made = self.sessions()
        engine = made.get_bind()
        if not isinstance(engine, Engine):
            return made, None
        made.close()
        connection = engine.connect()
        try:
            session = self.sessions(bind=connection)
        except BaseException:
            connection.close()
            raise
        self._held = (session, connection, os.getpid())
        return session, connection

    def _discard(self, session: Session, connection: Connection | None) -> None:
        """Close ``session`` and the kept connection, if it was on it (the next batch checks out anew):
        a session made for one batch, or the kept one after a failure that may have left it or its
        connection broken or inside a transaction."""
        with suppress(Exception):  # closing what failed may fail too: nothing of it is used again
            session.close()
        if connection is not None:
            self._held = None
            with suppress(Exception):
                connection.close()

    def close(self) -> None:
        """Give the kept connection back (the process is done writing; a later batch opens anew)."""
        with self._state:
            held, self._held = self._held, None
        if held is not None and held[2] == os.getpid():
            with suppress(Exception):
                held[0].close()
            with suppress(Exception):
                held[1].close()

    def _alone(self, session: Session, batch: list[_Unit[Any]]) -> None:
        """The shared transaction failed and wrote nothing: each unit again, in its own."""
        for unit in batch:
            unit.value, unit.error = None, None
            try:
                unit.value = unit.work(session)
                session.commit()
            except BaseException as exc:
                session.rollback()
                unit.error = exc
            with self._state:
                self.stats.retried_alone += 1
            self._count(1)

    def _count(self, units: int) -> None:
        with self._state:
            self.stats.transactions += 1
            self.stats.units += units
            self.stats.largest = max(self.stats.largest, units)
