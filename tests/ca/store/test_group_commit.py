"""Group commit: concurrent writers share one transaction, and nobody learns of success before its commit.

Real stores (SQLite with its writer gate, and PostgreSQL). The batching is made deterministic by
holding the first transaction open until the others have queued, so the tests count transactions
without depending on timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ca.errors import ConflictError
from ca.store.engine import Store
from ca.store.group_commit import GroupCommit


@pytest.fixture
def table(store: Store) -> Iterator[Store]:
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE group_commit_probe (k VARCHAR(40) PRIMARY KEY, v INTEGER NOT NULL)"))
    yield store


def _commits(store: Store) -> list[int]:
    counted = [0]
    event.listen(store.engine, "commit", lambda _conn: counted.__setitem__(0, counted[0] + 1))
    return counted


def _insert(key: str, value: int = 1) -> Callable[[Session], str]:
    def unit(session: Session) -> str:
        session.execute(text("INSERT INTO group_commit_probe (k, v) VALUES (:k, :v)"), {"k": key, "v": value})
        return key

    return unit


def _rows(store: Store) -> dict[str, int]:
    with store.engine.connect() as connection:
        return dict(connection.execute(text("SELECT k, v FROM group_commit_probe")).all())


def _held_first(
    commits: GroupCommit, followers: list[Callable[[Session], Any]], queued: int | None = None
) -> list[Any]:
    """Run a first unit that waits until ``followers`` have all queued behind it (``queued`` of them,
    when some leave the queue at once); return every outcome."""
    started, release = threading.Event(), threading.Event()
    outcomes: dict[int, Any] = {}

    def first(session: Session) -> str:
        session.execute(text("INSERT INTO group_commit_probe (k, v) VALUES ('first', 0)"))
        started.set()
        assert release.wait(30)
        return "first"

    def call(index: int, unit: Callable[[Session], Any]) -> None:
        try:
            outcomes[index] = commits.run(unit)
        except BaseException as exc:  # the outcome is what the tests check
            outcomes[index] = exc

    threads = [threading.Thread(target=call, args=(0, first), daemon=True)]  # a stalled one fails, never hangs
    threads[0].start()
    assert started.wait(30)  # the first transaction is being written: the others must queue
    threads += [threading.Thread(target=call, args=(i + 1, unit), daemon=True) for i, unit in enumerate(followers)]
    for thread in threads[1:]:
        thread.start()
    while commits.waiting < (len(followers) if queued is None else queued):
        threading.Event().wait(0.001)
    release.set()
    for thread in threads:
        thread.join(30)
    return [outcomes[i] for i in range(len(threads))]


def test_writers_that_queue_meanwhile_share_the_next_transaction(table: Store) -> None:
    commits = GroupCommit(table.session)
    counted = _commits(table)
    outcomes = _held_first(commits, [_insert(f"k{i}", i) for i in range(7)])
    assert outcomes == ["first", *[f"k{i}" for i in range(7)]]
    assert counted[0] == 2  # the held one alone, then the seven together
    assert commits.stats.transactions == 2 and commits.stats.largest == 7
    assert _rows(table) == {"first": 0, **{f"k{i}": i for i in range(7)}}


def test_more_writers_than_a_batch_holds_are_written_in_turn_by_the_lead_passed_on(table: Store) -> None:
    """A batch takes at most ``max_batch`` units: the rest wait for the next transaction, led by the
    first of them, and so on until the queue is empty. Nobody waits for a wake-up that never comes."""
    commits = GroupCommit(table.session, max_batch=3)
    counted = _commits(table)
    outcomes = _held_first(commits, [_insert(f"k{i}", i) for i in range(7)])
    assert outcomes == ["first", *[f"k{i}" for i in range(7)]]
    assert counted[0] == 4  # the held one, then 3 + 3 + 1
    assert commits.stats.transactions == 4 and commits.stats.largest == 3
    assert commits.waiting == 0 and not commits._writing  # the lead was handed back, not lost
    assert _rows(table) == {"first": 0, **{f"k{i}": i for i in range(7)}}


class _Interrupted(BaseException):
    """What a waiting thread may be stopped by (KeyboardInterrupt, SystemExit): not an Exception."""


class _InterruptedAfterWaking:
    """A unit's wake-up lock whose thread is stopped right after it is woken (when it would lead)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()

    def acquire(self) -> bool:
        self.lock.acquire()
        raise _Interrupted

    def release(self) -> None:
        self.lock.release()


