"""Prepared statements (``ca.store.prepared``): what ``Session.execute`` does, sent through the cursor.

Each test runs on SQLite and on PostgreSQL: the same rows and types back, the same transaction,
the same engine events and errors, and statements it cannot run faithfully refused up front.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, event, func, insert, select, text, update
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from ca.errors import StoreError
from ca.store.engine import Store, begin_reads
from ca.store.models import Device
from ca.store.prepared import Prepared, as_object, as_objects
from tests.conftest import MigratedSchema, postgres_admin

ROOT = Path(__file__).resolve().parents[3]

_DEVICES = Device.__table__
_AT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
_ADD = Prepared(
    insert(_DEVICES)
    .values(
        serial=bindparam("p_serial"),
        environment="production",
        enabled=True,
        enrollment_open=True,
        created_at=bindparam("p_at", type_=_DEVICES.c.created_at.type),
    )
    .returning(_DEVICES.c.id, _DEVICES.c.created_at)
)
_BY_SERIAL_STATEMENT = select(_DEVICES.c.serial, _DEVICES.c.created_at, _DEVICES.c.enabled).where(
    _DEVICES.c.serial == bindparam("p_serial")
)
_BY_SERIAL = Prepared(_BY_SERIAL_STATEMENT)
_DISABLE = Prepared(update(_DEVICES).where(_DEVICES.c.serial.like(bindparam("p_like"))).values(enabled=False))


@pytest.fixture
def fresh(db_url: str, migrated_schema: MigratedSchema) -> Iterator[Store]:
    migrated_schema.apply(db_url)
    store = Store(db_url)
    yield store
    store.dispose()


def test_rows_come_back_with_their_types_and_names_as_from_session_execute(fresh: Store) -> None:
    with fresh.session() as session:
        added = _ADD.run(session, {"p_serial": "CP-PREP-1", "p_at": _AT})
        row_id, created = added.rows[0]
        assert created == _AT and created.tzinfo is not None  # SQLite's text read back as an aware datetime
        found = _BY_SERIAL.run(session, {"p_serial": "CP-PREP-1"}).first()
        expected = session.execute(_BY_SERIAL_STATEMENT, {"p_serial": "CP-PREP-1"}).one()
        assert tuple(found) == tuple(expected) == ("CP-PREP-1", _AT, True)
        assert (found.serial, found.created_at, found.enabled) == ("CP-PREP-1", _AT, True)
        assert _BY_SERIAL.run(session, {"p_serial": "CP-NONE"}).first() is None
        assert _BY_SERIAL.run(session, {"p_serial": "CP-NONE"}).scalar() is None
        assert _ADD.run(session, {"p_serial": "CP-PREP-2", "p_at": _AT}).scalar() == row_id + 1
        assert _DISABLE.run(session, {"p_like": "CP-PREP-%"}).rowcount == 2
        assert _BY_SERIAL.run(session, {"p_serial": "CP-PREP-2"}).scalars() == ["CP-PREP-2"]


def test_it_runs_in_the_sessions_transaction(fresh: Store) -> None:
    """Begun when none is open, committed and rolled back with the session's other work."""
    with fresh.session() as session:
        _ADD.run(session, {"p_serial": "CP-GONE", "p_at": _AT})
        assert session.in_transaction()
        session.rollback()
        _ADD.run(session, {"p_serial": "CP-KEPT", "p_at": _AT})
        session.commit()
    with fresh.session() as session:
        assert session.scalars(select(_DEVICES.c.serial)).all() == ["CP-KEPT"]


def test_engine_events_see_each_statement_and_reads_stay_reads(fresh: Store) -> None:
    """The statement counters of the hot-path guard, and the refusal of a write in a connection
    opened for reads, both hang on ``before_cursor_execute``."""
    seen: list[str] = []

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(fresh.engine, "before_cursor_execute", on_statement)
    try:
        with fresh.session() as session:
            _ADD.run(session, {"p_serial": "CP-SEEN", "p_at": _AT})
            _BY_SERIAL.run(session, {"p_serial": "CP-SEEN"})
            session.commit()
            assert [kind for kind in seen if kind != "BEGIN"] == ["INSERT", "SELECT"]
            begin_reads(session)
            assert _BY_SERIAL.run(session, {"p_serial": "CP-SEEN"}).scalar() == "CP-SEEN"
            with pytest.raises(StoreError, match="reads only"):
                _DISABLE.run(session, {"p_like": "%"})
    finally:
        event.remove(fresh.engine, "before_cursor_execute", on_statement)


def test_database_errors_are_sqlalchemys_and_leave_the_session_usable_after_rollback(fresh: Store) -> None:
    with fresh.session() as session:
        _ADD.run(session, {"p_serial": "CP-TWICE", "p_at": _AT})
        with pytest.raises(IntegrityError):  # the serial is unique; on SQLite the error comes at the fetch
            _ADD.run(session, {"p_serial": "CP-TWICE", "p_at": _AT})
        session.rollback()
        assert _ADD.run(session, {"p_serial": "CP-TWICE", "p_at": _AT}).scalar() is not None


def test_parameters_must_match_the_statement(fresh: Store) -> None:
    with fresh.session() as session:
        with pytest.raises(ArgumentError, match="needs a value for parameter 'p_at'"):
            _ADD.run(session, {"p_serial": "CP-HALF"})
        with pytest.raises(ArgumentError, match="not in the statement: p_typo"):
            _ADD.run(session, {"p_serial": "CP-HALF", "p_at": _AT, "p_typo": 1})
        assert session.scalar(select(func.count()).select_from(_DEVICES)) == 0


