"""What a metrics scrape costs the store, at 1,000,000 certificate rows, SQLite and PostgreSQL.

The store-derived metrics (docs/metrics.md) are computed from indexed queries at scrape time, at
most every ``[metrics] cache_seconds``; this measures one computation of each query and of each
service's whole set (``metrics.store.StoreCollector`` without its cache, rendered as Prometheus
text), through the code the listeners run, on a bulk-loaded store (bench/lookups.py's loader):

- N certificates of one issuing CA (98% charger, 1% v2g-secc, 1% csms-server; 1% revoked; not_after
  spread over three years from a year ago, so a third have expired and 1/12 expire within 90 days),
  a pre-signed response each (current ones 12-24 h from nextUpdate, those of expired certificates
  left as the refresher left them), N/2 devices;
- ``--lockouts`` rows in ``auth_failures``, a tenth of them locked out;
- a re-enrollment campaign of ``--campaign-devices`` devices onto a second issuing CA, half moved.

    .venv/bin/python bench/metrics_cost.py [--rows 1000000] [--calls 20] [--databases sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # the repository, not bench/ (bench/ocsp.py would shadow the package)

import psycopg  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from bench.lookups import (  # noqa: E402
    BLOB,
    Fleet,
    capture,
    der,
    device_serial,
    indexes_used,
    load_postgresql,
    load_sqlite,
    postgresql_database,
    serial,
    sqlite_database,
)
from ca import reports  # noqa: E402
from ca.store.engine import Store  # noqa: E402
from ca.store.models import AuthFailure, Authority, Campaign, CampaignDevice, Certificate  # noqa: E402
from metrics.store import (  # noqa: E402
    StoreCollector,
    active_lockouts,
    environments,
    expiring_certificates,
    ocsp_least_remaining,
    open_campaigns,
)

PROFILES = ("charger",) * 98 + ("v2g-secc", "csms-server")


@dataclass
class MetricsFleet(Fleet):
    """bench/lookups.py's fleet with the spread of expiries and response ages the metrics look at."""

    def not_after(self, n: int) -> datetime:
        return self.now + timedelta(days=(n % 1095) - 365, seconds=n % 86400)

    def certificate(self, n: int) -> tuple:
        revoked = self.revoked(n)
        d = n // 2
        not_after = self.not_after(n)
        return (
            n + 1, serial(n), self.authority_id, PROFILES[n % 100], "revoked" if revoked else "valid",
            f"C=DE,O=Bench Charging,CN={device_serial(d)}", device_serial(d), not_after - timedelta(days=1095),
            not_after, der(n), hashlib.sha256(der(n)).hexdigest(), hashlib.sha256(b"key%d" % n).hexdigest(), d + 1,
            self.now - timedelta(days=1) if revoked else None, "keyCompromise" if revoked else None, self.now,
        )  # fmt: skip

    def response(self, n: int) -> tuple:
        not_after = self.not_after(n)
        # Re-signed at half life while the certificate is valid; then left with its last nextUpdate.
        last = min(self.now, not_after) - timedelta(seconds=n % 43200)
        return (
            n + 1, self.authority_id, serial(n), "sha1", "revoked" if self.revoked(n) else "good", der(n),
            last, last + timedelta(hours=24), "5EED",
        )  # fmt: skip