class _InterruptedAtOnce(_InterruptedAfterWaking):
    """A unit's wake-up lock whose thread is stopped as soon as it starts waiting (still queued)."""

    def acquire(self) -> bool:
        raise _Interrupted


@pytest.mark.parametrize("woken", [False, True], ids=["while-queued", "when-handed-the-lead"])
def test_a_writer_that_stops_waiting_never_leaves_the_others_waiting(
    table: Store, monkeypatch: pytest.MonkeyPatch, woken: bool
) -> None:
    """A thread stopped while it waits (before its turn, or just as it is handed the lead) takes its
    unit out of the queue and passes the lead on: the writers behind it are still written."""
    import ca.store.group_commit as group_commit

    made = [0]
    real = group_commit._held_lock

    def wake_lock() -> Any:
        made[0] += 1
        if made[0] != 2:  # the second unit is the one whose thread is stopped
            return real()
        return _InterruptedAfterWaking() if woken else _InterruptedAtOnce()

    monkeypatch.setattr(group_commit, "_held_lock", wake_lock)
    commits = GroupCommit(table.session, max_batch=1)
    outcomes = _held_first(commits, [_insert("a"), _insert("b")], queued=2 if woken else 1)
    stopped = [outcome for outcome in outcomes[1:] if isinstance(outcome, _Interrupted)]
    written = [outcome for outcome in outcomes[1:] if isinstance(outcome, str)]
    assert len(stopped) == 1 and len(written) == 1, outcomes
    assert commits.waiting == 0 and not commits._writing
    assert _rows(table) == {"first": 0, written[0]: 1}


