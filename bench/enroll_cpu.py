"""CPU per enrollment of the core, without HTTP: what `pipeline.enroll` itself costs.

``--processes`` processes of ``--threads`` threads each (an EST server's workers and their threads)
enroll ``--count`` registered devices by one-time secret through ``ca.enrollment.pipeline.enroll``,
the function the web layer calls, with a real SoftHSM2 token; each child reports its own CPU
seconds (user + system, ``RUSAGE_SELF``: every thread, SoftHSM2 and SQLite included) while
enrolling, per certificate, the statements per certificate
and the wall time. CPU per certificate, unlike the rate, stays meaningful on a loaded machine;
the contention of several processes over one SQLite database is where the writer gate shows.
``--breakdown`` adds where the enrolling threads' CPU went (statements one by one, commits, token
signatures, OCSP and certificate building), measured with ``time.thread_time``.
``--reenroll`` measures renewals instead (``pipeline.reenroll``, EST simplereenroll): every device
is enrolled during set-up, then each re-enrolls with a new key, presenting its certificate, which
the new one supersedes (revoked, its OCSP response re-signed) in the issuing transaction.

    .venv/bin/python bench/enroll_cpu.py [--count 400] [--processes 2] [--threads 4] [--postgresql]
                                         [--profile PREFIX] [--breakdown] [--reenroll]
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import os
import resource
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

import psycopg  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from sqlalchemy import event, func, select  # noqa: E402

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy  # noqa: E402
from ca.config import Config, embedded_defaults, write_config  # noqa: E402
from ca.context import Pki  # noqa: E402
from ca.registry.devices import add_device  # noqa: E402
from ca.registry.secrets import issue_secret  # noqa: E402
from ca.work import Work  # noqa: E402

ORG = "Bench Charging"


# Where --breakdown measures the enrolling threads' CPU (time.thread_time: unaffected by other
# processes on the machine): the outermost instrumented call on a thread gets the time, so nested
# ones (a statement inside a presign) are not counted twice.
# (Patched where the pipeline looks them up: the prepared statements' runner, the pipeline's read_csr.)
BREAKDOWN = [
    ("SQL statements (SQLAlchemy + driver)", "ca.store.engine", "_Session", "_execute_internal"),
    ("SQL statements (SQLAlchemy + driver)", "ca.store.prepared", "Prepared", "run_on"),
    ("commits", "sqlalchemy.orm.session", "Session", "commit"),
    ("token signatures", "ca.keys.pkcs11_token", "Token", "sign"),
    ("CSR parsing", "ca.enrollment.pipeline", None, "read_csr"),
    ("OCSP response build + verify", "ocsp.signing", "ResponseSigner", "sign"),
    ("certificate build", "ca.issuance.flow", None, "build_certificate"),
]


def _instrument(enabled: bool) -> dict[str, float]:
    import importlib

    spent: dict[str, float] = {}
    if not enabled:
        return spent
    local = threading.local()
    for label, module_name, owner_name, name in BREAKDOWN:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, name)
        spent.setdefault(label, 0.0)

        def timed(*args, __original=original, __label=label, **kwargs):  # type: ignore[no-untyped-def]
            if getattr(local, "inside", False):
                return __original(*args, **kwargs)
            local.inside = True
            started = time.thread_time()
            try:
                return __original(*args, **kwargs)
            finally:
                took = time.thread_time() - started
                spent[__label] += took
                local.inside = False
                if __label == BREAKDOWN[0][0] and (sql := getattr(local, "sql", None)):
                    key = "  statement " + " ".join(sql.split())[:90]
                    spent[key] = spent.get(key, 0.0) + took
                    local.sql = None

        setattr(owner, name, timed)
    from sqlalchemy.engine import Engine

    event.listen(Engine, "before_cursor_execute", lambda _c, _k, sql, *_a: setattr(local, "sql", sql))
    return spent


def child(
    home: str,
    jobs: list[tuple[str, str, bytes]],
    threads: int,
    out: multiprocessing.Queue,
    profile: str | None = None,
    grouped: bool = True,
    breakdown: bool = False,
    renewals: dict[str, bytes] | None = None,
) -> None:
    from ca.authorities.issuers import default_issuing_ca, issuer_for
    from ca.enrollment.pipeline import Credentials, enroll, reenroll
    from ca.store.group_commit import GroupCommit
    from ocsp.presign import Presigner, policy_from

    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
    pki = Pki.open(Path(home), environ)
    statements = [0]
    event.listen(pki.store.engine, "before_cursor_execute", lambda *a: statements.__setitem__(0, statements[0] + 1))
    status = Presigner(pki.token(), policy_from(pki.config.ocsp))
    with pki.store.session() as session:
        authority = default_issuing_ca(session, "production")
        session.expunge(authority)
    issuer = issuer_for(authority, pki.token())
    failures = []
    lock = threading.Lock()
    commits = GroupCommit(pki.store.session) if grouped else None

    def run(part: list[tuple[str, str, bytes]]) -> None:
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        try:
            enroll_all(part)
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{profile}.{os.getpid()}.{threading.get_ident()}")

    def enroll_all(part: list[tuple[str, str, bytes]]) -> None:
        for serial, secret, csr in part:
            try:
                with pki.store.session() as session:
                    work = Work(session, "system:est", status=status, issuers=lambda _a: issuer, commits=commits)
                    if renewals is None:
                        credentials = Credentials(username=serial, password=secret, address="192.0.2.1")
                        enroll(work, authority=authority, csr=csr, credentials=credentials)
                    else:
                        credentials = Credentials(client_certificate=renewals[serial], address="192.0.2.1")
                        reenroll(work, authority=authority, csr=csr, credentials=credentials)
            except Exception as exc:
                with lock:
                    failures.append(f"{serial}: {exc}")

    spent = _instrument(breakdown)
    statements[0] = 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(jobs[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    cpu = (after.ru_utime - before.ru_utime) + system
    batches = (commits.stats.units / commits.stats.transactions) if commits and commits.stats.transactions else 1.0
    out.put((statements[0], failures, cpu, time.perf_counter() - started, system, batches, spent))


def _enrolled(pki: Pki, jobs: list[tuple[str, str, bytes]], renewals: dict[str, bytes]) -> list[tuple[str, str, bytes]]:
    """Enroll every device (set-up, not measured); fill ``renewals`` with each one's certificate and
    return the jobs of its re-enrollment: a CSR for a new key."""
    from ca.authorities.issuers import default_issuing_ca
    from ca.enrollment.pipeline import Credentials, enroll
    from ocsp.presign import Presigner

    renewed = []
    with pki.store.session() as session:
        authority = default_issuing_ca(session, "production")
        work = Work(session, "system:est", status=Presigner(pki.token()), token=pki.token())
        for serial, secret, csr in jobs:
            credentials = Credentials(username=serial, password=secret, address="192.0.2.1")
            renewals[serial] = enroll(work, authority=authority, csr=csr, credentials=credentials).der
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, serial)]
            )
            new = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
            renewed.append((serial, "", new.public_bytes(serialization.Encoding.DER)))
    return renewed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--postgresql", action="store_true")
    parser.add_argument("--no-group-commit", action="store_true", help="each request its own transactions")
    parser.add_argument(
        "--profile", metavar="PREFIX", help="cProfile every enrolling thread into PREFIX.<pid>.<thread>"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="report the enrolling threads' CPU inside statements, commits, signing"
    )
    parser.add_argument(
        "--reenroll", action="store_true", help="measure re-enrollments (each device enrolled during set-up)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chargepki-enroll-cpu-"))
    home = work / "home"
    defaults = embedded_defaults(home)
    url, admin, schema = None, None, None
    if args.postgresql:
        admin = psycopg.connect(
            os.environ.get("CHARGEPKI_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"), autocommit=True
        )
        schema = f"cpu_{secrets.token_hex(4)}"
        admin.execute(f"CREATE SCHEMA {schema}")
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    try:
        write_config(Config(home=home, database_url=url or defaults.database_url, pkcs11=defaults.pkcs11))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
        pki = Pki.open(home, environ, create=True)
        from ocsp.presign import Presigner

        jobs = []
        renewals: dict[str, bytes] | None = {} if args.reenroll else None
        with pki.store.session() as session:
            init_hierarchy(
                Work(session=session, actor="bench", status=Presigner(pki.token()), token=pki.token()),
                request=HierarchyRequest(organization=ORG),
            )
            for n in range(args.count):
                serial = f"CP-{n:06d}"
                work = Work(session, "bench")
                secret = issue_secret(work, device=add_device(work, serial=serial))
                key = ec.generate_private_key(ec.SECP256R1())
                name = x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                        x509.NameAttribute(NameOID.COMMON_NAME, serial),
                    ]
                )
                csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
                jobs.append((serial, secret, csr.public_bytes(serialization.Encoding.DER)))
        if renewals is not None:
            jobs = _enrolled(pki, jobs, renewals)
        pki.close()
        context = multiprocessing.get_context("spawn")
        out = context.Queue()
        children = [
            context.Process(
                target=child,
                args=(
                    str(home),
                    jobs[i :: args.processes],
                    args.threads,
                    out,
                    args.profile,
                    not args.no_group_commit,
                    args.breakdown,
                    renewals,
                ),
            )
            for i in range(args.processes)
        ]
        for process in children:
            process.start()
        results = [out.get() for _ in children]
        for process in children:
            process.join()
        elapsed = max(r[3] for r in results)
        cpu = sum(r[2] for r in results)
        system = sum(r[4] for r in results)
        statements = sum(r[0] for r in results)
        failures = [f for r in results for f in r[1]]
        pki = Pki.open(home, environ)
        with pki.store.session() as session:
            from ca.store.models import Certificate

            issued = session.scalar(
                select(func.count())
                .select_from(Certificate)
                .where(Certificate.profile == "charger", Certificate.status == "valid")
            )
            superseded = session.scalar(
                select(func.count()).select_from(Certificate).where(Certificate.revocation_reason == "superseded")
            )
        if renewals is not None and superseded != args.count:
            failures.append(f"{superseded} of {args.count} renewed certificates revoked as superseded")
        pki.close()
        load = os.getloadavg()
        print(
            f"{'PostgreSQL' if args.postgresql else 'SQLite'}: "
            f"{'re-enrollments' if args.reenroll else 'enrollments'}: {issued}/{args.count} issued, "
            f"{len(failures)} failures; "
            f"{args.processes} processes x {args.threads} threads; CPU {cpu / args.count * 1000:.2f} ms/cert "
            f"(of which kernel {system / args.count * 1000:.2f}) "
            f"(enrolling only, start-up excluded); "
            f"{statements / args.count:.1f} statements/cert; "
            f"{'no group commit' if args.no_group_commit else 'group commit'} "
            f"({sum(r[5] for r in results) / len(results):.1f} writes per transaction); wall {elapsed:.1f} s; "
            f"load {load[0]:.1f}"
        )
        if args.breakdown:
            for label in results[0][6]:
                share = sum(r[6].get(label, 0.0) for r in results)
                print(f"  {label}: {share / args.count * 1000:.2f} ms/cert (thread CPU)")
        for failure in failures[:5]:
            print("  ", failure)
        return 0 if issued == args.count and not failures else 1
    finally:
        if admin is not None:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