def load_extras(url: str, fleet: MetricsFleet, lockouts: int, campaign_devices: int) -> None:
    """Lockout rows, a second issuing CA and a campaign onto it (half its devices renewed there)."""
    store = Store(url)
    now = fleet.now
    try:
        with store.engine.begin() as connection:
            connection.execute(
                insert(AuthFailure),
                [
                    {
                        "kind": ("device", "address", "cert")[i % 3],
                        "key": f"key-{i}",
                        "failures": 5,
                        "window_start": now - timedelta(seconds=i % 600),
                        "locked_until": now + timedelta(minutes=10) if i % 10 == 0 else None,
                    }
                    for i in range(lockouts)
                ],
            )
            second = {
                "id": 2, "name": "production-issuing-2", "role": "issuing", "environment": "production",
                "organization": "Bench Charging", "country": "DE", "key_label": "bench2", "key_type": "ec-p256",
                "serial": "2", "subject": "CN=Bench 2", "certificate_der": b"\x00", "key_sha1": "01",
                "ocsp_url": "http://127.0.0.1/ocsp", "repository_url": "http://127.0.0.1/pki", "not_before": now,
                "not_after": now + timedelta(days=3650), "status": "active", "created_at": now, "crl_number": 0,
            }  # fmt: skip
            connection.execute(insert(Authority), [second])
            connection.execute(
                insert(Campaign),
                [{"id": 1, "environment": "production", "from_authority_id": 1, "to_authority_id": 2,
                  "actor": "bench", "started_at": now}],
            )  # fmt: skip
            # Devices d hold certificates 2d and 2d+1 (rows 2d+1, 2d+2); the campaign takes devices with an
            # unexpired current one, and half of them got a newer certificate from the second CA.
            members = [d for d in range(fleet.devices) if fleet.not_after(2 * d + 1) > now][:campaign_devices]
            connection.execute(
                insert(CampaignDevice),
                [
                    {"campaign_id": 1, "device_id": d + 1, "certificate_id": 2 * d + 2, "joined_at": now}
                    for d in members
                ],
            )
            renewed = members[::2]
            connection.execute(
                insert(Certificate),
                [
                    {
                        "id": fleet.rows + i + 1,
                        "serial": f"AB{i:036X}",
                        "authority_id": 2,
                        "profile": "charger",
                        "status": "valid",
                        "subject": "CN=x",
                        "common_name": device_serial(d),
                        "not_before": now,
                        "not_after": now + timedelta(days=730),
                        "der": bytes(BLOB),
                        "fingerprint_sha256": hashlib.sha256(b"renewed%d" % i).hexdigest(),
                        "public_key_sha256": hashlib.sha256(b"renewed-key%d" % i).hexdigest(),
                        "device_id": d + 1,
                        "created_at": now,
                    }
                    for i, d in enumerate(renewed)
                ],
            )
        with store.engine.connect() as connection:
            if store.is_sqlite:
                connection.exec_driver_sql("ANALYZE")
            else:
                connection = connection.execution_options(isolation_level="AUTOCOMMIT")
                for table in ("auth_failures", "authorities", "campaigns", "campaign_devices", "certificates"):
                    connection.exec_driver_sql(f"ANALYZE {table}")
    finally:
        store.dispose()


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)
    plan: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def worst(self) -> float:
        return max(self.seconds)


def timed(name: str, calls: int, call: Callable[[], object], store: Store | None = None) -> Timing:
    call()  # warm-up: the first run reads the pages into the caches
    timing = Timing(name)
    for _ in range(calls):
        started = time.perf_counter()
        call()
        timing.seconds.append(time.perf_counter() - started)
    if store is not None:
        statements = capture(store, call)
        timing.plan = ", ".join(dict.fromkeys(i for s, p in statements for i in indexes_used(store, s, p)))
    return timing


def measure(url: str, fleet: MetricsFleet, calls: int) -> list[Timing]:
    store = Store(url, read_only=True)
    now = lambda: datetime.now(UTC)  # noqa: E731
    results = []
    try:

        def query(name: str, run: Callable[[object], object]) -> None:
            def call() -> object:
                with store.session() as session:
                    return run(session)

            results.append(timed(name, calls, call, store))

        with store.session() as session:
            cas = environments(session)
        query("CAs and their environments (`metrics.store.environments`)", lambda s: environments(s))
        query(
            "certificates expiring within 7/30/90 days per environment and profile (`expiring_certificates`)",
            lambda s: expiring_certificates(s, now(), cas),
        )
        query("active lockouts per kind (`active_lockouts`)", lambda s: active_lockouts(s, now()))
        query(
            "least remaining validity of the current OCSP responses (`ocsp_least_remaining`)",
            lambda s: ocsp_least_remaining(s, now()),
        )
        query("open campaigns' devices by state (`open_campaigns`)", lambda s: open_campaigns(s, now()))
        query(
            "the fleet console's overview page: certificates by status and devices by model of the environment, "
            "the 20 soonest of the 30-day renewals and their count, revocations per day (`ca.reports`)",
            lambda s: (
                reports.certificates_by_status(s, now(), "production"),
                reports.device_counts(s, "production"),
                reports.expiring(s, now(), within=timedelta(days=30), environment="production", limit=20),
                reports.revocations_per_day(s, now(), days=30, environment="production"),
            ),
        )
        for service in ("est", "ocsp"):
            registry = CollectorRegistry(auto_describe=False)
            collector = StoreCollector(service, store, cache_seconds=0)
            collector._campaigns_at = time.monotonic()  # counted apart, in the background (the row above)
            registry.register(collector)
            what = "without the campaigns (a background thread's), " if service == "est" else ""
            results.append(
                timed(
                    f"a whole `{service}` scrape, {what}no cache (`generate_latest`)",
                    calls,
                    lambda r=registry: generate_latest(r),
                )
            )
        with store.session() as session:
            expiring = expiring_certificates(session, now(), cas)
            remaining = ocsp_least_remaining(session, now())
        print(f"  expiring: {expiring}; OCSP least remaining: {remaining:.0f} s", file=sys.stderr)
    finally:
        store.dispose()
    return results


