"""Soak: a bounded mixed load on loopback against the processes `make run` starts.

A fresh home (SQLite and a SoftHSM2 token by default, like `make run`; ``--postgresql`` for a
PostgreSQL schema) on free ports, then ``chargepki run``: EST over HTTPS (gunicorn, ``--workers``),
the OCSP responder (granian) with its signer + refresher process, and ``crl publish --watch``.
Client threads then mix, until ``--seconds`` have passed:

- enroll: a device registered and given a one-time secret through the core (what `device add` +
  `token issue` do), then ``simpleenroll`` over HTTPS with HTTP Basic; certificate checked
- reenroll: ``simplereenroll`` over mutual TLS with the device's current certificate (same key or
  a new one); the old certificate is superseded (revoked) by the server
- revoke: through the core (what `chargepki revoke` calls) or, one in four, the CLI process itself;
  then OCSP polled until it says ``revoked`` (the time is reported)
- OCSP: GET and POST, SHA-1 CertIDs (pre-signed) and some SHA-256 (the on-demand signer); every
  response parsed, its signature and delegated signer verified, the status compared with what
  the client knows (good, or revoked with the reason)
- CRL: fetched from the repository URL, signature, nextUpdate and a never-decreasing CRL number
  checked, and every revocation older than a few seconds must be listed; `chargepki crl publish`
  also races the watcher once a minute
- cacerts: ``GET /cacerts``

Reported: totals, errors (any is a failure: exit status 1), p50/p99 per operation, RSS of every
process (each worker too) at the start, after warm-up and at the end; RSS growth after warm-up
beyond ``--max-growth-mb`` (and 15%) fails the run, as does a process that died or was replaced.
Afterwards: every certificate a client received is in the store, serials are unique, the final
CRL lists every revocation, `chargepki audit verify` passes and the server logs hold no traceback.

    .venv/bin/python bench/soak.py [--seconds 600] [--clients 4] [--workers 4] [--postgresql]
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import psycopg
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import cmdline, descendants, free_port, parent, rss_mb  # noqa: E402
from ca.config import Config, EstSettings, OcspSettings, embedded_defaults, write_config  # noqa: E402
from ca.context import Pki  # noqa: E402
from ca.registry.devices import add_device  # noqa: E402
from ca.registry.secrets import issue_secret  # noqa: E402
from ca.status.revocation import revoke  # noqa: E402
from ca.store.models import Certificate  # noqa: E402
from ca.work import Work  # noqa: E402
from ocsp.presign import Presigner, policy_from  # noqa: E402

ORG = "Soak Charging"
ISSUING = "production-issuing-1"
REASONS = ["keyCompromise", "cessationOfOperation", "affiliationChanged", "certificateHold"]
PROPAGATION_SECONDS = 5.0  # a revocation must reach OCSP within this (it takes ~0.1-1 s); else an error
CRL_GRACE_SECONDS = 5.0  # revocations older than this must be in any CRL fetched (--watch: ~1 s)
SAMPLE_SECONDS = 5.0


# -- processes and memory ------------------------------------------------------------------------
def processes(root: int) -> dict[int, str]:
    """Every process of the `chargepki run` tree, named for what it does."""
    names: dict[int, str] = {}
    counters: dict[str, int] = defaultdict(int)
    for pid in sorted(descendants(root)):
        line, parent_pid = cmdline(pid), parent(pid)
        if pid == root:
            name = "EST gunicorn master (chargepki run)"
        elif parent_pid == root and " serve ocsp" in line:
            name = "OCSP responder main (granian)"
        elif " ocsp signer" in line:
            name = "OCSP signer + refresher"
        elif " crl publish" in line:
            name = "CRL publisher --watch"
        elif parent_pid == root:
            counters["est"] += 1
            name = f"EST worker {counters['est']}"
        else:
            counters["ocsp"] += 1
            name = f"OCSP worker {counters['ocsp']}"
        names[pid] = name
    return names


def settle(root: int, expected: int, timeout: float = 90) -> None:
    """Until every process of the tree has started and none has come or gone for three seconds."""
    deadline = time.monotonic() + timeout
    last, since = set(), time.monotonic()
    while time.monotonic() < deadline:
        current = set(descendants(root))
        if current != last:
            last, since = current, time.monotonic()
        elif len(current) >= expected and time.monotonic() - since >= 3:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the process tree did not settle: {len(last)} processes, {expected} expected")


class MemoryWatch(threading.Thread):
    """Samples the RSS of every process of the tree every few seconds."""

    def __init__(self, root: int) -> None:
        super().__init__(name="rss", daemon=True)
        self.root = root
        self.names = processes(root)
        self.samples: dict[int, list[tuple[float, float]]] = defaultdict(list)
        self.stop = threading.Event()
        self.started_at = time.monotonic()

    def sample(self) -> dict[int, float]:
        now = time.monotonic() - self.started_at
        current = {}
        for pid in self.names:
            value = rss_mb(pid)
            if value is not None:
                self.samples[pid].append((now, value))
                current[pid] = value
        return current

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS):
            self.sample()


# -- client state ----------------------------------------------------------------------------------
@dataclass
class Device:
    serial: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    files: tuple[str, str]  # PEM certificate and key, for mutual TLS
    retired: bool = False  # its certificate was revoked: it leaves the pool


@dataclass
class Revoked:
    certificate: x509.Certificate
    reason: str
    at: float  # time.time() when the revocation committed (or the re-enrollment answered)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # message → how often
    error_counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    propagation: list[float] = field(default_factory=list)  # revocation commit → OCSP says revoked
    crl_numbers: list[tuple[float, int]] = field(default_factory=list)  # (when answered, CRL number)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, operation: str, seconds: float) -> None:
        with self.lock:
            self.latencies[operation].append(seconds)

    def error(self, operation: str, message: str) -> None:
        with self.lock:
            self.error_counts[operation] += 1
            self.errors[f"{operation}: {message}"] += 1


class Fleet:
    """What the clients know: enrolled devices (each used by one operation at a time), revocations."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.lock = threading.Lock()
        self.idle: dict[str, Device] = {}
        self.revoked: list[Revoked] = []  # every revocation the clients caused, in order
        self.received: list[x509.Certificate] = []  # every certificate a client received
        self.next_device = 0

    def new_serial(self) -> str:
        with self.lock:
            self.next_device += 1
            return f"CP-SOAK-{self.next_device:06d}"

    @contextmanager
    def device(self, rng: random.Random) -> Iterator[Device | None]:
        with self.lock:
            serial = rng.choice(list(self.idle)) if self.idle else None
            device = self.idle.pop(serial) if serial else None
        try:
            yield device
        finally:
            if device is not None and not device.retired:
                with self.lock:
                    self.idle[device.serial] = device

    def store(self, serial: str, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> Device:
        directory = self.work / "devices"
        directory.mkdir(exist_ok=True)
        stem = directory / f"{serial}-{certificate.serial_number:x}"
        cert_file, key_file = f"{stem}.pem", f"{stem}.key"
        Path(cert_file).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        Path(key_file).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        with self.lock:
            self.received.append(certificate)
        return Device(serial, key, certificate, (cert_file, key_file))

    def record_revocation(self, certificate: x509.Certificate, reason: str, at: float) -> None:
        with self.lock:
            self.revoked.append(Revoked(certificate, reason, at))

    def settled_revocations(self, older_than: float) -> list[Revoked]:
        cutoff = time.time() - older_than
        with self.lock:
            return [r for r in self.revoked if r.at <= cutoff]


# -- the installation ------------------------------------------------------------------------------
@dataclass
class Installation:
    home: Path
    environ: dict[str, str]
    est_port: int
    ocsp_port: int
    process: subprocess.Popen[bytes]
    log: Path
    root: x509.Certificate
    issuing: x509.Certificate
    root_file: Path

    @property
    def est(self) -> str:
        return f"https://localhost:{self.est_port}/.well-known/est"

    @property
    def ocsp(self) -> str:
        return f"http://127.0.0.1:{self.ocsp_port}/ocsp"

    @property
    def crl(self) -> str:
        return f"http://127.0.0.1:{self.ocsp_port}/pki/{ISSUING}.crl"


def chargepki(home: Path, environ: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "--home", str(home), *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(work: Path, database_url: str | None, workers: int, ocsp_workers: int, cache_entries: int) -> Installation:
    home = work / "home"
    defaults = embedded_defaults(home)
    est_port, ocsp_port = free_port(), free_port()
    write_config(
        Config(
            home=home,
            database_url=database_url or defaults.database_url,
            pkcs11=defaults.pkcs11,
            ocsp_url=f"http://127.0.0.1:{ocsp_port}/ocsp",
            repository_url=f"http://127.0.0.1:{ocsp_port}/pki",
            est=EstSettings(port=est_port, workers=workers),
            ocsp=OcspSettings(port=ocsp_port, workers=ocsp_workers, cache_entries=cache_entries),
        )
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
    environ["CHARGEPKI_ORG"] = ORG
    log = work / "run.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--home", str(home), "run"],
        cwd=ROOT,
        env=environ,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    deadline = time.monotonic() + 180
    for port in (est_port, ocsp_port):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"chargepki run exited: {log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"chargepki run did not start: {log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
    chain = chargepki(home, environ, "ca", "chain", "--ca", ISSUING)
    if chain.returncode != 0:
        raise RuntimeError(chain.stderr)
    issuing, root = x509.load_pem_x509_certificates(chain.stdout.encode())
    root_file = work / "root.pem"
    root_file.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return Installation(home, environ, est_port, ocsp_port, process, log, root, issuing, root_file)


def stop(installation: Installation) -> bool:
    """Ctrl-C's effect on `chargepki run` (SIGINT to its process group); True if it stopped by itself."""
    process = installation.process
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(30)
        clean = True
    except subprocess.TimeoutExpired:
        clean = False
    time.sleep(1.0)
    with suppress(ProcessLookupError):  # anything left of the group
        os.killpg(process.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        process.wait(10)
    return clean


# -- operations ------------------------------------------------------------------------------------
def csr_der(serial: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, serial)]
    )
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def _snake(reason: str) -> str:
    """RFC 5280's reason name as cryptography's ``ReasonFlags`` member name (keyCompromise → key_compromise)."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in reason)


class Failure(Exception):
    """An answer the service must not give."""


def _issued(response: requests.Response, serial: str, key: ec.EllipticCurvePrivateKey, issuing: x509.Certificate):
    if response.status_code != 200:
        raise Failure(f"HTTP {response.status_code}: {response.text[:200]}")
    (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != serial:
        raise Failure(f"certificate for {certificate.subject.rfc4514_string()}, asked for {serial}")
    if certificate.public_key().public_numbers() != key.public_key().public_numbers():
        raise Failure("certificate for another key")
    certificate.verify_directly_issued_by(issuing)
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise Failure("charger certificate without clientAuth")
    return certificate


class Load:
    """The operations, each raising ``Failure`` (or anything) on a wrong answer."""

    def __init__(self, installation: Installation, fleet: Fleet, stats: Stats, deadline: float) -> None:
        self.i = installation
        self.fleet = fleet
        self.stats = stats
        self.deadline = deadline
        self.pki = Pki.open(installation.home, installation.environ)
        self.presigner = Presigner(self.pki.token(), policy_from(self.pki.config.ocsp))
        self.local = threading.local()
        self.crl_lock = threading.Lock()

    def session(self) -> requests.Session:
        """One keep-alive session per client thread. (``verify`` goes with each request: a session's own
        is overridden by REQUESTS_CA_BUNDLE when that is set.)"""
        if getattr(self.local, "session", None) is None:
            self.local.session = requests.Session()
        return self.local.session

    # enrollment with a one-time secret ----------------------------------------------------------
    def enroll(self, rng: random.Random) -> None:
        serial = self.fleet.new_serial()
        with self.pki.store.session() as session:
            device = add_device(Work(session, "cli:soak"), serial=serial, model="Soak 22")
            secret = issue_secret(Work(session, "cli:soak"), device=device)
        key = ec.generate_private_key(ec.SECP256R1())
        body = base64.encodebytes(csr_der(serial, key))
        started = time.perf_counter()
        response = self.session().post(
            f"{self.i.est}/simpleenroll",
            verify=str(self.i.root_file),
            data=body,
            auth=(serial, secret),
            headers={"Content-Type": "application/pkcs10"},
            timeout=60,
        )
        elapsed = time.perf_counter() - started
        certificate = _issued(response, serial, key, self.i.issuing)
        device_state = self.fleet.store(serial, key, certificate)
        with self.fleet.lock:
            self.fleet.idle[serial] = device_state
        self.stats.ok("enroll (simpleenroll, secret)", elapsed)

    # re-enrollment over mutual TLS ---------------------------------------------------------------
    def reenroll(self, rng: random.Random) -> None:
        with self.fleet.device(rng) as device:
            if device is None:
                return self.enroll(rng)
            rekey = rng.random() < 0.5
            key = ec.generate_private_key(ec.SECP256R1()) if rekey else device.key
            body = base64.encodebytes(csr_der(device.serial, key))
            started = time.perf_counter()
            response = requests.post(  # a charger's own connection, with its current certificate
                f"{self.i.est}/simplereenroll",
                data=body,
                cert=device.files,
                verify=str(self.i.root_file),
                headers={"Content-Type": "application/pkcs10"},
                timeout=60,
            )
            elapsed = time.perf_counter() - started
            answered = time.time()
            certificate = _issued(response, device.serial, key, self.i.issuing)
            self.fleet.record_revocation(device.certificate, "superseded", answered)
            renewed = self.fleet.store(device.serial, key, certificate)
            device.key, device.certificate, device.files = renewed.key, renewed.certificate, renewed.files
        self.stats.ok(f"reenroll (simplereenroll, mTLS, {'new key' if rekey else 'same key'})", elapsed)

    # revocation ----------------------------------------------------------------------------------
    def revoke(self, rng: random.Random) -> None:
        with self.fleet.device(rng) as device:
            if device is None:
                return self.enroll(rng)
            serial = format(device.certificate.serial_number, "X")
            reason = rng.choice(REASONS)
            use_cli = rng.random() < 0.25
            started = time.perf_counter()
            if use_cli:
                result = chargepki(self.i.home, self.i.environ, "revoke", serial, "--reason", reason)
                if result.returncode != 0:
                    raise Failure(f"chargepki revoke: {result.stderr.strip()[:200]}")
            else:
                with self.pki.store.session() as session:
                    revoke(Work(session, "cli:soak", status=self.presigner), serial=serial, reason=reason)
            elapsed = time.perf_counter() - started
            committed = time.time()
            self.fleet.record_revocation(device.certificate, reason, committed)
            self.stats.ok("revoke (CLI process)" if use_cli else "revoke (core)", elapsed)
            device.retired = True  # gone from the pool: its certificate stays revoked
            # Propagation: the responder must say revoked within PROPAGATION_SECONDS of the commit.
            while True:
                status, _ = self.ocsp_status(device.certificate, hashes.SHA1(), rng.random() < 0.5)
                if status == "revoked":
                    self.stats.propagation.append(time.time() - committed)
                    return None
                if time.time() - committed > PROPAGATION_SECONDS:
                    raise Failure(f"{serial} still {status} {PROPAGATION_SECONDS:.0f} s after its revocation")
                time.sleep(0.05)

    # OCSP ----------------------------------------------------------------------------------------
    def ocsp_status(self, certificate: x509.Certificate, algorithm: hashes.HashAlgorithm, get: bool):
        """Ask the responder; check the response through and through; (status, reason or None)."""
        request = ocsp.OCSPRequestBuilder().add_certificate(certificate, self.i.issuing, algorithm).build()
        der = request.public_bytes(serialization.Encoding.DER)
        if get:
            response = self.session().get(f"{self.i.ocsp}/{quote(base64.b64encode(der).decode(), safe='')}", timeout=30)
        else:
            response = self.session().post(
                self.i.ocsp, data=der, headers={"Content-Type": "application/ocsp-request"}, timeout=30
            )
        if response.status_code != 200 or response.headers.get("Content-Type") != "application/ocsp-response":
            raise Failure(f"HTTP {response.status_code} {response.headers.get('Content-Type')}")
        parsed = ocsp.load_der_ocsp_response(response.content)
        if parsed.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise Failure(f"response status {parsed.response_status.name}")
        if parsed.serial_number != certificate.serial_number or parsed.issuer_key_hash != request.issuer_key_hash:
            raise Failure("the response is about another certificate")
        (signer,) = parsed.certificates
        signer.verify_directly_issued_by(self.i.issuing)
        if (
            ExtendedKeyUsageOID.OCSP_SIGNING
            not in signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        ):
            raise Failure("responder certificate without id-kp-OCSPSigning")
        public_key = signer.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(parsed.signature, parsed.tbs_response_bytes, ec.ECDSA(parsed.signature_hash_algorithm))
        now = datetime.now(UTC)
        if not parsed.this_update_utc <= now + timedelta(seconds=5) or not now < parsed.next_update_utc:
            raise Failure(f"outside its validity: {parsed.this_update_utc} – {parsed.next_update_utc}")
        status = parsed.certificate_status.name.lower()
        reason = parsed.revocation_reason.name if parsed.revocation_reason is not None else None
        return status, reason

    def ocsp_query(self, rng: random.Random, get: bool) -> None:
        algorithm = hashes.SHA256() if rng.random() < 0.1 else hashes.SHA1()
        method = f"OCSP {'GET' if get else 'POST'}"
        settled = self.fleet.settled_revocations(PROPAGATION_SECONDS)
        if settled and rng.random() < 0.3:
            revoked = rng.choice(settled)
            started = time.perf_counter()
            status, reason = self.ocsp_status(revoked.certificate, algorithm, get)
            elapsed = time.perf_counter() - started
            if status != "revoked" or reason != _snake(revoked.reason):
                raise Failure(
                    f"{revoked.certificate.serial_number:X} revoked ({revoked.reason}), but {status} ({reason})"
                )
            self.stats.ok(f"{method} (revoked)", elapsed)
            return
        with self.fleet.device(rng) as device:
            if device is None:
                return
            started = time.perf_counter()
            status, _ = self.ocsp_status(device.certificate, algorithm, get)
            elapsed = time.perf_counter() - started
        if status != "good":
            raise Failure(f"{device.certificate.serial_number:X} is current but {status}")
        self.stats.ok(f"{method} (good{', SHA-256' if isinstance(algorithm, hashes.SHA256) else ''})", elapsed)

    # CRL -----------------------------------------------------------------------------------------
    def crl_fetch(self, rng: random.Random) -> None:
        settled = {r.certificate.serial_number for r in self.fleet.settled_revocations(CRL_GRACE_SECONDS)}
        started = time.perf_counter()
        response = self.session().get(self.i.crl, timeout=30)
        finished = time.perf_counter()
        elapsed = finished - started
        if response.status_code != 200:
            raise Failure(f"HTTP {response.status_code}")
        crl = x509.load_der_x509_crl(response.content)
        if not crl.is_signature_valid(self.i.issuing.public_key()):  # type: ignore[arg-type]
            raise Failure("CRL signature does not verify")
        if crl.next_update_utc is None or crl.next_update_utc <= datetime.now(UTC):
            raise Failure("CRL past its nextUpdate")
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        with self.crl_lock:
            # Never lower than what a fetch answered before this one was sent. Fetches that overlap may
            # see the publications between them in either order (the client threads race, not the CRL).
            before = [seen for answered, seen in self.stats.crl_numbers if answered < started]
            if before and number < max(before):
                raise Failure(f"CRL number went back: {number} after {max(before)}")
            self.stats.crl_numbers.append((finished, number))
        listed = {entry.serial_number for entry in crl}
        missing = settled - listed
        if missing:
            raise Failure(f"{len(missing)} revocation(s) older than {CRL_GRACE_SECONDS:.0f} s missing from the CRL")
        self.stats.ok("CRL fetch (GET /pki, verified)", elapsed)

    def crl_publish_cli(self) -> None:
        started = time.perf_counter()
        result = chargepki(self.i.home, self.i.environ, "crl", "publish")
        if result.returncode != 0:
            raise Failure(f"chargepki crl publish: {result.stderr.strip()[:200]}")
        self.stats.ok("CRL publish (CLI process, racing --watch)", time.perf_counter() - started)

    def cacerts(self, rng: random.Random) -> None:
        started = time.perf_counter()
        response = self.session().get(f"{self.i.est}/cacerts", verify=str(self.i.root_file), timeout=30)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise Failure(f"HTTP {response.status_code}")
        chain = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
        if self.i.issuing not in chain:
            raise Failure("cacerts without the issuing CA")
        self.stats.ok("cacerts (GET)", elapsed)

    def close(self) -> None:
        self.pki.close()


WEIGHTS = {
    "enroll": 20,
    "reenroll": 12,
    "revoke": 4,
    "ocsp_get": 25,
    "ocsp_post": 25,
    "crl_fetch": 8,
    "cacerts": 6,
}


def client(load: Load, seed: int) -> None:
    rng = random.Random(seed)
    operations: dict[str, Callable[[random.Random], None]] = {
        "enroll": load.enroll,
        "reenroll": load.reenroll,
        "revoke": load.revoke,
        "ocsp_get": lambda r: load.ocsp_query(r, get=True),
        "ocsp_post": lambda r: load.ocsp_query(r, get=False),
        "crl_fetch": load.crl_fetch,
        "cacerts": load.cacerts,
    }
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    while time.monotonic() < load.deadline:
        name = rng.choices(names, weights)[0]
        try:
            operations[name](rng)
        except Exception as exc:  # every failure is counted and reported, never fatal to the run
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            load.stats.error(name, f"{type(exc).__name__}: {detail[:300]}")
            if not isinstance(exc, Failure | requests.RequestException):
                load.stats.error(name, traceback.format_exc(limit=3).replace("\n", " | ")[-600:])


def publisher(load: Load, every: float) -> None:
    """`chargepki crl publish` once a minute, racing the watcher (CRL numbers must still only rise)."""
    while time.monotonic() + every < load.deadline:
        time.sleep(every)
        try:
            load.crl_publish_cli()
        except Exception as exc:
            load.stats.error("crl_publish_cli", f"{type(exc).__name__}: {str(exc)[:300]}")


def progress(load: Load, started: float) -> None:
    while time.monotonic() < load.deadline:
        time.sleep(min(30.0, max(1.0, load.deadline - time.monotonic())))
        done = sum(len(v) for v in load.stats.latencies.values())
        errors = sum(load.stats.error_counts.values())
        print(
            f"soak: {time.monotonic() - started:.0f} s, {done:,} operations, {errors} errors",
            file=sys.stderr,
            flush=True,
        )


# -- afterwards ------------------------------------------------------------------------------------
def final_checks(installation: Installation, fleet: Fleet, stats: Stats) -> list[str]:
    """The store holds every certificate a client received, serials are unique, the CRL lists every
    revocation, the audit chain verifies. Returns what was checked (errors go to ``stats``)."""
    done = []
    pki = Pki.open(installation.home, installation.environ)
    try:
        with pki.store.session() as session:
            fingerprints = set(
                session.scalars(select(Certificate.fingerprint_sha256).where(Certificate.profile == "charger"))
            )
            received = {c.fingerprint(hashes.SHA256()).hex() for c in fleet.received}
            missing = received - fingerprints
            if missing:
                stats.error("final", f"{len(missing)} certificate(s) a client received are not in the store")
            total, distinct = session.execute(select(func.count(), func.count(func.distinct(Certificate.serial)))).one()
            if total != distinct:
                stats.error("final", f"{total - distinct} serial(s) used twice")
            statuses = dict(
                session.execute(
                    select(Certificate.status, func.count())
                    .where(Certificate.profile == "charger")
                    .group_by(Certificate.status)
                ).all()
            )
            session.commit()
        done.append(
            f"{len(received):,} certificates received by clients, all in the store; {total:,} serials, all distinct; "
            f"charger rows by status: {', '.join(f'{k} {v:,}' for k, v in sorted(statuses.items()))}"
        )
    finally:
        pki.close()
    time.sleep(CRL_GRACE_SECONDS)
    response = requests.get(installation.crl, timeout=30)
    listed = {entry.serial_number for entry in x509.load_der_x509_crl(response.content)}
    revoked = {r.certificate.serial_number for r in fleet.revoked}
    if revoked - listed:
        stats.error("final", f"{len(revoked - listed)} revocation(s) missing from the final CRL")
    done.append(f"final CRL lists all {len(revoked):,} revocations ({len(listed):,} entries)")
    verify = chargepki(installation.home, installation.environ, "audit", "verify", timeout=600)
    if verify.returncode != 0:
        stats.error("final", f"chargepki audit verify: {verify.stdout.strip()} {verify.stderr.strip()}")
    done.append(f"chargepki audit verify: {verify.stdout.strip() or verify.stderr.strip()}")
    return done


def log_problems(text: str, *, stopping: bool = False) -> list[str]:
    """Tracebacks and 5xx answers; while serving, also worker deaths (at Ctrl-C workers exit normally)."""
    problems = []
    if "Traceback" in text:
        problems.append(f"{text.count('Traceback')} traceback(s) in the server log")
    fivehundreds = sum(1 for line in text.splitlines() if '" 5' in line and "HTTP/1.1" in line)
    if fivehundreds:
        problems.append(f"{fivehundreds} 5xx line(s) in the EST access log")
    for marker in ("WORKER TIMEOUT", "Worker exiting", "exited unexpectedly"):
        if marker in text and not stopping:
            problems.append(f"{marker!r} in the server log")
    return problems


# -- report ----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def memory_rows(watch: MemoryWatch, warm_at: float, names: dict[int, str]) -> tuple[list[str], list[str]]:
    rows, failures = [], []
    for pid, name in names.items():
        samples = watch.samples.get(pid, [])
        if not samples:
            failures.append(f"{name} (pid {pid}): no RSS samples (did it die?)")
            continue
        first = samples[0][1]
        warm = next((value for at, value in samples if at >= warm_at), samples[-1][1])
        end = samples[-1][1]
        middle_at = (warm_at + samples[-1][0]) / 2
        middle = next((value for at, value in samples if at >= middle_at), end)
        peak = max(value for _, value in samples)
        growth = end - warm
        rows.append(
            f"| {name} | {pid} | {first:.0f} | {warm:.0f} | {middle:.0f} | {end:.0f} | {peak:.0f} | {growth:+.1f} MB "
            f"({growth / warm * 100:+.1f}%) |"
        )
        if growth > max(watch_limit(warm), 0):
            failures.append(f"{name} (pid {pid}) grew {growth:.1f} MB after warm-up ({warm:.0f} → {end:.0f} MB)")
    return rows, failures


MAX_GROWTH_MB = 24.0


def watch_limit(warm: float) -> float:
    """Growth after warm-up that fails the run: MAX_GROWTH_MB or 15% of the process, whichever is more."""
    return max(MAX_GROWTH_MB, warm * 0.15)


def report(
    args: argparse.Namespace,
    seconds: float,
    stats: Stats,
    memory: list[str],
    checks: list[str],
    publications: int,
    database: str,
) -> str:
    total_ops = sum(len(v) for v in stats.latencies.values())
    total_errors = sum(stats.error_counts.values())
    lines = [
        f"Soak, {seconds:.0f} s of mixed load on loopback ({time.strftime('%Y-%m-%d %H:%M')}), {database}, "
        f"EST {args.workers} gunicorn workers, OCSP {args.ocsp_workers} granian workers "
        f"(cache {args.cache_entries} entries), {args.clients} client threads; {os.cpu_count()} CPUs shared with "
        f"other work, Python {platform.python_version()}.",
        "",
        f"Operations: {total_ops:,} ({total_ops / seconds:.1f}/s), errors: **{total_errors}**; CRL publications "
        f"by the watcher: {publications:,}; revocation → OCSP `revoked`: "
        + (
            f"median {statistics.median(stats.propagation) * 1000:.0f} ms, max {max(stats.propagation) * 1000:.0f} ms "
            f"over {len(stats.propagation)}"
            if stats.propagation
            else "no revocation"
        )
        + ".",
        "",
        "| operation | count | per s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(stats.latencies):
        values = stats.latencies[name]
        lines.append(
            f"| {name} | {len(values):,} | {len(values) / seconds:.1f} | {percentile(values, 0.5) * 1000:.1f} | "
            f"{percentile(values, 0.99) * 1000:.1f} | {max(values) * 1000:.0f} |"
        )
    if stats.error_counts:
        lines += ["", "Errors by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.error_counts.items()))]
    lines += [
        "",
        "RSS per process (MB): at the start of the load, after warm-up, half way from there, at the end, peak; "
        f"growth after warm-up (fails beyond {MAX_GROWTH_MB:.0f} MB or 15%).",
        "",
        "| process | pid | start | after warm-up | half way | end | peak | growth after warm-up |",
        "|---|---|---|---|---|---|---|---|",
        *memory,
        "",
        "Afterwards:",
        "",
        *[f"- {check}" for check in checks],
    ]
    if stats.errors:
        common = sorted(stats.errors.items(), key=lambda item: -item[1])[:30]
        lines += ["", "Errors (most frequent first):", "", *[f"- {count}× {error}" for error, count in common]]
    return "\n".join(lines) + "\n"


@contextmanager
def postgresql_schema() -> Iterator[str]:
    admin_url = os.environ.get("CHARGEPKI_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"soak_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            url = make_url(admin_url).set(drivername="postgresql+psycopg")
            yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--workers", type=int, default=4, help="EST gunicorn workers")
    parser.add_argument("--ocsp-workers", type=int, default=2)
    parser.add_argument("--cache-entries", type=int, default=2000, help="per OCSP worker (full after warm-up)")
    parser.add_argument("--warm-up", type=float, help="seconds before the RSS baseline (default: 20%%, ≤ 120)")
    parser.add_argument("--postgresql", action="store_true", help="a PostgreSQL schema instead of SQLite")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (home, logs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-soak.md")
    args = parser.parse_args()
    warm_up = args.warm_up if args.warm_up is not None else min(120.0, args.seconds * 0.2)
    work = Path(tempfile.mkdtemp(prefix="chargepki-soak-"))
    with postgresql_schema() if args.postgresql else nullcontext() as url:
        try:
            return soak(args, work, url, warm_up)
        finally:
            if args.keep:
                print(f"work directory kept: {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)


def soak(args: argparse.Namespace, work: Path, database_url: str | None, warm_up: float) -> int:
    database = "PostgreSQL" if database_url else "SQLite"
    print(f"soak: starting chargepki run in {work} ({database}) …", file=sys.stderr, flush=True)
    installation = start(work, database_url, args.workers, args.ocsp_workers, args.cache_entries)
    stats, fleet = Stats(), Fleet(work)
    load: Load | None = None
    clean_stop = False
    try:
        expected = 1 + args.workers + 1 + args.ocsp_workers + 1 + 1  # run, EST workers, OCSP, its workers, signer, CRL
        settle(installation.process.pid, expected)
        watch = MemoryWatch(installation.process.pid)
        names = dict(watch.names)
        watch.sample()
        watch.start()
        started = time.monotonic()
        load = Load(installation, fleet, stats, started + args.seconds)
        print(
            f"soak: {len(names)} processes, {args.clients} clients, {args.seconds:.0f} s "
            f"(RSS baseline after {warm_up:.0f} s) …",
            file=sys.stderr,
            flush=True,
        )
        threads = [threading.Thread(target=client, args=(load, n), name=f"client-{n}") for n in range(args.clients)]
        threads.append(threading.Thread(target=publisher, args=(load, 60.0), name="crl-cli", daemon=True))
        threads.append(threading.Thread(target=progress, args=(load, started), name="progress", daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads[: args.clients]:
            thread.join()
        elapsed = time.monotonic() - started
        watch.sample()
        watch.stop.set()
        now_running = processes(installation.process.pid)
        for pid, name in names.items():
            if pid not in now_running:
                stats.error("processes", f"{name} (pid {pid}) is gone")
        for pid, name in now_running.items():
            if pid not in names:
                stats.error("processes", f"a new process appeared: {name} (pid {pid}), a restart")
        memory, failures = memory_rows(watch, warm_up, names)
        for failure in failures:
            stats.error("memory", failure)
        checks = final_checks(installation, fleet, stats)
    finally:
        if load is not None:
            load.close()
        served = installation.log.read_text(errors="replace")
        clean_stop = stop(installation)
    if not clean_stop:
        stats.error("shutdown", "chargepki run did not stop within 30 s of SIGINT")
    for problem in log_problems(served):
        stats.error("logs", problem)
    for problem in log_problems(installation.log.read_text(errors="replace")[len(served) :], stopping=True):
        stats.error("shutdown", f"after Ctrl-C: {problem}")
    log_text = installation.log.read_text(errors="replace")
    publications = sum(1 for line in log_text.splitlines() if line.startswith("published ") and ISSUING in line)
    text = report(args, elapsed, stats, memory, checks, publications, database)
    print(text)
    args.out.write_text(text)
    if args.keep:
        print(f"server log: {installation.log}", file=sys.stderr)
    errors = sum(stats.error_counts.values())
    print(f"soak: {'FAILED' if errors else 'passed'} with {errors} error(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