def test_when_a_transaction_cannot_begin_its_queue_hears_why_and_the_next_writer_leads(
    table: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader that fails before taking the queue fails every unit queued then with its error; a
    writer arriving afterwards still gets a transaction of its own."""
    broken = [True]
    real = table.session

    def sessions(**bind: Any) -> Session:
        if broken[0]:
            raise OperationalError("BEGIN", {}, Exception("unable to open database file"))
        return real(**bind)

    commits = GroupCommit(sessions)
    with pytest.raises(OperationalError):
        commits.run(_insert("lost"))
    assert commits.waiting == 0 and not commits._writing
    broken[0] = False
    assert commits.run(_insert("kept")) == "kept"
    assert _rows(table) == {"kept": 1}


def test_a_unit_that_refuses_fails_alone_and_its_neighbours_are_written(table: Store) -> None:
    """The shared transaction is rolled back and every unit runs again by itself."""

    def refuses(session: Session) -> str:
        _insert("refused")(session)
        raise ConflictError("no", code="test_refusal")

    commits = GroupCommit(table.session)
    outcomes = _held_first(commits, [_insert("a"), refuses, _insert("b")])
    assert outcomes[1:2] == ["a"] and outcomes[3] == "b"
    assert isinstance(outcomes[2], ConflictError)
    assert set(_rows(table)) == {"first", "a", "b"}  # nothing of the refused unit, all of the others
    assert commits.stats.retried_alone == 3


def test_a_conflict_between_two_units_of_one_batch_lets_exactly_one_win(table: Store) -> None:
    """The database's own rule decides inside a batch too: two inserts of one key, one row."""
    commits = GroupCommit(table.session)
    outcomes = _held_first(commits, [_insert("same", 1), _insert("same", 2), _insert("other")])
    winners = [o for o in outcomes[1:3] if o == "same"]
    assert len(winners) == 1 and sum(isinstance(o, Exception) for o in outcomes) == 1
    assert _rows(table)["same"] in (1, 2) and "other" in _rows(table)


def test_when_the_shared_commit_fails_each_unit_is_written_alone(table: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of a failed shared transaction was written: every unit runs again by itself, and a
    caller hears of success only after its own commit."""
    commits = GroupCommit(table.session)
    real_commit = Session.commit
    failures = [1]

    def commit(self: Session) -> None:
        if failures[0] and len(_pending_keys(self)) > 1:
            failures[0] -= 1
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        real_commit(self)

    monkeypatch.setattr(Session, "commit", commit)
    outcomes = _held_first(commits, [_insert("a"), _insert("b")])
    assert outcomes == ["first", "a", "b"]
    assert commits.stats.retried_alone == 2
    assert set(_rows(table)) == {"first", "a", "b"}


def _pending_keys(session: Session) -> list[str]:
    return list(session.execute(text("SELECT k FROM group_commit_probe")).scalars())


def test_a_lone_failed_commit_reaches_its_caller_and_writes_nothing(
    table: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = GroupCommit(table.session)

    def commit(self: Session) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(Session, "commit", commit)
    with pytest.raises(OperationalError):
        commits.run(_insert("lost"))
    monkeypatch.undo()
    assert _rows(table) == {}


def test_many_threads_each_get_their_own_outcome(table: Store) -> None:
    """Unscripted concurrency: 16 threads x 10 writes, every one committed exactly once."""
    commits = GroupCommit(table.session)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        for i in range(10):
            try:
                assert commits.run(_insert(f"t{n}-{i}", i)) == f"t{n}-{i}"
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(_rows(table)) == 160
    assert commits.stats.units == 160 and commits.stats.transactions <= 160


# -- the kept connection ---------------------------------------------------------------------------
def _checkouts(store: Store) -> list[int]:
    counted = [0]
    event.listen(store.engine, "checkout", lambda *_a: counted.__setitem__(0, counted[0] + 1))
    return counted


def test_batches_one_after_another_keep_one_connection_and_close_gives_it_back(table: Store) -> None:
    """Checking a connection out of the pool and back for every transaction cost more than its BEGIN
    and COMMIT: the leaders keep one, and every batch is still its own committed transaction."""
    commits = GroupCommit(table.session)
    checkouts, committed = _checkouts(table), _commits(table)
    for n in range(5):
        assert commits.run(_insert(f"k{n}")) == f"k{n}"
    assert checkouts[0] == 1 and committed[0] == 5
    pool = table.engine.pool
    assert pool.checkedout() == 1  # type: ignore[attr-defined]
    commits.close()
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    assert commits.run(_insert("after")) == "after" and checkouts[0] == 2  # a later batch opens anew
    assert len(_rows(table)) == 6


def test_a_refusal_keeps_the_connection_and_a_broken_transaction_replaces_it(
    table: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit's refusal ends in a rollback that leaves the connection clean: it is kept. A rollback
    that fails leaves it in doubt: it is closed, and the next batch writes on a new one."""
    commits = GroupCommit(table.session)
    checkouts = _checkouts(table)

    def refuses(session: Session) -> str:
        _insert("refused")(session)  # a transaction begun, on either database
        raise ConflictError("no", code="test_refusal")

    assert commits.run(_insert("a")) == "a"
    with pytest.raises(ConflictError):
        commits.run(refuses)
    assert commits.run(_insert("b")) == "b" and checkouts[0] == 1
    real_rollback = Session.rollback
    failing = [True]

    def rollback(self: Session) -> None:
        if failing[0]:
            failing[0] = False
            raise OperationalError("ROLLBACK", {}, Exception("the connection broke"))
        real_rollback(self)

    monkeypatch.setattr(Session, "rollback", rollback)
    with pytest.raises(OperationalError):
        commits.run(refuses)
    monkeypatch.setattr(Session, "rollback", real_rollback)
    assert table.engine.pool.checkedout() == 0  # type: ignore[attr-defined]  # the doubtful one was closed
    assert commits.run(_insert("c")) == "c" and checkouts[0] == 2
    if table.is_sqlite:  # the leader begins first there (BEGIN IMMEDIATE): when that fails, the same
        real_connection = Session.connection

        def connection(self: Session, *args: Any, **kwargs: Any) -> Any:
            raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))

        monkeypatch.setattr(Session, "connection", connection)
        with pytest.raises(OperationalError):
            commits.run(_insert("lost"))
        monkeypatch.setattr(Session, "connection", real_connection)
        assert commits.run(_insert("d")) == "d" and checkouts[0] == 3  # on a new connection again
    assert set(_rows(table)) - {"d"} == {"a", "b", "c"}


def test_after_a_fork_the_child_never_writes_on_its_parents_connection(
    table: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection opened before a fork is the parent's: the child's next batch checks out its own
    and leaves the inherited one alone (closing it would end the parent's session with the server)."""
    commits = GroupCommit(table.session)
    assert commits.run(_insert("parent")) == "parent"
    inherited = commits._held
    assert inherited is not None
    closed: list[object] = []
    monkeypatch.setattr(type(inherited[1]), "close", lambda self: closed.append(self))
    monkeypatch.setattr("ca.store.group_commit.os.getpid", lambda: inherited[2] + 1)
    checkouts = _checkouts(table)
    assert commits.run(_insert("child")) == "child"
    assert checkouts[0] == 1 and closed == [] and commits._held is not None and commits._held[1] is not inherited[1]