@dataclass
class Run:
    database: str
    load_seconds: float
    timings: list[Timing]


def bench(name: str, url: str, fleet: MetricsFleet, args: argparse.Namespace) -> Run:
    store = Store(url)
    store.upgrade()
    store.dispose()
    print(f"{name}: loading {fleet.rows:,} certificates …", file=sys.stderr, flush=True)
    started = time.perf_counter()
    if url.startswith("sqlite"):
        load_sqlite(Path(url.removeprefix("sqlite:///")), fleet)
    else:
        load_postgresql(url, fleet)
    load_extras(url, fleet, args.lockouts, args.campaign_devices)
    loaded = time.perf_counter() - started
    print(f"{name}: loaded in {loaded:.0f} s; measuring …", file=sys.stderr, flush=True)
    return Run(name, loaded, measure(url, fleet, args.calls))


def report(runs: list[Run], fleet: MetricsFleet, args: argparse.Namespace, command: str) -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    lines = [
        f"Metrics scrape cost with {fleet.rows:,} certificates and as many stored OCSP responses, "
        f"{args.lockouts:,} auth_failures rows, a campaign of {args.campaign_devices:,} devices; "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, shared machine. `{command}`",
        "",
        f"One computation each, {args.calls} calls after a warm-up, read-only store (what the listeners use).",
        "",
        "| what | " + " | ".join(f"{r.database} median | {r.database} max" for r in runs) + " | index |",
        "|---|" + "---|---|" * len(runs) + "---|",
    ]
    for index, timing in enumerate(runs[0].timings):
        cells = []
        for run in runs:
            t = run.timings[index]
            cells += [_ms(t.median), _ms(t.worst)]
        plans = dict.fromkeys(run.timings[index].plan for run in runs)
        plan = timing.plan
        if len(plans) > 1:
            plan = " / ".join(f"{run.database}: {run.timings[index].plan}" for run in runs)
        lines.append(f"| {timing.name} | " + " | ".join(cells) + f" | {plan or '-'} |")
    lines += ["", "| database | bulk load |", "|---|---|"]
    lines += [f"| {run.database} | {run.load_seconds:.0f} s |" for run in runs]
    return "\n".join(lines) + "\n"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--lockouts", type=int, default=5_000)
    parser.add_argument("--campaign-devices", type=int, default=100_000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-metrics.md")
    args = parser.parse_args()
    fleet = MetricsFleet(args.rows, datetime.now(UTC).replace(microsecond=0))
    work = Path(tempfile.mkdtemp(prefix="chargepki-metrics-"))
    runs = []
    try:
        for name in args.databases.split(","):
            if name == "sqlite":
                with sqlite_database(work) as (url, _size):
                    runs.append(bench("SQLite", url, fleet, args))
            elif name == "postgresql":
                try:
                    with postgresql_database() as (url, _size):
                        runs.append(bench("PostgreSQL", url, fleet, args))
                except psycopg.OperationalError as exc:
                    print(f"PostgreSQL skipped: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            else:
                parser.error(f"unknown database {name!r} (sqlite, postgresql)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not runs:
        return 1
    command = " ".join([".venv/bin/python", "bench/metrics_cost.py", *sys.argv[1:]])
    text = report(runs, fleet, args, command)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
