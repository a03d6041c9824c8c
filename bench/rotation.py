"""Fleet rotation: every charger of issuing CA 1 re-enrolls onto its successor after `ca rotate`.

Set-up (not timed): a fresh home (SQLite, or ``--postgresql`` for a schema of the test server) with
``--chargers`` registered devices, each holding a real certificate from issuing CA 1 (signed in the
SoftHSM2 token, keys in this process), in a store that holds ``--rows`` certificate rows in all: the
rest are realistic history rows (superseded and expired charger certificates of earlier devices,
each with its own serial, fingerprint and key hash, the DER of a real certificate), written by
direct bulk INSERTs. Then ``chargepki ca rotate`` and ``chargepki campaign start --from-ca CA1``,
and ``chargepki serve est`` (gunicorn behind the nginx front door, ``--workers``).

Timed: each charger re-enrolls once, with a new key, on its own new TLS connection:
- row 1: EST ``simplereenroll`` by mutual TLS with its current certificate (the front door verifies
  it; ``--clients`` concurrent chargers);
- row 2 (``--relay-share`` of the fleet): its CSMS relays the CSR through ``POST /api/v1/sign``
  (OCPP SignCertificate; a bearer token, ``--clients`` keep-alive relay connections).

Reported per row: re-enrollments/s, p50/p99 latency, server CPU per certificate (the server's
process tree: nginx, gunicorn and its workers, from /proc), projected time for 1,000,000 at that
rate, peak RSS of the server tree. Checked afterwards: every client got a certificate for its CN and
new key from the new CA; the store holds exactly that certificate as each device's only valid
one; every superseded certificate is revoked (superseded); every stored OCSP response of the old
and new certificates parses, verifies under its delegated signer and says revoked / good; the
campaign reads all devices re-enrolled, none pending; ``audit verify`` passes.

    .venv/bin/python bench/rotation.py --chargers 2000 --rows 50000           # a few minutes
    .venv/bin/python bench/rotation.py                                        # the full size:
        100,000 chargers, 1,000,000 rows (`make bench-rotation`; set-up alone takes a while)
    add --postgresql for PostgreSQL; --out FILE appends the report (default bench/results-rotation.md)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import queue
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # the repository, not bench/ (bench/ocsp.py would shadow the package)

from sqlalchemy import func, insert, select, text  # noqa: E402

from bench.harness import free_port, postgres_schema, tree_cpu_seconds, wait_for  # noqa: E402
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy  # noqa: E402
from ca.authorities.issuers import default_issuing_ca, issuer_for  # noqa: E402
from ca.config import Config, EstSettings, FrontDoorSettings, embedded_defaults, write_config  # noqa: E402
from ca.context import Pki  # noqa: E402
from ca.issuance.flow import build_certificate, validity_window  # noqa: E402
from ca.issuance.names import subject_name  # noqa: E402
from ca.issuance.profiles import get_profile  # noqa: E402
from ca.issuance.serials import format_serial, new_serial  # noqa: E402
from ca.registry.csms import add_client, issue_token  # noqa: E402
from ca.store.models import Authority, Certificate, Device, KeyOwner, OcspResponse  # noqa: E402
from ca.work import Work  # noqa: E402
from ocsp.presign import Presigner, policy_from  # noqa: E402

ORG = "Bench Charging"
MILLION = 1_000_000
DEFAULT_RELAY_SHARE = 0.2  # the share of the fleet that re-enrolls through CSMS relays


@dataclass
class Charger:
    serial: str
    device_id: int
    key_pem: bytes
    certificate_der: bytes
    new_key: ec.EllipticCurvePrivateKey | None = None
    csr_der: bytes = b""
    received: x509.Certificate | None = None


@dataclass
class Row:
    name: str
    ok: int
    total: int
    seconds: float
    latencies: list[float]
    server_cpu: float
    peak_rss_mb: float
    errors: list[str] = field(default_factory=list)
    cpu_by_process: dict[str, float] = field(default_factory=dict)  # seconds, by process name (nginx, python…)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000 if ordered else 0.0


# -- set-up ----------------------------------------------------------------------------------------
def make_home(work: Path, database_url: str | None, workers: int) -> tuple[Path, dict[str, str], int]:
    home = work / "home"
    defaults = embedded_defaults(home)
    port = free_port()
    write_config(
        Config(
            home=home,
            database_url=database_url or defaults.database_url,
            pkcs11=defaults.pkcs11,
            est=EstSettings(port=port, workers=workers, default_environment="production"),
            # The relays stand for one CSMS, the mTLS chargers for a fleet, all on this one address: the
            # front door's per-address rate limit (200/s by default) would answer 429 to what the server
            # can do. A CSMS relaying a fleet's renewals needs the same (docs/front-door.md).
            front_door=FrontDoorSettings(requests_per_second=100_000),
        )
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
    return home, environ, port


def populate(
    home: Path, environ: dict[str, str], chargers: int, rows: int, log: Callable[[str], None]
) -> list[Charger]:
    """The hierarchy, the fleet (real certificates from CA 1) and the history rows, by bulk INSERTs."""
    pki = Pki.open(home, environ, create=True)
    token = pki.token()
    fleet: list[Charger] = []
    with pki.store.session() as session:
        status = Presigner(token, policy_from(pki.config.ocsp))
        hierarchy = init_hierarchy(
            Work(session=session, actor="bench", status=status, token=token), request=HierarchyRequest(organization=ORG)
        )
        authority = hierarchy.issuing
        issuer = issuer_for(authority, token)
        profile = get_profile("charger")
        now = datetime.now(UTC)
        started = time.monotonic()
        devices = Device.__table__
        serials = [f"CP-{n:07d}" for n in range(chargers)]
        for start in range(0, chargers, 5000):
            batch = serials[start : start + 5000]
            session.execute(
                insert(devices),
                [
                    {
                        "serial": s,
                        "model": "bench",
                        "environment": "production",
                        "enabled": True,
                        "enrollment_open": False,
                        "created_at": now,
                    }
                    for s in batch
                ],
            )
        ids = {serial: id_ for serial, id_ in session.execute(select(devices.c.serial, devices.c.id))}
        certificates, owners = [], []
        template_der = b""
        for index, serial in enumerate(serials):
            key = ec.generate_private_key(ec.SECP256R1())
            validity = validity_window(profile, None, now, issuer.certificate.not_valid_after_utc)
            subject = subject_name(serial, issuer.organization, issuer.country, profile.domain_component, None)
            number = new_serial()
            certificate = issuer.sign(build_certificate(profile, issuer, subject, key.public_key(), number, validity))
            der = certificate.public_bytes(serialization.Encoding.DER)
            template_der = template_der or der
            key_sha256 = _key_sha256(key.public_key())
            certificates.append(
                {
                    "serial": format_serial(number),
                    "authority_id": authority.id,
                    "profile": "charger",
                    "status": "valid",
                    "subject": subject.rfc4514_string(),
                    "common_name": serial,
                    "not_before": validity.not_before,
                    "not_after": validity.not_after,
                    "der": der,
                    "fingerprint_sha256": hashlib.sha256(der).hexdigest(),
                    "public_key_sha256": key_sha256,
                    "key_label": None,
                    "device_id": ids[serial],
                    "revoked_at": None,
                    "revocation_reason": None,
                    "invalidity_date": None,
                    "revoke_after": None,
                    "created_at": now,
                }
            )
            owners.append({"public_key_sha256": key_sha256, "identity": f"device:{ids[serial]}", "created_at": now})
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fleet.append(Charger(serial, ids[serial], pem, der))
            if len(certificates) == 2000 or index == chargers - 1:
                session.execute(insert(Certificate.__table__), certificates)
                session.execute(insert(KeyOwner.__table__), owners)
                session.commit()
                certificates, owners = [], []
                log(
                    f"  fleet: {index + 1}/{chargers} certificates signed in the token "
                    f"({time.monotonic() - started:.0f} s)"
                )
        history = rows - session.scalar(select(func.count()).select_from(Certificate))
        _history(session, authority, template_der, max(history, 0), now, log)
        session.commit()
        if session.get_bind().dialect.name == "postgresql":
            # What autovacuum does for a live table; without statistics after a bulk load PostgreSQL's
            # planner guessed (62 ms per lookup of a device's older certificates). SQLite stays as the
            # service keeps it: without statistics.
            session.execute(text("ANALYZE"))
            session.commit()
    pki.close()
    return fleet


def _key_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _history(session, authority: Authority, der: bytes, count: int, now: datetime, log: Callable[[str], None]) -> None:  # type: ignore[no-untyped-def]
    """Earlier certificates of CA 1: two in three superseded (revoked), the rest expired; no device any more."""
    table = Certificate.__table__
    started, batch = time.monotonic(), 10000
    for start in range(0, count, batch):
        values = []
        for n in range(start, min(start + batch, count)):
            issued = now - timedelta(days=400 + n % 700)
            revoked = n % 3 != 2
            values.append(
                {
                    "serial": format_serial(new_serial()),
                    "authority_id": authority.id,
                    "profile": "charger",
                    "status": "revoked" if revoked else "valid",
                    "subject": f"CN=CP-H{n:07d},O={ORG},C=DE",
                    "common_name": f"CP-H{n:07d}",
                    "not_before": issued,
                    "not_after": issued + timedelta(days=365),
                    "der": der,
                    "fingerprint_sha256": secrets.token_hex(32),
                    "public_key_sha256": secrets.token_hex(32),
                    "key_label": None,
                    "device_id": None,
                    "revoked_at": issued + timedelta(days=200) if revoked else None,
                    "revocation_reason": "superseded" if revoked else None,
                    "invalidity_date": None,
                    "revoke_after": None,
                    "created_at": issued,
                }
            )
        session.execute(insert(table), values)
        session.commit()
        if (start // batch) % 10 == 9 or start + batch >= count:
            log(f"  history: {min(start + batch, count)}/{count} rows ({time.monotonic() - started:.0f} s)")


def chargepki(home: Path, environ: dict[str, str], *args: str, timeout: float = 3600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "--home", str(home), *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"chargepki {' '.join(args)}: {done.stderr[-2000:]}")
    return done.stdout


# -- the re-enrollments ----------------------------------------------------------------------------
def rss_mb(root: int) -> float:
    """Resident memory of a process tree (MB)."""
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/status") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def cpu_by_name(root: int) -> dict[str, float]:
    """User+system CPU seconds of a process tree, summed by process name (``comm``: nginx, python3…)."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    pending = [root]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/stat") as handle:
                text = handle.read()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except (OSError, ValueError):
            continue
    return totals


