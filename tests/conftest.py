"""Shared fixtures: a real SoftHSM2 token per test session, a fresh database per test on
SQLite and on PostgreSQL, and an initialised CA hierarchy.

PostgreSQL tests skip with a message on a developer machine without PostgreSQL, and fail
instead when ``CHARGEPKI_REQUIRE_POSTGRES=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.config import Config as PkiConfig
from ca.config import EstSettings, Pkcs11Settings, find_softhsm_module, write_config
from ca.keys.pkcs11_token import Token
from ca.keys.softhsm import create_token, write_softhsm_conf
from ca.store.engine import Store
from ca.work import Work
from ocsp.presign import Presigner

if TYPE_CHECKING:
    from tests.hostile import World

PG_ADMIN = os.environ.get("CHARGEPKI_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("CHARGEPKI_REQUIRE_POSTGRES") == "1"
# Why PostgreSQL could not be reached, once known: the rest of the run skips (or fails) at once
# instead of waiting for a connection timeout per test.
_pg_unreachable: list[str] = []

# Property tests: "ci" keeps `make test` fast (a few seconds per property), "fuzz" is the long run
# (HYPOTHESIS_PROFILE=fuzz). The deadline catches slow inputs; tests.hostile.bounded catches hangs.
_HYPOTHESIS_COMMON = {
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
# The deadline flags slow inputs; it is generous because CI machines are shared (hangs are caught anyway).
hypothesis_settings.register_profile("ci", max_examples=40, deadline=10000, **_HYPOTHESIS_COMMON)
hypothesis_settings.register_profile("fuzz", max_examples=5000, deadline=10000, **_HYPOTHESIS_COMMON)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- the token --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SoftHSM2 token directory for the whole run (C_Initialize happens once per process)."""
    conf = tmp_path_factory.mktemp("softhsm") / "softhsm2.conf"
    write_softhsm_conf(conf)
    return conf


def new_token_settings(softhsm_conf: Path, tmp_path: Path) -> tuple[Pkcs11Settings, str]:
    """A fresh token with random PINs (the django-ca habit): isolation without a new process."""
    settings = Pkcs11Settings(
        module=find_softhsm_module(),
        token_label=f"t-{secrets.token_hex(6)}",
        pin_file=tmp_path / "user.pin",
        softhsm_conf=softhsm_conf,
    )
    pin = create_token(settings)
    return settings, pin


@pytest.fixture(scope="session")
def token_settings(softhsm_conf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Pkcs11Settings, str]:
    return new_token_settings(softhsm_conf, tmp_path_factory.mktemp("pins"))


@pytest.fixture(scope="session")
def token(token_settings: tuple[Pkcs11Settings, str]) -> Token:
    settings, pin = token_settings
    return Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)


# -- the database -----------------------------------------------------------------------------
def _postgres_url(schema: str) -> str:
    """The SQLAlchemy URL of one schema in the database ``CHARGEPKI_TEST_PG`` names."""
    url = make_url(PG_ADMIN).set(drivername="postgresql+psycopg")
    url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def postgres_admin() -> psycopg.Connection:
    """An autocommit connection to the test server, or the test skips (fails under ``CHARGEPKI_REQUIRE_POSTGRES=1``).

    Every fixture that needs PostgreSQL goes through here, so the rule holds for all of them.
    """
    if not _pg_unreachable:
        try:
            return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _pg_unreachable.append(f"PostgreSQL unreachable at {PG_ADMIN} ({detail})")
    message = _pg_unreachable[0]
    if REQUIRE_PG:
        pytest.fail(f"{message}; CHARGEPKI_REQUIRE_POSTGRES=1 makes that a failure", pytrace=False)
    pytest.skip(f"{message}; set CHARGEPKI_TEST_PG to a reachable server to run the PostgreSQL half")


