"""CPU per SQL statement by the way it is sent: what each layer of SQLAlchemy costs on the hot path.

One prebuilt Core UPDATE (the status feed's counter, sent by every issuance and revocation) run
``--count`` times inside one transaction of a real ``Store`` (its engine events included) on
SQLite, four ways: ``Session.execute`` (what the core calls), the session's connection
``Connection.execute``, the connection's ``exec_driver_sql`` with the SQL text, and the DB-API
cursor. ``time.thread_time`` per statement, so other load on the machine barely moves it.

    .venv/bin/python bench/statement_micro.py [--count 3000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

from sqlalchemy.orm import Session  # noqa: E402

from ca.status.signal import _RAISE_COUNTER  # noqa: E402
from ca.store.engine import Store  # noqa: E402
from ca.store.prepared import Prepared  # noqa: E402

RAISE = Prepared(_RAISE_COUNTER)
SQL = "UPDATE status_feed SET counter = counter + 1 WHERE id = 1"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=3000)
    args = parser.parse_args()
    store = Store(f"sqlite:///{tempfile.mkdtemp(prefix='chargepki-statement-')}/bench.db")
    store.upgrade()
    ways: list[tuple[str, Callable[[Session], object]]] = [
        ("Session.execute(prebuilt Core statement)", lambda s: s.execute(_RAISE_COUNTER)),
        ("session.connection().execute(same)", lambda s: s.connection().execute(_RAISE_COUNTER)),
        ("Prepared(same).run(session) (ca.store.prepared)", lambda s: RAISE.run(s)),
        ("session.connection().exec_driver_sql(SQL text)", lambda s: s.connection().exec_driver_sql(SQL)),
        (
            "DB-API cursor (no events, no error wrapping)",
            lambda s: s.connection().connection.dbapi_connection.execute(SQL),
        ),  # type: ignore[union-attr]
    ]
    for label, send in ways:
        with store.session() as session, session.begin():
            send(session)  # begins the transaction, warms the compiled cache
            started = time.thread_time()
            for _ in range(args.count):
                send(session)
            spent = time.thread_time() - started
        print(f"{label:50s} {spent / args.count * 1e6:7.1f} µs")
    store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