@contextmanager
def memory_watch(root: int) -> Iterator[list[float]]:
    peak, stop = [0.0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            peak[0] = max(peak[0], rss_mb(root))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_mb(root))


def run_row(name: str, chargers: list[Charger], clients: int, server: int, one: Callable[[Charger, dict], None]) -> Row:
    work: queue.SimpleQueue[Charger | None] = queue.SimpleQueue()
    for charger in chargers:
        work.put(charger)
    for _ in range(clients):
        work.put(None)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        state: dict = {}
        while (charger := work.get()) is not None:
            started = time.perf_counter()
            try:
                one(charger, state)
            except Exception as exc:
                with lock:
                    errors.append(f"{charger.serial}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    cpu = tree_cpu_seconds(server)
    by_name = cpu_by_name(server)
    started = time.perf_counter()
    with memory_watch(server) as peak:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.perf_counter() - started
    after = cpu_by_name(server)
    split = {key: after[key] - by_name.get(key, 0.0) for key in after}
    return Row(
        name, len(latencies), len(chargers), elapsed, latencies, tree_cpu_seconds(server) - cpu, peak[0], errors, split
    )


def _received(status: int, body: bytes, charger: Charger, issuing: x509.Certificate) -> x509.Certificate:
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    return _check(pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))[0], charger, issuing)


