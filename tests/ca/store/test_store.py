"""The store: SQLite's writer gate (writers queue on it, every way a transaction ends lets the next one in),
which files a store may create, and how long it waits for a lock or a server."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import bindparam, func, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ca.config import DatabaseSettings, load_config
from ca.errors import ConfigError, StoreError
from ca.store.engine import Store, _WriterGate
from ca.store.group_commit import GroupCommit
from ca.store.models import Device
from tests.conftest import MigratedSchema, _postgres_url, postgres_admin


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'gate.db'}")
    with store.engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (n INTEGER)")
    return store


def _gate_taken(store: Store) -> bool:
    with store.engine.connect() as probe:  # a pooled connection knows the gate
        gate = probe.connection.dbapi_connection.gate  # type: ignore[union-attr]
    return gate._threads.locked()


@pytest.mark.parametrize("ending", ["commit", "rollback", "close", "error"])
def test_every_end_of_a_transaction_opens_the_gate(store: Store, ending: str) -> None:
    session = store.session()
    session.execute(text("INSERT INTO t VALUES (1)"))
    assert _gate_taken(store)
    if ending == "commit":
        session.commit()
    elif ending == "rollback":
        session.rollback()
    elif ending == "close":
        session.close()
    else:
        with pytest.raises(OperationalError):
            session.execute(text("INSERT INTO missing VALUES (1)"))
        session.rollback()
    assert not _gate_taken(store)
    session.close()


def test_concurrent_writers_all_commit(store: Store) -> None:
    def write(n: int) -> None:
        for _ in range(20):
            with store.session() as session:
                count = session.execute(text("SELECT count(*) FROM t")).scalar_one()
                session.execute(text("INSERT INTO t VALUES (:n)"), {"n": count})
                session.commit()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with store.session() as session:
        values = session.execute(text("SELECT n FROM t ORDER BY n")).scalars().all()
    assert values == list(range(160)), "each writer saw every earlier commit (writers never overlapped)"
    assert not _gate_taken(store)


def test_only_first_run_set_up_creates_an_sqlite_file(tmp_path: Path) -> None:
    """Elsewhere a missing file is an error: a new empty database would make every certificate
    look unknown and an empty audit log look intact."""
    path = tmp_path / "gone" / "chargepki.db"
    for store in (Store(f"sqlite:///{path}", create=False), Store(f"sqlite:///{path}", read_only=True)):
        with pytest.raises(StoreError, match="does not exist"):
            store.ensure_schema()
        store.dispose()
    assert not path.exists()
    created = Store(f"sqlite:///{path}?timeout=2")
    created.ensure_schema()
    assert path.exists()
    with created.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2000  # ?timeout= is the lock wait
    created.dispose()
    reopened = Store(f"sqlite:///{path}", create=False)
    reopened.ensure_schema()
    reopened.dispose()


def test_postgresql_connections_give_up_after_a_timeout() -> None:
    store = Store("postgresql+psycopg://nobody@127.0.0.1:9/none")
    assert store.engine.url.query["connect_timeout"] == "5"
    assert (
        Store("postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=1").engine.url.query["connect_timeout"]
        == "1"
    )


def test_every_postgresql_connection_carries_the_configured_bounds_and_the_url_wins(tmp_path: Path) -> None:
    """Keepalives and TCP user timeout on the client's socket, statement and lock timeouts in the
    session; a parameter the URL sets itself (here keepalives_idle, lock_timeout) is kept."""
    admin = postgres_admin()
    admin.close()
    settings = DatabaseSettings(statement_timeout_ms=4321, lock_timeout_ms=1234, tcp_user_timeout_ms=2500)
    url = _postgres_url("public")
    own = url + "&keepalives_idle=9&options=-c%20lock_timeout%3D777"
    for given, idle, lock in ((url, 5, "1234ms"), (own, 9, "777ms")):
        store = Store(given, settings=settings)
        try:
            with store.engine.connect() as connection:
                assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "4321ms"
                assert connection.exec_driver_sql("SHOW lock_timeout").scalar() == lock
                sock = socket.socket(fileno=os.dup(connection.connection.dbapi_connection.fileno()))  # type: ignore[union-attr]
                try:
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
                finally:
                    sock.detach()
        finally:
            store.dispose()
    # Migrations run without either bound (a table rewrite may take long): tested by their own tests.


def test_database_settings_are_read_from_the_file_and_checked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    settings = '[database]\nurl = "sqlite:///x.db"\nstatement_timeout_ms = 0\nkeepalives_count = 5\n'
    (home / "chargepki.toml").write_text(settings)
    config = load_config(home, {})
    assert config.database == DatabaseSettings(statement_timeout_ms=0, keepalives_count=5)
    for bad in ("keepalives_count = 0", "lock_timeout_ms = -1", 'connect_timeout_seconds = "3"', "nonsense = 1"):
        (home / "chargepki.toml").write_text(f"[database]\n{bad}\n")
        with pytest.raises(ConfigError):
            load_config(home, {})


# -- the gate waits in the kernel, not in a poll -------------------------------------
def _held_elsewhere(gate_path: Path) -> int:
    """The writer lock taken through another open file description: to flock(), another process."""
    descriptor = os.open(gate_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def test_a_waiting_writer_sleeps_until_the_lock_is_released(tmp_path: Path) -> None:
    gate = _WriterGate(tmp_path / "w.db", timeout=10.0)
    other = _held_elsewhere(gate.path)
    outcome: dict[str, float | bool] = {}

    def writer() -> None:
        started = time.thread_time()
        outcome["acquired"] = gate.acquire()
        outcome["cpu"] = time.thread_time() - started
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.5)
    assert "acquired" not in outcome, "the lock is held elsewhere"
    released = time.monotonic()
    fcntl.flock(other, fcntl.LOCK_UN)
    thread.join(10)
    assert outcome["acquired"] is True
    # The old gate polled every 0.5 ms: ~1000 wake-ups in this wait. A blocking wait costs next to no CPU.
    assert outcome["cpu"] < 0.05, f"{outcome['cpu']:.3f} s CPU spent waiting for the lock"
    assert float(outcome["at"]) - released < 2.0
    with pytest.raises(BlockingIOError):  # the gate holds it now
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    gate.release()
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)


def test_a_writer_that_gave_up_leaves_the_lock_to_the_others(tmp_path: Path) -> None:
    gate = _WriterGate(tmp_path / "w.db", timeout=0.2)
    other = _held_elsewhere(gate.path)
    assert gate.acquire() is False, "bounded by the timeout"
    assert not gate._threads.locked(), "the threads of this process are not held up either"
    fcntl.flock(other, fcntl.LOCK_UN)
    deadline = time.monotonic() + 5
    while True:  # the helper obtains the lock for nobody and must hand it straight back
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, "the abandoned wait kept the lock"
            time.sleep(0.01)
    fcntl.flock(other, fcntl.LOCK_UN)
    assert gate.acquire() is True
    gate.release()
    os.close(other)


def test_gated_threads_and_processes_take_turns(tmp_path: Path) -> None:
    """Threads of two gates (as two processes) over one lock file: never two holders at once."""
    gates = [_WriterGate(tmp_path / "w.db", timeout=10.0) for _ in range(2)]
    inside, overlaps, turns = [0], [0], [0]
    guard = threading.Lock()

    def work(gate: _WriterGate) -> None:
        for _ in range(50):
            assert gate.acquire()
            with guard:
                inside[0] += 1
                overlaps[0] += inside[0] > 1
            time.sleep(0.0005)
            with guard:
                inside[0] -= 1
                turns[0] += 1
            gate.release()

    threads = [threading.Thread(target=work, args=(gate,)) for gate in gates for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert turns[0] == 300 and overlaps[0] == 0


# -- no pre-ping: a dead connection's first statement is retried --------------------------------
def test_a_connection_the_server_dropped_is_replaced_without_a_ping(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("a server connection")
    store = Store(db_url)
    try:
        with store.session() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with postgres_admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        pings = []
        real_ping = store.engine.dialect.do_ping
        store.engine.dialect.do_ping = lambda connection: pings.append(1) or real_ping(connection)  # type: ignore[method-assign]
        with store.session() as session:  # the pooled connection is dead: retried on a new one
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
            session.commit()
        assert pings == []
        with store.session() as session:  # a statement later in a transaction is never replayed
            session.execute(text("SELECT 1"))
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with postgres_admin() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(OperationalError):
                session.execute(text("SELECT 1"))
    finally:
        store.dispose()


def test_a_group_committed_write_on_a_dropped_connection_is_retried_without_a_ping(db_url: str) -> None:
    """The group commit's leader hands its first statement to the same retry: a lone write after a
    server restart succeeds on a new connection instead of failing its caller."""
    if db_url.startswith("sqlite"):
        pytest.skip("a server connection")
    store = Store(db_url)
    try:
        with store.session() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with postgres_admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        commits = GroupCommit(store.session)
        backend = lambda tx: tx.execute(text("SELECT pg_backend_pid()")).scalar_one()  # noqa: E731
        kept = commits.run(backend)
        assert kept != pid
        assert commits.stats.retried_alone == 0  # the statement was retried, not the unit
        # The connection the leaders keep between batches, dropped by the server: the same retry.
        with postgres_admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (kept,))
        assert commits.run(backend) not in (kept, pid)
        assert commits.stats.retried_alone == 0
        commits.close()
    finally:
        store.dispose()


# -- Core statements inside a transaction go straight to the connection --------------------------
def test_core_statements_in_a_transaction_skip_the_orm_but_not_its_semantics(
    db_url: str, migrated_schema: MigratedSchema
) -> None:
    """Same rows, same scalars, same transaction, same errors; ORM statements still load objects,
    and calls with options still take the ORM's path."""
    migrated_schema.apply(db_url)
    store = Store(db_url)
    devices = Device.__table__
    new = {"environment": "production", "created_at": datetime(2026, 1, 1, tzinfo=UTC)}
    through_orm: list[object] = []
    real = Session._execute_internal
    try:
        Session._execute_internal = lambda self, *a, **k: through_orm.append(a[0]) or real(self, *a, **k)  # type: ignore[method-assign]
        with store.session() as session:
            session.execute(text("SELECT 1"))  # the first statement begins the transaction the ORM's way
            through_orm.clear()
            session.execute(insert(devices).values(serial="CP-FAST-1", **new))
            assert session.scalar(select(func.count()).select_from(devices)) == 1
            assert session.execute(select(devices.c.serial, devices.c.created_at)).all() == [
                ("CP-FAST-1", datetime(2026, 1, 1, tzinfo=UTC))
            ]
            by_serial = select(devices.c.serial).where(devices.c.serial == bindparam("serial"))
            assert session.scalars(by_serial, {"serial": "CP-FAST-1"}).all() == ["CP-FAST-1"]  # params by name
            assert session.scalars(by_serial, {"serial": "CP-NONE"}).all() == []
            assert through_orm == []  # five Core statements, none through the ORM
            device = session.scalar(select(Device).where(Device.serial == "CP-FAST-1"))
            assert isinstance(device, Device) and device.enrollment_open and len(through_orm) == 1
            session.execute(select(func.count()).select_from(devices), execution_options={"yield_per": 10})
            assert len(through_orm) == 2  # options: the ORM's path
            session.rollback()
        with store.session() as session:  # rolled back with the transaction, like any statement in it
            assert session.scalar(select(func.count()).select_from(devices)) == 0
            session.execute(insert(devices).values(serial="CP-DUP", **new))
            with pytest.raises(IntegrityError):  # errors arrive wrapped, as from the ORM's path
                session.execute(insert(devices).values(serial="CP-DUP", **new))
    finally:
        Session._execute_internal = real  # type: ignore[method-assign]
        store.dispose()
