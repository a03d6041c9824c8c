"""The store: SQLite's writer gate (writers queue on it, every way a transaction ends lets the next one in),
which files a store may create, and how long it waits for a lock or a server."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from ca.errors import StoreError
from ca.store.engine import Store


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
