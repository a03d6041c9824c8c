"""Hot-path lookups on a store of 1,000,000 certificates, SQLite and PostgreSQL.

Each database gets the schema from the migrations, then by bulk load (one sqlite3 transaction;
PostgreSQL COPY) N certificates of one issuing CA (1% revoked, not_after spread over two years,
~480-byte DER blobs), N/2 devices with a one-time secret each, and a pre-signed ~480-byte
response per certificate, then ANALYZE. Then each lookup runs through the code the services call
(``ca.*``, ``ocsp.source.StoreSource``, ``crl.publisher``), one at a time in one process, over
random keys, after a short warm-up; the figures are per call, SQLAlchemy and driver included.

    .venv/bin/python bench/lookups.py [--rows 1000000] [--lookups 10000] [--databases sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import re
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import psycopg
from sqlalchemy import event, select
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ca.enrollment.authenticators import presented_certificate  # noqa: E402
from ca.issuance.serials import format_serial  # noqa: E402
from ca.registry.devices import current_certificate, get_device  # noqa: E402
from ca.registry.secrets import secret_is_valid  # noqa: E402
from ca.status.certificates import get_certificate, list_certificates  # noqa: E402
from ca.store.engine import Store  # noqa: E402
from ca.store.models import Certificate, Device, KeyOwner  # noqa: E402
from crl.publisher import revocation_summary, revoked_rows, status_counter  # noqa: E402
from ocsp.presign import OcspPolicy, due_certificates  # noqa: E402
from ocsp.source import StoreSource  # noqa: E402

SIGNER = "5EED"  # the signer serial every bulk response names: the refresher finds none of them due
BLOB = 480  # bytes: a P-256 charger certificate with AIA and CDP, and its OCSP response, are about this size
CERTIFICATE_COLUMNS = (
    "id", "serial", "authority_id", "profile", "status", "subject", "common_name", "not_before", "not_after", "der",
    "fingerprint_sha256", "public_key_sha256", "device_id", "revoked_at", "revocation_reason", "created_at",
)  # fmt: skip
RESPONSE_COLUMNS = (
    "id", "authority_id", "serial", "hash_algorithm", "cert_status", "der", "this_update", "next_update",
    "signer_serial",
)  # fmt: skip
DEVICE_COLUMNS = ("id", "serial", "model", "environment", "enabled", "enrollment_open", "created_at")
SECRET_COLUMNS = ("id", "device_id", "secret_hash", "expires_at", "created_at")
KEY_OWNER_COLUMNS = ("public_key_sha256", "identity", "created_at")


# -- the data set: every key derives from the row number, so lookups can pick any row ------------
def serial(n: int) -> str:
    return format_serial(int.from_bytes(hashlib.sha1(b"serial%d" % n).digest()[:19], "big") | 1)


def der(n: int) -> bytes:
    return hashlib.sha256(b"der%d" % n).digest() + bytes(BLOB - 32)


def device_serial(d: int) -> str:
    return f"CP-{d:07d}"


def secret(d: int) -> str:
    return f"secret-{d}"


@dataclass
class Fleet:
    rows: int
    now: datetime
    authority_id: int = 1

    @property
    def devices(self) -> int:
        return self.rows // 2

    def revoked(self, n: int) -> bool:
        return n % 100 == 0

    def certificate(self, n: int) -> tuple:
        revoked = self.revoked(n)
        d = n // 2  # two certificates per device: the current one and the one it superseded
        not_after = self.now + timedelta(days=1 + n % 730, seconds=n % 86400)
        return (
            n + 1, serial(n), self.authority_id, "charger", "revoked" if revoked else "valid",
            f"C=DE,O=Bench Charging,CN={device_serial(d)}", device_serial(d), not_after - timedelta(days=730),
            not_after, der(n), hashlib.sha256(der(n)).hexdigest(), hashlib.sha256(b"key%d" % n).hexdigest(), d + 1,
            self.now - timedelta(days=1) if revoked else None, "keyCompromise" if revoked else None, self.now,
        )  # fmt: skip

    def response(self, n: int) -> tuple:
        revoked = self.revoked(n)
        return (
            n + 1, self.authority_id, serial(n), "sha1", "revoked" if revoked else "good", der(n),
            self.now, self.now + timedelta(days=3650), SIGNER,
        )  # fmt: skip

    def key_owner(self, n: int) -> tuple:
        """Every certified key is claimed by its device's identity, as issuance leaves it."""
        return (hashlib.sha256(b"key%d" % n).hexdigest(), f"device:{n // 2 + 1}", self.now)

    def device(self, d: int) -> tuple:
        return (d + 1, device_serial(d), "Wallbox 22", "production", True, False, self.now)

    def secret(self, d: int) -> tuple:
        return (d + 1, d + 1, hashlib.sha256(secret(d).encode()).hexdigest(), self.now + timedelta(days=1), self.now)


