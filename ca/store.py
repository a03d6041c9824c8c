"""Database access shared by every process: engine set-up, sessions and migrations.

On SQLite every transaction starts with ``BEGIN IMMEDIATE`` so that a read-then-write
transaction never fails half way with ``SQLITE_BUSY`` when another process writes; WAL
lets readers go on meanwhile, and ``synchronous=FULL`` makes a commit survive power loss
(a certificate is only handed out after its row is durably committed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ca.errors import StoreError

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(engine: Engine, *, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    if immediate:

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    """An engine plus a session factory; the one object a process needs to reach the database."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        """``read_only`` (OCSP responders) reads in autocommit: no write lock, no transaction held."""
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise StoreError(f"invalid database URL {url!r}") from None
        self.url = parsed
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            options = {"isolation_level": "AUTOCOMMIT"} if read_only else {}
            self.engine = create_engine(parsed, pool_pre_ping=not self.is_sqlite, **options)
        except (ImportError, SQLAlchemyError) as exc:
            raise StoreError(f"cannot use database {parsed.render_as_string(hide_password=True)}: {exc}") from None
        if self.is_sqlite:
            _sqlite_pragmas(self.engine, immediate=not read_only)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._sessions()

    def _alembic(self) -> AlembicConfig:
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        return config

    def current_revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(self._alembic()).get_current_head()

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to ``revision`` (idempotent)."""
        config = self._alembic()
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def ensure_schema(self) -> None:
        """Upgrade when the schema is behind this code, as every first run needs."""
        try:
            if self.current_revision() != self.head_revision():
                self.upgrade()
        except SQLAlchemyError as exc:
            raise StoreError(f"database unavailable: {_one_line(exc)}") from None

    def dispose(self) -> None:
        self.engine.dispose()


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