def _check(certificate: x509.Certificate, charger: Charger, issuing: x509.Certificate) -> x509.Certificate:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert charger.new_key is not None
    if not names or names[0].value != charger.serial:
        raise RuntimeError(f"certificate for {certificate.subject.rfc4514_string()}")
    if certificate.public_key() != charger.new_key.public_key():
        raise RuntimeError("certificate for another key")
    certificate.verify_directly_issued_by(issuing)  # the new CA, not CA 1
    return certificate


def mtls_reenroll(port: int, root: Path, issuing: x509.Certificate, scratch: Path) -> Callable[[Charger, dict], None]:
    def one(charger: Charger, state: dict) -> None:
        if "context" not in state:  # one context per client thread; its client certificate changes per charger
            state["context"] = ssl.create_default_context(cafile=str(root))
            state["file"] = scratch / f"client-{threading.get_ident()}.pem"
        credentials: Path = state["file"]
        credentials.write_bytes(charger.key_pem + _pem(charger.certificate_der))
        state["context"].load_cert_chain(str(credentials))
        connection = http.client.HTTPSConnection("localhost", port, context=state["context"], timeout=60)
        try:  # a charger's own connection: a full TLS handshake with its current certificate
            connection.request(
                "POST",
                "/.well-known/est/simplereenroll",
                body=base64.encodebytes(charger.csr_der),
                headers={"Content-Type": "application/pkcs10"},
            )
            response = connection.getresponse()
            charger.received = _received(response.status, response.read(), charger, issuing)
        finally:
            connection.close()

    return one