AUTHORITY = (
    "INSERT INTO authorities (id, name, role, environment, organization, country, key_label, key_type, serial, "
    "subject, certificate_der, key_sha1, ocsp_url, repository_url, not_before, not_after, status, created_at, "
    "crl_number) VALUES (1, 'production-issuing-1', 'issuing', 'production', 'Bench Charging', 'DE', 'bench', "
    "'ec-p256', '1', 'CN=Bench', {blob}, '00', 'http://127.0.0.1/ocsp', 'http://127.0.0.1/pki', {t}, {t}, "
    "'active', {t}, 0)"
)


# -- bulk loading ------------------------------------------------------------------------------
def _text(moment: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DateTime storage format (naive UTC), which the store's columns read back."""
    return None if moment is None else moment.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


LOADED = ("devices", "enrollment_secrets", "certificates", "ocsp_responses", "key_owners")


def load_sqlite(path: Path, fleet: Fleet) -> None:
    """One transaction of executemany straight through sqlite3 (the loader, not the service: no durability),
    the migrations' secondary indexes dropped before and created again after, as a restore would."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("PRAGMA cache_size=-1000000")
    marks = ", ".join("?" * len(LOADED))
    indexes = connection.execute(
        f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN ({marks})",
        LOADED,
    ).fetchall()
    connection.execute("BEGIN")
    for name, _sql in indexes:
        connection.execute(f"DROP INDEX {name}")
    now = _text(fleet.now)
    connection.execute(AUTHORITY.format(blob="x'00'", t=f"'{now}'"))

    def rows(make: Callable[[int], tuple], count: int) -> Iterator[tuple]:
        for n in range(count):
            yield tuple(_text(v) if isinstance(v, datetime) else v for v in make(n))

    for table, columns, make, count in _tables(fleet):
        marks = ", ".join("?" * len(columns))
        connection.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows(make, count))
    for _name, sql in indexes:
        connection.execute(sql)
    connection.execute("COMMIT")
    connection.execute("ANALYZE")
    connection.close()


def load_postgresql(url: str, fleet: Fleet) -> None:
    """COPY, secondary indexes created afterwards, then ANALYZE (what a restore or a big import does)."""
    parsed = make_url(url)
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False).split("?")[0]
    schema = parsed.query["options"].split("=", 1)[1]
    with psycopg.connect(conninfo, options=f"-csearch_path={schema}") as connection:
        connection.execute("SET maintenance_work_mem = '256MB'")
        indexes = connection.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = ANY(%s) AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE connamespace = current_schema()::regnamespace)",
            (list(LOADED),),
        ).fetchall()
        for name, _definition in indexes:
            connection.execute(f"DROP INDEX {name}")
        naive = fleet.now.replace(tzinfo=None)
        connection.execute(AUTHORITY.format(blob="'\\x00'::bytea", t="%(t)s"), {"t": naive})
        for table, columns, make, count in _tables(fleet):
            with connection.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for n in range(count):
                    copy.write_row(tuple(v.replace(tzinfo=None) if isinstance(v, datetime) else v for v in make(n)))
            if "id" in columns:
                connection.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {count})")
        for _name, definition in indexes:
            connection.execute(definition)
        connection.commit()
        connection.autocommit = True
        for table in ("authorities", *LOADED):
            connection.execute(f"ANALYZE {table}")


def _tables(fleet: Fleet) -> list[tuple[str, tuple[str, ...], Callable[[int], tuple], int]]:
    return [
        ("devices", DEVICE_COLUMNS, fleet.device, fleet.devices),
        ("enrollment_secrets", SECRET_COLUMNS, fleet.secret, fleet.devices),
        ("certificates", CERTIFICATE_COLUMNS, fleet.certificate, fleet.rows),
        ("ocsp_responses", RESPONSE_COLUMNS, fleet.response, fleet.rows),
        ("key_owners", KEY_OWNER_COLUMNS, fleet.key_owner, fleet.rows),
    ]


# -- timing --------------------------------------------------------------------------------------
@dataclass
class Timing:
    name: str
    what: str
    calls: int = 0
    micros: list[float] = field(default_factory=list)
    plan: str = ""  # the indexes the planner chose for the statements of one call

    def p(self, q: float) -> float:
        ordered = sorted(self.micros)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    @property
    def median(self) -> float:
        return statistics.median(self.micros)


def timed(name: str, what: str, keys: list, call: Callable[[object], object], warm: int = 200) -> Timing:
    for key in keys[:warm]:
        call(key)
    timing = Timing(name, what)
    for key in keys:
        started = time.perf_counter_ns()
        call(key)
        timing.micros.append((time.perf_counter_ns() - started) / 1000)
    timing.calls = len(keys)
    return timing


def lookups(store: Store, fleet: Fleet, count: int, seed: int = 5) -> list[Timing]:
    """Every hot lookup, through the function the service calls, over ``count`` random rows."""
    rng = random.Random(seed)
    rows = [rng.randrange(fleet.rows) for _ in range(count)]
    devices = [rng.randrange(fleet.devices) for _ in range(count)]
    few = rows[: max(20, count // 50)]
    reader = Store(store.url.render_as_string(hide_password=False), read_only=True)
    source = StoreSource(reader)
    results: list[Timing] = []
    with store.session() as session:

        def run(name: str, what: str, keys: list, call: Callable[[object], object], warm: int = 200) -> None:
            timing = timed(name, what, keys, call, warm)
            session.rollback()  # ends the transaction (on SQLite each one holds the write lock)
            session.expunge_all()
            statements = capture(store, lambda: call(keys[0]))
            if not statements:  # the responder reads through the DBAPI: its one statement, as it sends it
                statements = [(source._lookup, (fleet.authority_id, serial(keys[0]), "sha1"))]
            timing.plan = ", ".join(dict.fromkeys(i for s, p in statements for i in indexes_used(store, s, p)))
            session.rollback()
            results.append(timing)

        run(
            "OCSP responder: response by issuer + serial",
            "ocsp.source.StoreSource.response (DBAPI, per-thread connection)",
            rows,
            lambda n: _found(source.response(fleet.authority_id, int(serial(n), 16), "sha1")),
        )
        run(
            "OCSP signer: certificates by issuer + serial",
            "the on-demand signer's SELECT … WHERE authority_id = ? AND serial IN (…)",
            rows,
            lambda n: _found(
                session.scalars(
                    select(Certificate).where(
                        Certificate.authority_id == fleet.authority_id, Certificate.serial.in_([serial(n)])
                    )
                ).first()
            ),
        )
        run(
            "EST: certificate by fingerprint (client certificate)",
            "ca.enrollment.authenticators.presented_certificate (with its CA's environment and device)",
            rows,
            lambda n: _found(presented_certificate(session, der(n))),
        )
        run(
            "EST: device by serial",
            "ca.registry.devices.get_device",
            devices,
            lambda d: get_device(session, device_serial(d)),
        )
        run(
            "EST: one-time secret check",
            "ca.registry.secrets.secret_is_valid (devices ⋈ enrollment_secrets)",
            devices,
            lambda d: _found(secret_is_valid(session, device_serial(d), secret(d))),
        )
        run(
            "EST: who holds this public key",
            "key_owners by primary key (one key, one identity)",
            rows,
            lambda n: _found(session.get(KeyOwner, hashlib.sha256(b"key%d" % n).hexdigest())),
        )
        run(
            "EST: a device's current certificate",
            "ca.registry.devices.current_certificate",
            devices,
            lambda d: current_certificate(session, Device(id=d + 1)),
        )
        run(
            "CLI: certificate by serial",
            "ca.status.certificates.get_certificate (revoke, cert show)",
            rows,
            lambda n: get_certificate(session, serial(n)),
        )
        run(
            "CLI: 100 soonest-expiring within 30 days",
            "ca.status.certificates.list_certificates(expiring_within=30d, limit=100)",
            few,
            lambda _n: list_certificates(session, datetime.now(UTC), expiring_within=timedelta(days=30), limit=100),
            warm=5,
        )
        run(
            "CRL --watch: status counter poll",
            "crl.publisher.status_counter",
            rows,
            lambda _n: status_counter(session),
        )
        run(
            "CRL --watch: revocation summary (after the counter moved)",
            "crl.publisher.revocation_summary: count, holds, latest over the revoked rows",
            few[:20],
            lambda _n: revocation_summary(session),
            warm=2,
        )
        authority = SimpleNamespace(id=fleet.authority_id)
        revoked = fleet.rows // 100
        run(
            f"CRL: read the {revoked:,} revoked entries",
            "crl.publisher.revoked_rows, all of them",
            few[:5],
            lambda _n: _count(revoked_rows(session, authority, datetime.now(UTC)), revoked),  # type: ignore[arg-type]
            warm=1,
        )
        signer = SimpleNamespace(authority_id=fleet.authority_id, serial=SIGNER)
        run(
            f"OCSP refresher: a pass over {fleet.rows:,} certificates, none due",
            "ocsp.presign.due_certificates from the first id",
            few[:1],
            lambda _n: _count(due_certificates(session, OcspPolicy(), datetime.now(UTC), signer, 200), 0),  # type: ignore[arg-type]
            warm=0,
        )
    source_connection = getattr(source._local, "connection", None)
    if source_connection is not None:
        source_connection.close()
    reader.dispose()
    return results


def capture(store: Store, call: Callable[[], object]) -> list[tuple[str, object]]:
    """The SELECTs one call sends."""
    seen: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, executemany) -> None:  # type: ignore[no-untyped-def]
        if not executemany and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    return seen


def indexes_used(store: Store, statement: str, parameters: object) -> list[str]:
    """What the planner reads the tables through: index names, or **full scan** of a table."""
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        found = []
        if store.is_sqlite:
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            for detail in (row[3] for row in cursor.fetchall()):
                if match := re.search(r"USING (?:COVERING )?INDEX (\w+)", detail):
                    found.append(_index_columns(cursor, match.group(1), sqlite=True))
                elif "USING INTEGER PRIMARY KEY" in detail:
                    found.append(f"{detail.split()[1]}(id)")
                elif detail.startswith("SCAN "):
                    found.append(f"**full scan of {detail.split()[1]}**")
            return found
        cursor.execute(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
        nodes = [cursor.fetchone()[0][0]["Plan"]]
        while nodes:
            node = nodes.pop(0)
            nodes.extend(node.get("Plans", []))
            if "Index Name" in node:
                found.append(_index_columns(cursor, node["Index Name"], sqlite=False))
            elif node["Node Type"] == "Seq Scan":
                found.append(f"**full scan of {node['Relation Name']}**")
        return found
    finally:
        raw.rollback()
        raw.close()


def _index_columns(cursor: object, name: str, *, sqlite: bool) -> str:
    """An index as table(columns): the same on both databases, whatever the index is called."""
    if sqlite:
        cursor.execute("SELECT tbl_name, sql FROM sqlite_master WHERE name = ?", (name,))  # type: ignore[attr-defined]
        table, definition = cursor.fetchone()  # type: ignore[attr-defined]
        cursor.execute(f"PRAGMA index_info({name})")  # type: ignore[attr-defined]
        columns = ", ".join(row[2] for row in cursor.fetchall())  # type: ignore[attr-defined]
        return f"{table}({columns}){_partial(definition or '')}"
    cursor.execute(  # type: ignore[attr-defined]
        "SELECT tablename, indexdef FROM pg_indexes WHERE indexname = %s AND schemaname = current_schema()", (name,)
    )
    table, definition = cursor.fetchone()  # type: ignore[attr-defined]
    columns = re.search(r"USING \w+ \(([^)]*)\)", definition)
    return f"{table}({columns.group(1) if columns else definition}){_partial(definition)}"


def _partial(definition: str) -> str:
    """A partial index's condition, the same on both databases: `` where status = 'revoked'``."""
    where = re.search(r"\bWHERE\b(.*)$", definition, re.IGNORECASE | re.DOTALL)
    if where is None:
        return ""
    condition = re.sub(r"::\w+|[()]", "", where.group(1))  # PostgreSQL's casts and parentheses
    return " where " + " ".join(condition.replace("=", " = ").split())


def _found(value: object) -> object:
    if not value:
        raise AssertionError("a lookup of an existing row found nothing")
    return value


def _count(rows: object, expected: int) -> int:
    count = sum(1 for _ in rows)  # type: ignore[attr-defined]
    if count != expected:
        raise AssertionError(f"read {count} rows, expected {expected}")
    return count


# -- databases -----------------------------------------------------------------------------------
@contextmanager
def sqlite_database(work: Path) -> Iterator[tuple[str, Callable[[], str]]]:
    path = work / "lookups.db"
    yield f"sqlite:///{path}", lambda: f"{path.stat().st_size / 2**20:,.0f} MB file"


@contextmanager
def postgresql_database() -> Iterator[tuple[str, Callable[[], str]]]:
    admin_url = os.environ.get("CHARGEPKI_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"bench_lookups_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        url = make_url(admin_url).set(drivername="postgresql+psycopg")
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})

        def size() -> str:
            total = admin.execute(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                (schema,),
            ).fetchone()[0]
            return f"{int(total) / 2**20:,.0f} MB tables + indexes"

        try:
            yield url.render_as_string(hide_password=False), size
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class Run:
    database: str
    load_seconds: float
    size: str
    timings: list[Timing]