def test_statements_it_cannot_run_faithfully_are_refused_when_prepared(fresh: Store) -> None:
    with fresh.session() as session:
        in_list = Prepared(select(_DEVICES.c.id).where(_DEVICES.c.serial.in_(bindparam("p_serials", expanding=True))))
        with pytest.raises(ArgumentError, match="expand"):
            in_list.run(session, {"p_serials": ["a"]})
        defaults = Prepared(insert(_DEVICES).values(serial=bindparam("p_serial"), environment="production"))
        with pytest.raises(ArgumentError, match="Python-side column defaults"):
            defaults.run(session, {"p_serial": "CP-DEFAULT"})
        only_elsewhere = Prepared({"oracle": text("SELECT 1 FROM dual")})
        assert not only_elsewhere.knows(session.get_bind().dialect)
        with pytest.raises(ArgumentError, match="no form of this statement"):
            only_elsewhere.run(session)


def test_one_statement_per_dialect(fresh: Store) -> None:
    both = Prepared({"postgresql": text("SELECT 'postgresql'"), "": text("SELECT 'other'")})
    with fresh.session() as session:
        assert both.run(session).scalar() == ("other" if fresh.is_sqlite else "postgresql")


def test_a_dropped_connection_is_replaced_for_the_first_statement_only(db_url: str, fresh: Store) -> None:
    """As ``Session.execute``: the first statement of a transaction is sent again on a new
    connection, a later one fails (what came before it is lost with the connection)."""
    if db_url.startswith("sqlite"):
        pytest.skip("a server connection")
    backend = Prepared(text("SELECT pg_backend_pid()"))
    with fresh.session() as session:
        pid = backend.run(session).scalar()
    with postgres_admin() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with fresh.session() as session:
        assert backend.run(session).scalar() != pid
        pid = backend.run(session).scalar()
        with postgres_admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(OperationalError):
            backend.run(session)


_DEVICE_ROWS = Prepared(select(_DEVICES).where(_DEVICES.c.serial.like(bindparam("p_like"))).order_by(_DEVICES.c.id))


def test_rows_become_the_orm_objects_a_query_would_give_without_reading_again(fresh: Store) -> None:
    """New objects join the session as loaded (no statement when read, none at the commit); an object
    the session holds is returned as the same object, its expired columns taken from the row."""
    with fresh.session() as session:
        for serial in ("CP-OBJ-1", "CP-OBJ-2"):
            _ADD.run(session, {"p_serial": serial, "p_at": _AT})
        session.commit()
    statements: list[str] = []

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(fresh.engine, "before_cursor_execute", on_statement)
    try:
        with fresh.session() as session:
            held = session.scalars(select(Device).where(Device.serial == "CP-OBJ-2")).one()
            session.expire(held, ["enabled"])
            session.execute(update(_DEVICES).values(enabled=False))  # seen only through the row
            statements.clear()
            devices = as_objects(session, Device, _DEVICE_ROWS.run(session, {"p_like": "CP-OBJ-%"}))
            assert [device.serial for device in devices] == ["CP-OBJ-1", "CP-OBJ-2"]
            assert devices[1] is held and held.enabled is False  # refreshed from the row, not read again
            assert devices[0].created_at == _AT and devices[0].enabled is False
            assert devices[0] in session and not session.dirty
            assert [s.split(None, 1)[0] for s in statements] == ["SELECT"]  # the prepared one only
            devices[0].model = "changed"  # tracked like any loaded object
            session.commit()
        with fresh.session() as session:
            assert session.scalar(select(Device.model).where(Device.serial == "CP-OBJ-1")) == "changed"
    finally:
        event.remove(fresh.engine, "before_cursor_execute", on_statement)


def test_one_row_of_two_tables_gives_an_object_of_each(fresh: Store) -> None:
    """``as_object`` takes a slice of a wider row (a join selecting two tables' columns): each model
    reads its own columns, whatever the other table's are called (both have an ``id``)."""
    with fresh.session() as session:
        for serial in ("CP-PAIR-1", "CP-PAIR-2"):
            _ADD.run(session, {"p_serial": serial, "p_at": _AT})
        session.commit()
    other = _DEVICES.alias("other")
    pair = Prepared(
        select(_DEVICES, other).join(other, other.c.serial == "CP-PAIR-2").where(_DEVICES.c.serial == "CP-PAIR-1")
    )
    width = len(_DEVICES.c)
    with fresh.session() as session:
        row = pair.run(session).first()
        first, second = as_object(session, Device, row[:width]), as_object(session, Device, row[width:])
        assert (first.serial, second.serial) == ("CP-PAIR-1", "CP-PAIR-2") and first.id != second.id
        again = session.scalars(select(Device).where(Device.serial == "CP-PAIR-2")).one()
        assert again is second and second.created_at == _AT and not session.dirty


def test_an_object_made_from_a_row_may_be_the_first_orm_object_of_the_process() -> None:
    """Nothing has configured the mappers yet (no query, no relationship touched): ``as_object``
    configures them itself rather than fail in the ORM (a service's first request did, once the last
    module-level ORM query that configured them at import was gone)."""
    program = (
        "from sqlalchemy.orm import Session\n"
        "from ca.store.models import Device\n"
        "from ca.store.prepared import as_object\n"
        "values = [None] * len(Device.__table__.c)\n"
        "values[list(Device.__table__.c.keys()).index('id')] = 7\n"
        "device = as_object(Session(), Device, values)\n"
        "assert device.id == 7, device\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
