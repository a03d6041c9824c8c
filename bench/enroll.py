"""Enrollment throughput: chargepki EST next to `cfssl serve` on this machine.

Both sides get the same pre-generated ECDSA P-256 CSRs and the same load generator
(C client threads, one keep-alive `requests.Session` each), so the ratio is fair even though
the absolute numbers include the Python client's own cost. Scenarios:

- cfssl /api/v1/cfssl/sign, no database (software CA key in memory)
- cfssl /api/v1/cfssl/sign with its SQLite certdb recording every certificate
- chargepki EST simpleenroll over HTTPS: registered device, one-time secret consumed,
  certificate and audit entry recorded, CA key in SoftHSM2 (SQLite, and PostgreSQL when reachable)

    python bench/enroll.py [--clients 16] [--count 2000] [--workers 2] [--out bench/results.md]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.harness import free_port, machine_busy_seconds, postgres_schema, tree_cpu_by_kind, wait_for  # noqa: E402
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy  # noqa: E402
from ca.config import Config, EstSettings, FrontDoorSettings, embedded_defaults, write_config  # noqa: E402
from ca.context import Pki  # noqa: E402
from ca.registry.devices import add_device  # noqa: E402
from ca.registry.secrets import issue_secret  # noqa: E402
from ca.work import Work  # noqa: E402
from ocsp.presign import Presigner, policy_from  # noqa: E402

ORG = "Bench Charging"
# cfssl 1.2's certdb schema (certdb/sqlite/migrations, 2016): cfssl does not create it itself.
CFSSL_SCHEMA = """
CREATE TABLE certificates (serial_number blob NOT NULL, authority_key_identifier blob NOT NULL, ca_label blob,
  status blob NOT NULL, reason int, expiry timestamp, revoked_at timestamp, pem blob NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier));
CREATE TABLE ocsp_responses (serial_number blob NOT NULL, authority_key_identifier blob NOT NULL, body blob NOT NULL,
  expiry timestamp, PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier)
    REFERENCES certificates(serial_number, authority_key_identifier));