def bench(name: str, url: str, size: Callable[[], str], fleet: Fleet, count: int) -> Run:
    store = Store(url)
    store.upgrade()
    store.dispose()
    print(f"{name}: loading {fleet.rows:,} certificates …", file=sys.stderr, flush=True)
    started = time.perf_counter()
    if store.is_sqlite:
        load_sqlite(Path(store.url.database or ""), fleet)
    else:
        load_postgresql(url, fleet)
    loaded = time.perf_counter() - started
    print(f"{name}: loaded in {loaded:.0f} s; {count:,} lookups each …", file=sys.stderr, flush=True)
    store = Store(url)
    try:
        timings = lookups(store, fleet, count)
    finally:
        store.dispose()
    return Run(name, loaded, size(), timings)


def report(runs: list[Run], fleet: Fleet, count: int) -> str:
    cpu = "unknown CPU"
    with suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    lines = [
        f"Hot-path lookups with {fleet.rows:,} certificates ({fleet.devices:,} devices with a secret each, "
        f"{fleet.rows:,} pre-signed responses, 1% revoked), {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs "
        f"({cpu}), Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, shared machine.",
        "",
        "Per call, through the function the service calls, one caller, random rows "
        f"({count:,} calls unless the row says otherwise), after a warm-up. Microseconds unless marked.",
        "",
        "| lookup | code | " + " | ".join(f"{r.database} p50 | {r.database} p99" for r in runs) + " | index |",
        "|---|---|" + "---|---|" * len(runs) + "---|",
    ]
    for index, timing in enumerate(runs[0].timings):
        cells = []
        for run in runs:
            t = run.timings[index]
            cells += [_micros(t.median), _micros(t.p(0.99))]
        calls = "" if timing.calls == count else f" ({timing.calls} call{'s' if timing.calls > 1 else ''})"
        plans = dict.fromkeys(run.timings[index].plan for run in runs)
        plan = timing.plan
        if len(plans) > 1:
            plan = " / ".join(f"{run.database}: {run.timings[index].plan}" for run in runs)
        lines.append(f"| {timing.name}{calls} | `{timing.what}` | " + " | ".join(cells) + f" | {plan} |")
    lines += ["", "| database | bulk load (secondary indexes built after, ANALYZE) | size |", "|---|---|---|"]
    lines += [f"| {run.database} | {run.load_seconds:.0f} s | {run.size} |" for run in runs]
    return "\n".join(lines) + "\n"


def _micros(value: float) -> str:
    if value >= 100_000:
        return f"{value / 1e6:.2f} s"
    if value >= 1000:
        return f"{value / 1000:.1f} ms"
    return f"{value:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=10_000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-lookups.md")
    args = parser.parse_args()
    fleet = Fleet(args.rows, datetime.now(UTC).replace(microsecond=0))
    work = Path(tempfile.mkdtemp(prefix="chargepki-lookups-"))
    runs = []
    try:
        for name in args.databases.split(","):
            if name == "sqlite":
                with sqlite_database(work) as (url, size):
                    runs.append(bench("SQLite", url, size, fleet, args.lookups))
            elif name == "postgresql":
                try:
                    with postgresql_database() as (url, size):
                        runs.append(bench("PostgreSQL", url, size, fleet, args.lookups))
                except psycopg.OperationalError as exc:
                    print(f"PostgreSQL skipped: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            else:
                parser.error(f"unknown database {name!r} (sqlite, postgresql)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not runs:
        return 1
    text = report(runs, fleet, args.lookups)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
