"""Database access shared by every process: engine set-up, sessions and migrations.

On SQLite every transaction starts with ``BEGIN IMMEDIATE`` so that a read-then-write
transaction never fails half way with ``SQLITE_BUSY`` when another process writes; WAL
lets readers go on meanwhile, and ``synchronous=FULL`` makes a commit survive power loss
(a certificate is only handed out after its row is durably committed). ``?timeout=S`` in an
SQLite URL sets how long a writer waits for the lock (default 30 s) before the request fails.

Only first-run set-up may create an SQLite file: anywhere else a missing file is an error
(``mode=rw``), never a new empty database that makes every certificate look unknown and the
audit log look intact. PostgreSQL connections carry the bounds of ``[database]``
(``postgres_parameters``: connect timeout, TCP keepalives and user timeout, statement and lock
timeouts), so an unreachable or silent server fails a request instead of hanging it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ca.config import DatabaseSettings
from ca.errors import StoreError, one_line

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"


def _code_head() -> str | None:
    """The newest migration this code ships, without importing Alembic.

    Revision ids are the migration files' four-digit prefixes (``0017_crl_entries_index.py`` is
    revision ``0017``, down from ``0016``), one linear chain; ``tests/ca/store/test_migrations.py``
    checks that this agrees with Alembic's own head.
    """
    prefixes = [path.name[:4] for path in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")]
    return max(prefixes, default=None)


CODE_HEAD = _code_head()


def alembic_config() -> AlembicConfig:
    """Alembic's configuration for this code's migrations (imports Alembic: call only to migrate)."""
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


BUSY_TIMEOUT_MS = 30000


def postgres_parameters(query: Mapping[str, Any], settings: DatabaseSettings) -> dict[str, str]:
    """The libpq parameters ``settings`` add to a URL whose query is ``query``.

    Each parameter the URL sets itself wins (an operator's explicit choice, e.g. keepalives off
    for a proxy that handles them); ``statement_timeout`` and ``lock_timeout`` go into libpq's
    ``options`` after whatever the URL's ``options`` already hold, unless those name them.
    """
    wanted = {
        "connect_timeout": settings.connect_timeout_seconds,
        "keepalives": 1,
        "keepalives_idle": settings.keepalives_idle_seconds,
        "keepalives_interval": settings.keepalives_interval_seconds,
        "keepalives_count": settings.keepalives_count,
        "tcp_user_timeout": settings.tcp_user_timeout_ms,
    }
    added = {name: str(value) for name, value in wanted.items() if name not in query}
    options = query.get("options", "")
    options = " ".join(options) if isinstance(options, tuple) else str(options)
    server = {"statement_timeout": settings.statement_timeout_ms, "lock_timeout": settings.lock_timeout_ms}
    extra = [f"-c {name}={value}" for name, value in server.items() if name not in options]
    if extra:
        added["options"] = " ".join([options, *extra]).strip()
    return added


class _WriterGate:
    """Queues this installation's SQLite writers so the next one starts as soon as the last commits.

    Every transaction is a write transaction (``BEGIN IMMEDIATE``), and SQLite's own busy handler
    makes a waiting writer sleep in growing steps up to 100 ms, so under load the lock sat idle
    while writers slept. Threads of a process queue on a lock; the process that holds it takes an
    ``flock`` on ``<database>-writer.lock`` that other processes wait for. Both waits are bounded
    by the busy timeout, after which SQLite's own locking still decides (it alone guarantees safety).

    The wait for the ``flock`` blocks in the kernel, never polls (a 0.5 ms poll burnt CPU
    and lost the lock's hand-over by up to 0.5 ms). ``flock`` itself has no timeout, so a blocking
    call is made by one helper thread per process (started on the first contended wait, gone after
    ``_HELPER_IDLE`` s without one), while the waiting writer waits on a condition with the timeout.
    A lock the helper obtains after its writer gave up is released at once. An uncontended lock is
    taken directly (``LOCK_NB``), without the helper.
    """

    _HELPER_IDLE = 5.0

    def __init__(self, database: Path, timeout: float) -> None:
        self.path = database.with_name(database.name + "-writer.lock")
        self.timeout = timeout
        self._reset()
        gate = weakref.ref(self)  # the fork hook must not keep every Store's gate (and descriptor) alive
        os.register_at_fork(after_in_child=lambda: (g := gate()) is not None and g._after_fork())

    def _reset(self) -> None:
        self._threads = threading.Lock()
        self._file: int | None = None
        self._pid = -1
        # Guarded by ``_state``: this process holds the flock / a writer waits for it / the helper is
        # inside a blocking flock() on ``_file`` (then nobody else calls flock on it) / it is running.
        self._state = threading.Condition(threading.Lock())
        self._holds_file = False
        self._waiting = False
        self._helper_blocked = False
        self._helper_running = False

    def _after_fork(self) -> None:
        self._reset()  # the inherited descriptor shares the parent's lock: never use it; no helper here

    def __del__(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            os.close(self._file)

    def acquire(self) -> bool:
        deadline = time.monotonic() + self.timeout
        if not self._threads.acquire(timeout=self.timeout):
            return False
        try:
            if self._pid != os.getpid():
                self._file, self._pid = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), os.getpid()
            with self._state:
                if not self._helper_blocked:
                    try:
                        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        self._holds_file = True
                        return True
                    except BlockingIOError:
                        pass
                self._waiting = True
                if not self._helper_running:
                    self._helper_running = True
                    threading.Thread(target=self._helper, name="sqlite-writer-gate", daemon=True).start()
                self._state.notify_all()
                try:
                    # The helper gone without the lock: flock() failed; SQLite's own locking decides.
                    ready = lambda: self._holds_file or not self._helper_running  # noqa: E731
                    if self._state.wait_for(ready, max(0.0, deadline - time.monotonic())) and self._holds_file:
                        return True
                finally:
                    self._waiting = False
        except OSError:
            pass
        self._threads.release()
        return False

    def _helper(self) -> None:
        """Blocks in flock() for the writers of this process, one wait at a time."""
        state = self._state
        while True:
            with state:
                if not state.wait_for(lambda: self._waiting and not self._holds_file, self._HELPER_IDLE):
                    self._helper_running = False
                    return
                descriptor = self._file
                self._helper_blocked = True
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)  # type: ignore[arg-type]
                obtained = True
            except OSError:
                obtained = False
            with state:
                self._helper_blocked = False
                if obtained:
                    if self._waiting:
                        self._holds_file = True
                    else:  # the writer gave up meanwhile (timeout): let the other processes in
                        fcntl.flock(descriptor, fcntl.LOCK_UN)  # type: ignore[arg-type]
                state.notify_all()
                if not obtained:
                    self._helper_running = False
                    return

    def release(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            with self._state:
                if self._holds_file:
                    self._holds_file = False
                    fcntl.flock(self._file, fcntl.LOCK_UN)
        with suppress(RuntimeError):  # taken before a fork, released in the child: its lock is a new one
            self._threads.release()


class _GatedConnection(sqlite3.Connection):
    """A sqlite3 connection that leaves the writer gate when its transaction ends, however it ends."""

    gate: _WriterGate | None = None
    holds_gate = False

    def enter_gate(self) -> None:
        if self.gate is not None and not self.holds_gate:
            self.holds_gate = self.gate.acquire()

    def leave_gate(self) -> None:
        if self.holds_gate:
            self.holds_gate = False
            assert self.gate is not None
            self.gate.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            if not self.in_transaction:
                self.leave_gate()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            if not self.in_transaction:
                self.leave_gate()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.leave_gate()


def _sqlite_pragmas(engine: Engine, gate: _WriterGate | None, *, immediate: bool, busy_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        if isinstance(dbapi_connection, _GatedConnection):
            dbapi_connection.gate = gate
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.close()

    if not immediate:
        return  # read-only (OCSP responders): autocommit reads, no write lock, no gate

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        if connection.get_execution_options().get(AUTOCOMMIT_READ):
            return  # ``reading_outside_transaction``: each statement its own snapshot, no write lock, no gate
        dbapi_connection = connection.connection.dbapi_connection
        if isinstance(dbapi_connection, _GatedConnection):
            dbapi_connection.enter_gate()
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            if isinstance(dbapi_connection, _GatedConnection):
                dbapi_connection.leave_gate()
            raise


AUTOCOMMIT_READ = "chargepki_autocommit_read"
_T = TypeVar("_T")


def _refuse_writes_in_reads(engine: Engine) -> None:
    """A connection opened for autocommit reads sends SELECTs only: outside a transaction a write
    would commit on its own, half of a unit of work."""

    @event.listens_for(engine, "before_cursor_execute")
    def _reads_only(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if connection.get_execution_options().get(AUTOCOMMIT_READ) and statement.lstrip()[:6].upper() != "SELECT":
            raise StoreError("a write was attempted in a connection opened for reads only (a programming error)")


@contextmanager
def reading_outside_transaction(session: Session) -> Iterator[Connection]:
    """A connection for read-only statements that need no transaction of ``session``'s, without
    taking SQLite's writer lock.

    On SQLite every transaction of a writing store is ``BEGIN IMMEDIATE`` (the writer lock, and the
    writer gate before it), so a read that starts the session's transaction holds every other writer
    up until that transaction ends. When ``session`` has not begun a transaction yet, the reads run
    on a connection of its own in autocommit (WAL: each statement sees the last commit, one snapshot
    while its rows are read, and locks nothing). Elsewhere (PostgreSQL: a read locks nothing; or a
    transaction already begun) they run in the session's own connection. Only for reads whose
    answer may be a moment old (the same as READ COMMITTED gives).
    """
    bind = session.get_bind()
    if bind.dialect.name != "sqlite" or session.in_transaction():
        yield session.connection()
        return
    with bind.connect() as connection:  # type: ignore[union-attr]
        try:
            yield connection.execution_options(**{AUTOCOMMIT_READ: True})
        finally:
            connection.rollback()  # nothing was begun in SQLite: ends SQLAlchemy's transaction only


_READS = "chargepki_reads_only"


def begin_reads(session: Session) -> None:
    """Begin ``session``'s transaction for reads only (checks before a group-committed write).

    Its statements run in autocommit, each its own snapshot (as READ COMMITTED gives): on SQLite they
    take no writer lock (a thread holding it while it waits for ``Work.write``'s shared transaction
    would wait for itself), on PostgreSQL they cost no BEGIN and COMMIT round trips. Nothing may be
    written in it (a write would commit on its own): the engine refuses anything but a SELECT there.
    Does nothing when the session has begun already.
    """
    if session.in_transaction():
        return
    options: dict[str, Any] = {AUTOCOMMIT_READ: True}
    if session.get_bind().dialect.name != "sqlite":
        options["isolation_level"] = "AUTOCOMMIT"  # no BEGIN and COMMIT round trips for reads
    session.connection(execution_options=options)
    session.info[_READS] = session.get_transaction()


def in_reads(session: Session) -> bool:
    """True while ``session`` is in the transaction ``begin_reads`` began (refused with ORM changes:
    nothing may be written in it)."""
    began = session.info.get(_READS)
    if began is None or not session.in_transaction() or began is not session.get_transaction():
        return False
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("ORM changes in a transaction begun for reads only: they would never be written safely")
    return True


def _core_only(session: Session, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``Session.execute`` would hand this call straight to the connection: a statement
    without ORM entities, in a transaction already begun, with no options, binds or ORM events."""
    if len(args) not in (1, 2) or kwargs.get("execution_options") or kwargs.get("bind_arguments"):
        return False
    if kwargs.get("_parent_execute_state") is not None or kwargs.get("_add_event") is not None:
        return False
    statement = args[0]
    propagate = getattr(statement, "_propagate_attrs", None)
    return (
        propagate is not None
        and not propagate
        and not statement._execution_options
        and session.in_transaction()
        and not session.dispatch.do_orm_execute
    )


def once_more_when_dropped(session: Session, call: Callable[[], _T]) -> _T:
    """``call()`` (a statement of ``session``), sent once more on a new connection when it was the
    first of a transaction and the server had dropped the connection (see ``_Session``).

    Only for writing stores' sessions (``_Session``), and only when nothing else happened in that
    transaction (first statement, no pending ORM changes), so the retry is exactly a new attempt:
    nothing of the transaction reached the server. Read-only stores keep their pool pre-ping."""
    if not isinstance(session, _Session) or session.in_transaction() or not session._is_clean():
        return call()
    try:
        return call()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        session.rollback()
        return call()


class _Session(Session):
    """A session that retries the first statement of a transaction once when its connection was dead.

    No pool pre-ping (a ``SELECT 1`` round trip on every checkout, ~11% of an enrollment's samples on
    PostgreSQL): a connection the server dropped (restart, idle timeout) fails its first
    statement with a disconnect instead; SQLAlchemy then invalidates it and every older pooled
    connection, and this session rolls back and sends the statement again on a new connection
    (``once_more_when_dropped``).
    """

    def _execute_internal(self, *args: Any, **kwargs: Any) -> Any:
        if self.in_transaction() and _core_only(self, args, kwargs):
            # A Core statement (built on tables, or text) inside a transaction: what the ORM does
            # for it is exactly this (no autoflush, no loading), minus ~40 µs of option merging
            # and event dispatch per statement, a tenth of an enrollment's CPU over its statements.
            parameters = args[1] if len(args) > 1 else kwargs.get("params")  # ``scalars`` names them
            result = self.connection().execute(args[0], parameters)
            return result.scalar() if kwargs.get("_scalar_result") else result
        return once_more_when_dropped(self, lambda: super(_Session, self)._execute_internal(*args, **kwargs))


class Store:
    """An engine plus a session factory; the one object a process needs to reach the database."""

    def __init__(
        self, url: str, *, read_only: bool = False, create: bool = True, settings: DatabaseSettings | None = None
    ) -> None:
        """``read_only`` (OCSP responders) reads in autocommit: no write lock, no transaction held.
        ``create=False`` refuses to create a missing SQLite file (read-only stores never create one).
        ``settings``: the PostgreSQL connections' timeouts (default: ``DatabaseSettings()``)."""
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise StoreError(f"invalid database URL {url!r}") from None
        self.url = parsed
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        file_db = self.is_sqlite and parsed.database not in (None, "", ":memory:")
        engine_url = parsed
        self.must_exist: Path | None = None  # an SQLite file this store refuses to create
        busy_ms = BUSY_TIMEOUT_MS
        if self.is_sqlite:
            try:
                busy_ms = int(float(parsed.query.get("timeout", BUSY_TIMEOUT_MS / 1000)) * 1000)  # type: ignore[arg-type]
            except ValueError:
                raise StoreError(f"invalid timeout in database URL {url!r}") from None
        if file_db and not parsed.database.startswith("file:"):  # type: ignore[union-attr]
            if create and not read_only:
                database = Path(str(parsed.database))
                database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                with suppress(OSError):  # a new database file is the owner's only (WAL/SHM follow it)
                    os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            else:
                self.must_exist = Path(str(parsed.database))
                engine_url = parsed.set(database=f"file:{quote(str(parsed.database))}").update_query_dict(
                    {"mode": "rw", "uri": "true"}
                )
        self.settings = settings or DatabaseSettings()
        if parsed.get_backend_name() == "postgresql":
            engine_url = engine_url.update_query_dict(postgres_parameters(parsed.query, self.settings))
        try:
            options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if read_only else {}
            gated = file_db and not read_only
            connect_args = {"factory": _GatedConnection} if gated else {}
            # Writing stores retry a dead connection's first statement (``_Session``) instead of pinging
            # every checkout; read-only stores (OCSP responders, rarely checking out) keep the ping.
            self.engine = create_engine(
                engine_url, pool_pre_ping=read_only and not self.is_sqlite, connect_args=connect_args, **options
            )
        except (ImportError, SQLAlchemyError) as exc:
            raise StoreError(f"cannot use database {parsed.render_as_string(hide_password=True)}: {exc}") from None
        if not read_only:
            _refuse_writes_in_reads(self.engine)
        if self.is_sqlite:
            gate = _WriterGate(Path(str(parsed.database)), busy_ms / 1000) if gated else None
            _sqlite_pragmas(self.engine, gate, immediate=not read_only, busy_ms=busy_ms)
        # Read-only stores (autocommit, pre-ping kept) never retry: a statement there commits on its own.
        self._sessions = sessionmaker(self.engine, class_=Session if read_only else _Session, expire_on_commit=False)

    def session(self, *, bind: Connection | None = None) -> Session:
        """A new session; ``bind``: on that connection of this store's engine instead of its pool."""
        return self._sessions() if bind is None else self._sessions(bind=bind)

    # Alembic is imported where a migration is looked at, not with this module: it costs a process
    # ~0.1-0.15 s of CPU, and every CLI command and service process imports the store, while a schema
    # that is already current needs none of it (``ensure_schema``).
    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to ``revision`` (idempotent), in one transaction.

        On SQLite, batch migrations rebuild a table (copy, drop, rename), and dropping a table
        other rows reference fails while foreign keys are enforced; so, as Alembic's documentation
        advises, enforcement is off for the migration and ``PRAGMA foreign_key_check`` must find
        nothing before the commit. (The pragma is a no-op inside a transaction: it goes first.)
        """
        from alembic import command

        config = alembic_config()
        with self.engine.connect() as connection:
            if self.is_sqlite:
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
            try:
                with connection.begin():
                    if not self.is_sqlite:  # a migration may rewrite a large table: no statement or lock bound
                        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
                        connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
                    config.attributes["connection"] = connection
                    command.upgrade(config, revision)
                    if self.is_sqlite and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").first()):
                        raise StoreError(f"migration left a dangling reference in table {broken[0]}; rolled back")
            finally:
                if self.is_sqlite:
                    with suppress(sqlite3.Error):  # a broken connection is discarded by the pool anyway
                        connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]

    def ensure_schema(self) -> None:
        """Upgrade when the schema is behind this code, as every first run needs.

        The common case, a current schema, is one ``SELECT`` and no Alembic; anything else (a new
        database, an older or unknown revision) goes through Alembic itself.
        """
        try:
            if self._stored_revisions() == [CODE_HEAD]:
                return
            if self.current_revision() != self.head_revision():
                self.upgrade()
        except SQLAlchemyError as exc:
            if self.must_exist is not None and not self.must_exist.exists():
                raise StoreError(
                    f"the SQLite database {self.must_exist} does not exist (moved, or not set up yet: "
                    "`chargepki init`); refusing to start an empty one"
                ) from None
            where = self.url.render_as_string(hide_password=True)
            raise StoreError(f"database unavailable ({where}): {one_line(exc)}") from None

    def _stored_revisions(self) -> list[str] | None:
        """The revisions ``alembic_version`` holds, or None when the statement fails (no such table yet).

        A database that cannot be reached raises, as it would in Alembic: not tried a second time.
        """
        with self.engine.connect() as connection:
            try:
                return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
            except SQLAlchemyError:
                return None

    def dispose(self) -> None:
        self.engine.dispose()