"""


@dataclass
class Result:
    name: str
    ok: int
    total: int
    seconds: float
    latencies: list[float]
    server_cpu: float = 0.0  # seconds of server CPU during the run
    cpu_split: dict[str, float] = field(default_factory=dict)  # the same by kind of process

    @property
    def cpu_ms_per_certificate(self) -> float:
        return self.server_cpu / max(self.ok, 1) * 1000

    @property
    def rate(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def csrs(names: list[str]) -> list[x509.CertificateSigningRequest]:
    result = []
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, name)]
        )
        result.append(x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256()))
    return result


def load(name: str, count: int, clients: int, request: Callable[[requests.Session, int], bool], server: int) -> Result:
    local = threading.local()

    def one(index: int) -> tuple[bool, float]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.trust_env = False  # REQUESTS_CA_BUNDLE / proxies from the environment stay out of it
        started = time.perf_counter()
        ok = request(session, index)
        return ok, time.perf_counter() - started

    split_before, machine_before = tree_cpu_by_kind(server), machine_busy_seconds()
    database_before = harness.program_cpu_seconds("postgres")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        outcomes = list(pool.map(one, range(count)))
    elapsed = time.perf_counter() - started
    split = {kind: cpu - split_before.get(kind, 0.0) for kind, cpu in tree_cpu_by_kind(server).items()}
    server_cpu = sum(split.values())
    database = harness.program_cpu_seconds("postgres") - database_before
    split["postgres (the database)"] = database
    split["rest of the machine (clients)"] = machine_busy_seconds() - machine_before - server_cpu - database
    ok = sum(1 for ok, _ in outcomes if ok)
    return Result(name, ok, count, elapsed, [latency for _, latency in outcomes], server_cpu, split)


# -- cfssl -----------------------------------------------------------------------------------------
def cfssl(work: Path, count: int, clients: int, with_db: bool, tls: bool = False) -> Result:
    directory = work / f"cfssl-{'db' if with_db else 'nodb'}-{'tls' if tls else 'http'}"
    directory.mkdir()
    csr_json = {"CN": "Bench cfssl CA", "key": {"algo": "ecdsa", "size": 256}, "names": [{"O": ORG}]}
    (directory / "ca-csr.json").write_text(json.dumps(csr_json))
    generated = subprocess.run(
        ["cfssl", "genkey", "-initca", "ca-csr.json"], cwd=directory, capture_output=True, check=True
    ).stdout
    subprocess.run(["cfssljson", "-bare", "ca"], cwd=directory, input=generated, capture_output=True, check=True)
    config = {"signing": {"default": {"expiry": "8760h", "usages": ["digital signature", "client auth"]}}}
    (directory / "config.json").write_text(json.dumps(config))
    port = free_port()
    command = [
        "cfssl",
        "serve",
        "-address",
        "127.0.0.1",
        "-port",
        str(port),
        "-ca",
        "ca.pem",
        "-ca-key",
        "ca-key.pem",
        "-config",
        "config.json",
        "-loglevel",
        "5",
    ]
    if with_db:
        with sqlite3.connect(directory / "certs.db") as db:
            db.executescript(CFSSL_SCHEMA)
        (directory / "db.json").write_text(json.dumps({"driver": "sqlite3", "data_source": "certs.db"}))
        command += ["-db-config", "db.json"]
    scheme, verify = "http", True
    if tls:  # HTTPS like EST, with a server certificate from the same CA
        server_csr = {"CN": "localhost", "hosts": ["localhost"], "key": {"algo": "ecdsa", "size": 256}}
        (directory / "server-csr.json").write_text(json.dumps(server_csr))
        issued = subprocess.run(
            ["cfssl", "gencert", "-ca", "ca.pem", "-ca-key", "ca-key.pem", "server-csr.json"],
            cwd=directory,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["cfssljson", "-bare", "server"], cwd=directory, input=issued, capture_output=True, check=True)
        command += ["-tls-cert", "server.pem", "-tls-key", "server-key.pem"]
        scheme, verify = "https", str(directory / "ca.pem")
    log = directory / "serve.log"
    process = subprocess.Popen(command, cwd=directory, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(port, process, log)
        bodies = [
            json.dumps({"certificate_request": c.public_bytes(serialization.Encoding.PEM).decode()})
            for c in csrs([f"CP-{n:06d}" for n in range(count)])
        ]
        url = f"{scheme}://localhost:{port}/api/v1/cfssl/sign"

        def sign(session: requests.Session, index: int) -> bool:
            response = session.post(url, data=bodies[index], timeout=60, verify=verify)
            return response.status_code == 200 and response.json().get("success") is True

        name = f"cfssl serve /sign, {'SQLite certdb' if with_db else 'no database'}{', HTTPS' if tls else ''}"
        result = load(name, count, clients, sign, process.pid)
        if with_db:
            with sqlite3.connect(directory / "certs.db") as db:
                recorded = db.execute("SELECT count(*) FROM certificates").fetchone()[0]
            assert recorded == result.ok, f"cfssl recorded {recorded} of {result.ok}"
        return result
    finally:
        process.terminate()
        process.wait(timeout=15)


# -- chargepki -------------------------------------------------------------------------------------
def ready(url: str, verify: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Until ``url`` answers 200 over HTTPS (the server's log tail if it exits or never does)."""
    deadline = time.monotonic() + timeout
    with requests.Session() as session:
        session.trust_env = False
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                if session.get(url, verify=verify, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer {url}: {log.read_text(errors='replace')[-2000:]}")


def chargepki(work: Path, count: int, clients: int, workers: int, database_url: str | None, label: str) -> Result:
    home = work / f"chargepki-{label}"
    defaults = embedded_defaults(home)
    config = Config(
        home=home,
        database_url=database_url or defaults.database_url,
        pkcs11=defaults.pkcs11,
        est=EstSettings(default_environment="production"),
        # The 16 clients stand for a factory's stations behind one address: the front door's
        # per-address rate limit (200/s by default) would answer 429 to what the server can do.
        front_door=FrontDoorSettings(requests_per_second=100_000),
    )
    write_config(config)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
    pki = Pki.open(home, environ, create=True)
    serials = [f"CP-{n:06d}" for n in range(count)]
    with pki.store.session() as session:
        status = Presigner(pki.token(), policy_from(pki.config.ocsp))
        hierarchy = init_hierarchy(
            Work(session=session, actor="bench", status=status, token=pki.token()),
            request=HierarchyRequest(organization=ORG),
        )
        root = home / "root.pem"
        root.write_bytes(
            x509.load_der_x509_certificate(hierarchy.root.certificate_der).public_bytes(serialization.Encoding.PEM)
        )
        credentials = []
        for serial in serials:
            device = add_device(Work(session, "bench"), serial=serial)
            credentials.append((serial, issue_secret(Work(session, "bench"), device=device)))
    pki.close()
    bodies = [base64.encodebytes(c.public_bytes(serialization.Encoding.DER)) for c in csrs(serials)]
    port = free_port()
    log = home / "est.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli.main import main; main()",
            "--home",
            str(home),
            "serve",
            "est",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        cwd=ROOT,
        env=environ,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(port, process, log)
        # An accepted connection proved too little twice (the first clients were then refused, the
        # later ones served): wait for a real HTTPS answer through the front door before measuring.
        ready(f"https://localhost:{port}/.well-known/est/cacerts", str(root), process, log)
        url = f"https://localhost:{port}/.well-known/est/simpleenroll"

        def enroll(session: requests.Session, index: int) -> bool:
            response = session.post(
                url,
                data=bodies[index],
                auth=credentials[index],
                verify=str(root),
                timeout=60,
                headers={"Content-Type": "application/pkcs10"},
            )
            if response.status_code != 200:
                refusals[response.status_code] = refusals.get(response.status_code, 0) + 1
            return response.status_code == 200

        refusals: dict[int, int] = {}

        result = load(f"chargepki EST simpleenroll, {label}, {workers} workers", count, clients, enroll, process.pid)
        if refusals:
            print(f"{label}: answers other than 200: {refusals}", file=sys.stderr)
    except Exception:
        print(f"--- the server's log ({log}), last lines:", file=sys.stderr)
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
        raise
    finally:
        process.terminate()
        process.wait(timeout=15)
    pki = Pki.open(home, environ)
    with pki.store.session() as session:
        from sqlalchemy import func, select

        from ca import audit
        from ca.store.models import Certificate

        recorded = session.scalar(
            select(func.count())
            .select_from(Certificate)
            .where(Certificate.profile == "charger", Certificate.status == "valid")
        )
        assert recorded == result.ok, f"chargepki recorded {recorded} of {result.ok}"
        assert audit.verify(session).ok
    pki.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    parser.add_argument(
        "--chargepki-only", action="store_true", help="skip cfssl (ratios against the last cfssl figures are not made)"
    )
    parser.add_argument("--no-postgresql", action="store_true")
    args = parser.parse_args()
    if shutil.which("cfssl") is None:
        print("cfssl is missing: `make bench` installs Debian's golang-cfssl", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="chargepki-bench-"))
    results = []
    if not args.chargepki_only:
        results += [
            cfssl(work, args.count, args.clients, False),
            cfssl(work, args.count, args.clients, True),
            cfssl(work, args.count, args.clients, True, tls=True),
        ]
    results.append(chargepki(work, args.count, args.clients, args.workers, None, "SQLite"))
    pg = None if args.no_postgresql else postgres_schema("bench")
    if pg is not None:
        try:
            results.append(chargepki(work, args.count, args.clients, args.workers, pg[0], "PostgreSQL"))
        finally:
            pg[1]()
    baseline_nodb, baseline_db = (results[0].rate, results[1].rate) if not args.chargepki_only else (0.0, 0.0)

    def ratio(rate: float, baseline: float) -> str:
        return f"{rate / baseline:.2f}×" if baseline else "–"

    lines = [
        f"Enrollment, {args.count} distinct CSRs (ECDSA P-256), {args.clients} keep-alive clients, "
        f"{os.cpu_count()} CPUs, same machine and run ({time.strftime('%Y-%m-%d')}).",
        "",
        "| scenario | ok | enrollments/s | p50 ms | p99 ms | server CPU ms/cert | vs cfssl no-db | vs cfssl SQLite |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.ok}/{r.total} | {r.rate:.0f} | {r.percentile(0.5):.0f} | "
            f"{r.percentile(0.99):.0f} | {r.cpu_ms_per_certificate:.1f} | {ratio(r.rate, baseline_nodb)} | "
            f"{ratio(r.rate, baseline_db)} |"
        )
    table = "\n".join(lines)
    split = [
        f"- {r.name}: "
        + ", ".join(f"{kind} {cpu / max(r.ok, 1) * 1000:.1f}" for kind, cpu in sorted(r.cpu_split.items()))
        for r in results
    ]
    table += "\n\nCPU ms per certificate by process (the server's, then the rest of the machine's):\n\n" + "\n".join(
        split
    )
    print(table)
    if args.chargepki_only:
        return 0
    args.out.write_text(table + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