def relayed_reenroll(
    port: int, root: Path, issuing: x509.Certificate, api_token: str
) -> Callable[[Charger, dict], None]:
    def one(charger: Charger, state: dict) -> None:
        if "connection" not in state:  # a CSMS keeps its connection open
            context = ssl.create_default_context(cafile=str(root))
            state["connection"] = http.client.HTTPSConnection("localhost", port, context=context, timeout=60)
        connection: http.client.HTTPSConnection = state["connection"]
        body = json.dumps(
            {
                "chargingStationId": charger.serial,
                "csr": x509.load_der_x509_csr(charger.csr_der).public_bytes(serialization.Encoding.PEM).decode(),
            }
        )
        try:
            connection.request(
                "POST",
                "/api/v1/sign",
                body=body,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_token}"},
            )
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            state.pop("connection").close()
            raise
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
        leaf = x509.load_pem_x509_certificates(json.loads(payload)["certificateChain"].encode())[0]
        charger.received = _check(leaf, charger, issuing)

    return one


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


# -- checks ----------------------------------------------------------------------------------------
def verify(home: Path, environ: dict[str, str], fleet: list[Charger], old_id: int, new_id: int) -> list[str]:
    problems: list[str] = []
    received = {c.serial: c.received for c in fleet}
    missing = [s for s, r in received.items() if r is None]
    if missing:
        problems.append(f"{len(missing)} chargers got no certificate (e.g. {missing[:3]})")
    pki = Pki.open(home, environ)
    with pki.store.session() as session:
        table = Certificate.__table__
        device_ids = {c.device_id: c for c in fleet}
        valid = session.execute(
            select(table.c.device_id, table.c.authority_id, table.c.fingerprint_sha256).where(
                table.c.profile == "charger", table.c.status == "valid", table.c.device_id.is_not(None)
            )
        ).all()
        by_device: dict[int, list[tuple[int, str]]] = {}
        for device_id, authority_id, fingerprint in valid:
            by_device.setdefault(device_id, []).append((authority_id, fingerprint))
        wrong = 0
        for device_id, charger in device_ids.items():
            current = by_device.get(device_id, [])
            expected = charger.received.fingerprint(hashes.SHA256()).hex() if charger.received else None
            if current != [(new_id, expected)]:
                wrong += 1
        if wrong:
            problems.append(
                f"{wrong} devices do not hold exactly the received certificate from the new CA as only valid one"
            )
        old = {c.certificate_der for c in fleet}
        superseded = session.execute(
            select(table.c.der, table.c.status, table.c.revocation_reason, table.c.serial).where(
                table.c.authority_id == old_id, table.c.device_id.is_not(None), table.c.profile == "charger"
            )
        ).all()
        not_revoked = [
            r.serial
            for r in superseded
            if r.der in old and (r.status, r.revocation_reason) != ("revoked", "superseded")
        ]
        if not_revoked or len([r for r in superseded if r.der in old]) != len(fleet):
            problems.append(f"{len(not_revoked)} superseded certificates not revoked (superseded)")
        problems += _check_ocsp(session, fleet, old_id, new_id)
    pki.close()
    return problems