@contextmanager
def database(kind: str, directory: Path) -> Iterator[str]:
    """A new, empty database: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'chargepki.db'}"
        return
    schema = f"t_{secrets.token_hex(6)}"
    with postgres_admin() as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield _postgres_url(schema)
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def pytest_report_header(config: pytest.Config) -> list[str]:
    mode = "required (CHARGEPKI_REQUIRE_POSTGRES=1)" if REQUIRE_PG else "optional (skipped when unreachable)"
    lines = [f"chargepki: PostgreSQL tests against {PG_ADMIN}, {mode}"]
    if offset := os.environ.get("CHARGEPKI_CLOCK_OFFSET"):
        lines.append(f"chargepki: system clock moved {offset} by libfaketime (make test-clock)")
    return lines


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


class MigratedSchema:
    """The head schema, migrated once per test process and copied into each test's new database.

    Running Alembic from empty costs 0.3-0.9 s a database (17 migrations, SQLite's table rebuilds). The
    migrations themselves are tested from empty and from a populated first release in
    ``test_migrations.py``, which also checks that this copy equals a migrated database.
    SQLite: the migrated file is copied. PostgreSQL: the statements Alembic sent (all but its
    SELECTs) are replayed into the new schema in one transaction.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._sqlite: Path | None = None
        self._postgresql: list[tuple[str, Any]] | None = None

    def apply(self, url: str) -> None:
        if url.startswith("sqlite"):
            self._copy_sqlite(Path(str(make_url(url).database)))
        else:
            self._replay_postgresql(url)

    def _copy_sqlite(self, target: Path) -> None:
        if self._sqlite is None:
            template = self.directory / "migrated.db"
            migrated = Store(f"sqlite:///{template}")
            migrated.upgrade()
            migrated.dispose()  # the last connection checkpoints and removes the WAL
            assert not template.with_name(template.name + "-wal").exists()
            self._sqlite = template
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(self._sqlite.read_bytes())

    def _replay_postgresql(self, url: str) -> None:
        store = Store(url)
        try:
            if self._postgresql is None:
                sent: list[tuple[str, Any]] = []

                def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
                    if not statement.lstrip().upper().startswith("SELECT"):
                        sent.append((statement, parameters))

                event.listen(store.engine, "before_cursor_execute", record)
                store.upgrade()
                event.remove(store.engine, "before_cursor_execute", record)
                self._postgresql = sent
                return
            with store.engine.begin() as connection:
                for statement, parameters in self._postgresql:
                    connection.exec_driver_sql(statement, parameters)
        finally:
            store.dispose()


@pytest.fixture(scope="session")
def migrated_schema(tmp_path_factory: pytest.TempPathFactory) -> MigratedSchema:
    return MigratedSchema(tmp_path_factory.mktemp("schema"))


@pytest.fixture
def migrated_db_url(db_url: str, migrated_schema: MigratedSchema) -> str:
    """``db_url`` with the head schema already in it (copied, as for ``store``): for a home that a test
    sets up rather than tests the set-up of. A migration from empty costs 0.3-0.9 s; the copy, a few ms."""
    migrated_schema.apply(db_url)
    return db_url


@pytest.fixture
def store(migrated_db_url: str) -> Iterator[Store]:
    store = Store(migrated_db_url)
    yield store
    store.dispose()


@pytest.fixture
def session(store: Store) -> Iterator[Session]:
    with store.session() as session:
        yield session


@pytest.fixture
def hierarchy(session: Session, token: Token, status: Presigner) -> Hierarchy:
    request = HierarchyRequest(organization="Acme Charging", country="DE", environment="production")
    return init_hierarchy(Work(session=session, actor="test", status=status, token=token), request=request)


# -- a home for CLI tests ---------------------------------------------------------------------
@pytest.fixture
def home(tmp_path: Path, migrated_db_url: str, token_settings: tuple[Pkcs11Settings, str]) -> Path:
    """A chargepki home whose config points at the shared test token and the test database (its schema
    already migrated: the first-run tests and ``test_migrations.py`` start from an empty one)."""
    settings, _pin = token_settings
    home = tmp_path / "home"
    write_config(PkiConfig(home=home, database_url=migrated_db_url, pkcs11=settings))
    return home


@pytest.fixture
def status(token: Token) -> Presigner:
    """Pre-signs OCSP responses for what a test issues and revokes (per test: ids differ per database)."""
    return Presigner(token)


# -- worlds for hostile input (tests.hostile.build_world) ---------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    token_settings: tuple[Pkcs11Settings, str],
    migrated_schema: MigratedSchema,
) -> Iterator[World]:
    """One installation shared by a module's tests, on each database: hierarchy, device CP-FUZZ-1 with a
    secret, an issued certificate. EST settings from the module's ``WORLD_EST`` (default: the defaults)."""
    from tests.hostile import build_world

    tmp = tmp_path_factory.mktemp(f"world-{request.param}")
    with database(request.param, tmp) as url:
        migrated_schema.apply(url)
        built = build_world(tmp / "home", url, token_settings[0], getattr(request.module, "WORLD_EST", EstSettings()))
        try:
            yield built
        finally:
            built.close()


@pytest.fixture
def fresh_world(tmp_path: Path, migrated_db_url: str, token_settings: tuple[Pkcs11Settings, str]) -> Iterator[World]:
    """The same installation, new for each test (for tests that count failures or compare snapshots)."""
    from tests.hostile import build_world

    built = build_world(tmp_path / "home", migrated_db_url, token_settings[0])
    yield built
    built.close()