def _check_ocsp(session, fleet: list[Charger], old_id: int, new_id: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Every stored response of the old and new certificates: parses, verifies, says what the store says."""
    table = Certificate.__table__
    expected: dict[tuple[int, str], str] = {}
    for charger in fleet:
        old = x509.load_der_x509_certificate(charger.certificate_der)
        expected[(old_id, format_serial(old.serial_number))] = "REVOKED"
        if charger.received is not None:
            expected[(new_id, format_serial(charger.received.serial_number))] = "GOOD"
    signers = {
        row.serial: x509.load_der_x509_certificate(row.der)
        for row in session.execute(select(table.c.serial, table.c.der).where(table.c.profile == "ocsp-signer"))
    }
    now = datetime.now(UTC)
    seen, bad = set(), []
    responses = OcspResponse.__table__
    for row in session.execute(
        select(responses.c.authority_id, responses.c.serial, responses.c.der, responses.c.signer_serial).where(
            responses.c.authority_id.in_((old_id, new_id))
        )
    ):
        key = (row.authority_id, row.serial)
        if key not in expected:
            continue
        parsed = ocsp.load_der_ocsp_response(row.der)
        signer = signers[row.signer_serial]
        signer.public_key().verify(
            parsed.signature, parsed.tbs_response_bytes, ec.ECDSA(parsed.signature_hash_algorithm)
        )  # type: ignore[union-attr, arg-type, call-arg]
        answer = parsed.certificate_status.name
        fresh = parsed.next_update_utc is not None and parsed.next_update_utc > now
        if answer != expected[key] or not fresh or parsed.serial_number != int(row.serial, 16):
            bad.append(f"{row.serial}: {answer}")
        seen.add(key)
    problems = []
    if len(seen) != len(expected):
        problems.append(f"{len(expected) - len(seen)} of {len(expected)} certificates have no stored OCSP response")
    if bad:
        problems.append(f"{len(bad)} OCSP answers wrong (e.g. {bad[:3]})")
    return problems


def campaign_counts(home: Path, environ: dict[str, str], old_name: str) -> dict[str, int]:
    out = chargepki(home, environ, "campaign", "status", "--from-ca", old_name)
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


# -- main --------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chargers", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=MILLION, help="certificate rows in the store before the rotation")
    parser.add_argument(
        "--relay-share", type=float, default=DEFAULT_RELAY_SHARE, help="share of the fleet re-enrolled via /api/v1/sign"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--postgresql", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-rotation.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chargepki-rotation-"))
    drop: Callable[[], None] | None = None
    database_url = None
    if args.postgresql:
        schema = postgres_schema("rotation")
        if schema is None:
            raise SystemExit("PostgreSQL is not reachable (CHARGEPKI_TEST_PG)")
        database_url, drop = schema
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {message}", flush=True)

    try:
        home, environ, port = make_home(work, database_url, args.workers)
        log(f"set-up: {args.chargers} chargers with certificates from CA 1, {args.rows} certificate rows")
        fleet = populate(home, environ, args.chargers, args.rows, log)
        pki = Pki.open(home, environ)
        with pki.store.session() as session:
            old = default_issuing_ca(session, "production")
            old_name, old_id = old.name, old.id
        pki.close()
        log(chargepki(home, environ, "ca", "rotate").strip().splitlines()[-1])
        log(chargepki(home, environ, "campaign", "start", "--from-ca", old_name).strip().splitlines()[-1])
        pki = Pki.open(home, environ)
        with pki.store.session() as session:
            new = default_issuing_ca(session, "production")
            new_id, issuing = new.id, x509.load_der_x509_certificate(new.certificate_der)
            chain_root = session.scalar(select(Authority.certificate_der).where(Authority.role == "root"))
            relay = add_client(Work(session, "bench"), name="bench-csms", environment="production")
            session.commit()
            api_token = issue_token(Work(session, "bench"), client=relay)
            session.commit()
        pki.close()
        root = work / "root.pem"
        root.write_bytes(_pem(chain_root))
        log("new keys and CSRs for the fleet (the chargers' side, not timed)")
        for charger in fleet:
            charger.new_key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                    x509.NameAttribute(NameOID.COMMON_NAME, charger.serial),
                ]
            )
            charger.csr_der = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(subject)
                .sign(charger.new_key, hashes.SHA256())
                .public_bytes(serialization.Encoding.DER)
            )
        relayed = int(len(fleet) * args.relay_share)
        direct, by_relay = fleet[: len(fleet) - relayed], fleet[len(fleet) - relayed :]
        log_file = work / "est.log"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "--home",
                str(home),
                "serve",
                "est",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
            ],
            cwd=ROOT,
            env=environ,
            stdout=log_file.open("wb"),
            stderr=subprocess.STDOUT,
        )
        rows: list[Row] = []
        try:
            wait_for(port, server, log_file)
            time.sleep(2)
            idle_rss = rss_mb(server.pid)
            log(f"serve est up ({args.workers} workers, {idle_rss:.0f} MB); {len(direct)} simplereenroll by mTLS")
            scratch = work / "clients"
            scratch.mkdir()
            rows.append(
                run_row(
                    f"EST simplereenroll, mTLS, new key ({args.clients} chargers at a time)",
                    direct,
                    args.clients,
                    server.pid,
                    mtls_reenroll(port, root, issuing, scratch),
                )
            )
            log(f"{rows[-1].ok}/{rows[-1].total} in {rows[-1].seconds:.1f} s; {len(by_relay)} through /api/v1/sign")
            if by_relay:
                rows.append(
                    run_row(
                        f"CSMS API /api/v1/sign relays, new key ({args.clients} relay connections)",
                        by_relay,
                        args.clients,
                        server.pid,
                        relayed_reenroll(port, root, issuing, api_token),
                    )
                )
                log(f"{rows[-1].ok}/{rows[-1].total} in {rows[-1].seconds:.1f} s")
        finally:
            server.terminate()
            server.wait(timeout=30)
        log("checking the store, the OCSP responses, the campaign and the audit chain")
        problems = [error for row in rows for error in row.errors[:5]]
        problems += verify(home, environ, fleet, old_id, new_id)
        counts = campaign_counts(home, environ, old_name)
        if counts.get("re-enrolled") != len(fleet) or counts.get("pending", 0) or counts.get("failed", 0):
            problems.append(f"campaign progress {counts}, expected {len(fleet)} re-enrolled")
        audit = chargepki(home, environ, "audit", "verify").strip().splitlines()[-1]
        if "ok" not in audit.lower() and "intact" not in audit.lower():
            problems.append(f"audit verify: {audit}")
        if "Traceback" in log_file.read_text(errors="replace"):
            problems.append(f"traceback in the server log {log_file}")
        report = render(args, rows, counts, audit, problems, idle_rss)
        print(report)
        with args.out.open("a") as out:
            out.write(report + "\n")
        return 1 if problems else 0
    finally:
        if drop is not None:
            drop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def render(
    args: argparse.Namespace, rows: list[Row], counts: dict[str, int], audit: str, problems: list[str], idle_rss: float
) -> str:
    load = os.getloadavg()
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.chargers} chargers, {args.rows} certificate "
        f"rows, {'PostgreSQL' if args.postgresql else 'SQLite'}, {args.workers} EST workers, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} / {load[1]:.1f} at the end",
        "",
        f"`.venv/bin/python bench/rotation.py --chargers {args.chargers} --rows {args.rows} --clients {args.clients} "
        f"--workers {args.workers}{' --postgresql' if args.postgresql else ''}"
        f"{f' --relay-share {args.relay_share:g}' if args.relay_share != DEFAULT_RELAY_SHARE else ''}`",
        "",
        "| re-enrollment path | ok | re-enrollments/s | p50 ms | p99 ms | server CPU ms/cert "
        "| 1,000,000 at this rate | server peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [row for row in rows if row.total]  # a path given no chargers (--relay-share 0 or 1) has no row
    for row in rows:
        projected = MILLION / row.rate / 60 if row.rate else float("inf")
        lines.append(
            f"| {row.name} | {row.ok}/{row.total} | {row.rate:.0f} | {row.percentile(0.5):.0f} | "
            f"{row.percentile(0.99):.0f} | {row.server_cpu / max(row.ok, 1) * 1000:.1f} | {projected:.0f} min | "
            f"{row.peak_rss_mb:.0f} (idle {idle_rss:.0f}) |"
        )
    for row in rows:
        split = ", ".join(
            f"{name} {seconds / max(row.ok, 1) * 1000:.1f}"
            for name, seconds in sorted(row.cpu_by_process.items(), key=lambda item: -item[1])
            if seconds > 0
        )
        lines.append(f"Server CPU ms/cert by process, {row.name}: {split}.")
    lines += [
        "",
        f"Campaign at the end: {counts}. Audit: {audit}.",
        "Checks: "
        + (
            "every certificate recorded, every superseded one revoked, every OCSP answer right."
            if not problems
            else "FAILED: " + "; ".join(problems)
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
