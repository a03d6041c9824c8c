"""OCSP responder throughput, latency, memory and revocation propagation: chargepki next to its peers.

Same machine, same load generator (wrk, POSTed DER requests rotating over distinct certificates),
same data set (N certificates signed by the issuing CA in the SoftHSM2 token, 1% revoked):

- ``cfssl ocspserve`` serving chargepki's own pre-signed responses, exported to its response file
- ``openssl ocsp`` responder over an index.txt of the same serials and statuses (it signs every
  answer live with its own throwaway software CA + signer: it is only the peer)
- ``chargepki serve ocsp`` (granian, then gunicorn; 2 workers), POST and GET

then the responder's memory per worker and its rate with ``--big`` certificate rows, and the time
from a revocation's commit to the first ``revoked`` answer, over 100 revocations.

    .venv/bin/python bench/ocsp.py [--certs 100000] [--duration 15] [--connections 50] [--big 1000000]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import func, insert, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    Processes,
    chargepki_command,
    cmdline,
    cpu_seconds,
    descendants,
    free_port,
    machine,
    rss_mb,
    wait_for,
    wait_for_line,
)
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy  # noqa: E402
from ca.authorities.issuers import default_issuing_ca, issuer_for, public_key_sha256  # noqa: E402
from ca.config import Config, embedded_defaults, write_config  # noqa: E402
from ca.context import Pki  # noqa: E402
from ca.issuance.flow import build_certificate, validity_window  # noqa: E402
from ca.issuance.names import subject_name  # noqa: E402
from ca.issuance.profiles import get_profile  # noqa: E402
from ca.issuance.serials import format_serial, new_serial  # noqa: E402
from ca.status.revocation import revoke  # noqa: E402
from ca.store.models import Certificate, OcspResponse  # noqa: E402
from ca.work import Work  # noqa: E402
from ocsp.certid import CertId, issuer_hashes  # noqa: E402
from ocsp.presign import Presigner, policy_from  # noqa: E402
from ocsp.signing import SingleStatus  # noqa: E402

ORG = "Bench Charging"
CHUNK = 5000
# wrk script: requests are length-prefixed records in a file (DER bodies for POST, URL paths for GET).
WRK_LUA = """
-- No probe connection before the run: openssl ocsp 3.0 spins forever on a connection closed without a request.
wrk.resolve = function(host, service) wrk.addrs = wrk.lookup(host, service) end
local data = assert(io.open("{records}", "rb")):read("*a")
local items, pos = {{}}, 1
while pos <= #data do
  local hi, lo = data:byte(pos, pos + 1)
  local n = hi * 256 + lo
  items[#items + 1] = data:sub(pos + 2, pos + 1 + n)
  pos = pos + 2 + n
end
local headers = {{["Content-Type"] = "application/ocsp-request"}}
local i = 0
function init(args) i = math.random(#items) end
function request()
  i = i % #items + 1
  if "{method}" == "POST" then return wrk.format("POST", "{path}", headers, items[i]) end
  return wrk.format("GET", "{path}" .. items[i])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


# -- processes -------------------------------------------------------------------------------------
@dataclass
class Memory:
    """RSS of a server's processes: the ones serving HTTP (workers) and the rest (main, signer)."""

    workers: list[float]
    others: dict[str, float]

    def describe(self) -> str:
        parts = [f"workers {', '.join(f'{m:.0f}' for m in self.workers)} MB"] if self.workers else []
        parts += [f"{name} {value:.0f} MB" for name, value in self.others.items()]
        return "; ".join(parts)


def memory(root_pid: int, kind: str) -> Memory:
    pids = descendants(root_pid)
    if kind != "chargepki":
        return Memory([(rss_mb(pid) or 0.0) for pid in pids], {})
    workers, others = [], {}
    for pid in pids:
        line = cmdline(pid)
        if "ocsp signer" in line:
            others["on-demand signer"] = rss_mb(pid) or 0.0
        elif pid == root_pid:
            others["main"] = rss_mb(pid) or 0.0
        else:
            workers.append(rss_mb(pid) or 0.0)
    return Memory(workers, others)


# -- data set --------------------------------------------------------------------------------------
@dataclass
class DataSet:
    home: Path
    environ: dict[str, str]
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serials: list[int] = field(default_factory=list)
    revoked: set[int] = field(default_factory=set)
    not_after: datetime | None = None
    timings: dict[str, float] = field(default_factory=dict)
    refreshes: list[tuple[int, int, float]] = field(default_factory=list)  # (rows in table, signed, seconds)


def make_dataset(work: Path, count: int, database_url: str | None, refresh_sizes: Sequence[int]) -> DataSet:
    """A fresh home and hierarchy; ``count`` charger certificates signed in the token; 1% revoked.

    The real refresher (`chargepki ocsp refresh`) pre-signs the responses of the first stages
    (``refresh_sizes`` rows each, timed); the rest is pre-signed here with the same token signer
    and bulk inserts, because the refresher slows down with the table's size (see the report).
    """
    home = work / "home"
    defaults = embedded_defaults(home)
    write_config(Config(home=home, database_url=database_url or defaults.database_url, pkcs11=defaults.pkcs11))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")}
    pki = Pki.open(home, environ, create=True)
    try:
        with pki.store.session() as session:
            presigner = Presigner(pki.token(), policy_from(pki.config.ocsp))
            init_hierarchy(
                Work(session=session, actor="bench", status=presigner, token=pki.token()),
                request=HierarchyRequest(organization=ORG),
            )
            authority = default_issuing_ca(session, None)
            issuer = issuer_for(authority, pki.token())
        assert issuer.certificate is not None
        sha1 = next(h for h in issuer_hashes(issuer.certificate) if h.hash_algorithm == "sha1")
        data = DataSet(home, environ, sha1.name_hash, sha1.key_hash)
        profile = get_profile("charger")
        now = datetime.now(UTC)
        validity = validity_window(profile, None, now, issuer.certificate.not_valid_after_utc)
        data.not_after = validity.not_after
        started = time.perf_counter()
        keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(count)]
        data.timings["keys"] = time.perf_counter() - started
        revoked_indexes = set(random.Random(1).sample(range(count), max(1, count // 100)))
        started = time.perf_counter()
        rows: list[dict[str, object]] = []
        for index, public_key in enumerate(keys):
            serial = new_serial()
            common_name = f"CP-{index:07d}"
            subject = subject_name(common_name, issuer.organization, issuer.country)
            certificate = issuer.sign(build_certificate(profile, issuer, subject, public_key, serial, validity))
            data.serials.append(serial)
            revoked = index in revoked_indexes
            if revoked:
                data.revoked.add(serial)
            rows.append(
                {
                    "serial": format_serial(serial),
                    "authority_id": authority.id,
                    "profile": "charger",
                    "status": "revoked" if revoked else "valid",
                    "subject": subject.rfc4514_string(),
                    "common_name": common_name,
                    "not_before": validity.not_before,
                    "not_after": validity.not_after,
                    "der": certificate.public_bytes(serialization.Encoding.DER),
                    "fingerprint_sha256": certificate.fingerprint(hashes.SHA256()).hex(),
                    "public_key_sha256": public_key_sha256(public_key),
                    "revoked_at": now if revoked else None,
                    "revocation_reason": "keyCompromise" if revoked else None,
                    "created_at": now,
                }
            )
        data.timings["sign"] = time.perf_counter() - started

        def insert_rows(table: type[Certificate] | type[OcspResponse], batch: Sequence[dict[str, object]]) -> None:
            with pki.store.session() as session:
                for offset in range(0, len(batch), CHUNK):
                    session.execute(insert(table), batch[offset : offset + CHUNK])
                session.commit()

        done = 0
        for size in refresh_sizes:  # the real refresher, on a table growing stage by stage
            size = min(size, count - done)
            if size <= 0:
                break
            insert_rows(Certificate, rows[done : done + size])
            done += size
            seconds, signed = refresher(data)
            assert signed == size, f"the refresher signed {signed} responses for {size} new certificates"
            data.refreshes.append((done, size, seconds))
        if done < count:
            started = time.perf_counter()
            insert_rows(Certificate, rows[done:])
            data.timings["insert"] = time.perf_counter() - started
            started = time.perf_counter()
            with pki.store.session() as session:
                signer = presigner.signer_for(session, authority.id, now)
                assert signer is not None
            next_update = min(now + presigner.policy.validity, signer.not_after)
            responses = []
            for index in range(done, count):  # what Presigner.store + upsert_response write, minus the upsert
                serial = data.serials[index]
                revoked = serial in data.revoked
                single = SingleStatus(
                    CertId("sha1", sha1.name_hash, sha1.key_hash, serial),
                    "revoked" if revoked else "good",
                    now if revoked else None,
                    "keyCompromise" if revoked else None,
                )
                responses.append(
                    {
                        "authority_id": authority.id,
                        "serial": format_serial(serial),
                        "hash_algorithm": "sha1",
                        "cert_status": single.status,
                        "der": signer.sign([single], this_update=now, next_update=next_update),
                        "this_update": now,
                        "next_update": next_update,
                        "signer_serial": signer.serial,
                    }
                )
            data.timings["presign"] = time.perf_counter() - started
            data.timings["presigned"] = count - done
            started = time.perf_counter()
            insert_rows(OcspResponse, responses)
            data.timings["insert"] += time.perf_counter() - started
            seconds, signed = refresher(data)  # must find nothing left to sign
            assert signed == 0, f"the refresher re-signed {signed} of the bulk pre-signed responses"
            data.timings["final refresh"] = seconds
    finally:
        pki.close()
    return data


def refresher(data: DataSet) -> tuple[float, int]:
    """Run `chargepki ocsp refresh` (the real refresher, signing in the token): (seconds, responses signed)."""
    started = time.perf_counter()
    result = subprocess.run(
        chargepki_command(data.home, "ocsp", "refresh"), cwd=ROOT, env=data.environ, check=True, capture_output=True
    )
    seconds = time.perf_counter() - started
    match = re.search(rb"(\d+) response\(s\) signed", result.stdout)
    assert match is not None, result.stdout
    return seconds, int(match.group(1))


def stored_responses(data: DataSet) -> list[tuple[str, str, bytes]]:
    """(serial, cert_status, DER) of every pre-signed SHA-1 response of the charger certificates."""
    pki = Pki.open(data.home, data.environ)
    try:
        with pki.store.session() as session:
            rows = session.execute(
                select(OcspResponse.serial, OcspResponse.cert_status, OcspResponse.der)
                .join(
                    Certificate,
                    (Certificate.serial == OcspResponse.serial)
                    & (Certificate.authority_id == OcspResponse.authority_id),
                )
                .where(Certificate.profile == "charger", OcspResponse.hash_algorithm == "sha1")
            ).all()
    finally:
        pki.close()
    return [(row.serial, row.cert_status, row.der) for row in rows]


def ocsp_request(name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def write_records(path: Path, records: Sequence[bytes]) -> Path:
    with path.open("wb") as handle:
        for record in records:
            handle.write(len(record).to_bytes(2, "big") + record)
    return path


# -- peers -----------------------------------------------------------------------------------------
def openssl_peer(directory: Path, data: DataSet) -> tuple[Path, bytes, bytes]:
    """A throwaway software CA + delegated signer for openssl, and index.txt with the data set's statuses."""
    directory.mkdir()
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, "openssl peer CA")]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openssl peer OCSP signer")])
    signer = (
        x509.CertificateBuilder()
        .subject_name(signer_name)
        .issuer_name(ca_name)
        .public_key(signer_key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "signer.pem").write_bytes(signer.public_bytes(serialization.Encoding.PEM))
    (directory / "signer.key").write_bytes(
        signer_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert data.not_after is not None
    expiry = data.not_after.strftime("%y%m%d%H%M%SZ")
    revoked_at = now.strftime("%y%m%d%H%M%SZ")
    lines = []
    for index, serial in enumerate(data.serials):
        text = format(serial, "X")
        text = "0" * (len(text) % 2) + text  # openssl looks serials up as BN_bn2hex writes them: whole octets
        if serial in data.revoked:
            lines.append(f"R\t{expiry}\t{revoked_at},keyCompromise\t{text}\tunknown\t/O={ORG}/CN=CP-{index:07d}\n")
        else:
            lines.append(f"V\t{expiry}\t\t{text}\tunknown\t/O={ORG}/CN=CP-{index:07d}\n")
    (directory / "index.txt").write_text("".join(lines))
    sha1 = next(h for h in issuer_hashes(ca) if h.hash_algorithm == "sha1")
    return directory, sha1.name_hash, sha1.key_hash


def openssl_multi() -> bool:
    result = subprocess.run(["openssl", "ocsp", "-help"], capture_output=True, text=True)
    return "-multi" in result.stdout + result.stderr


# -- load and checks -------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    server_cpu: float
    rss: Memory
    cold_rate: float = 0.0  # during the warm-up, from a fresh server (empty caches)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wrk(
    work: Path,
    name: str,
    url_path: str,
    port: int,
    records: Path,
    method: str,
    args: argparse.Namespace,
    server: int,
    kind: str,
    restart: Callable[[], int] | None = None,
) -> Run:
    """Warm up, then one measured wrk run; server CPU from /proc over the measured run.

    ``restart`` (openssl) starts a fresh server before each run and returns its pid.
    """
    script = work / f"wrk-{hashlib.sha1(name.encode()).hexdigest()[:8]}.lua"
    script.write_text(WRK_LUA.format(records=records, method=method, path=url_path))
    url = f"http://127.0.0.1:{port}{url_path}"

    def once(duration: float) -> list[int]:
        command = [
            "wrk",
            "-t",
            str(args.threads),
            "-c",
            str(args.connections),
            "-d",
            f"{max(1, round(duration))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        finished = subprocess.run(command, capture_output=True, text=True)
        output = finished.stdout
        if finished.returncode:
            raise RuntimeError(f"wrk failed: {finished.stderr[-1000:]}")
        line = next((line for line in output.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result: {output[-1000:]}")
        return [int(value) for value in line.split()[1:]]

    if restart is not None:
        server = restart()
    cold = once(args.warmup)
    if restart is not None:
        server = restart()
    pids = descendants(server)
    before = cpu_seconds(pids)
    requests, duration_us, p50, p99, worst, errors = once(args.duration)
    used = cpu_seconds(pids) - before
    rss = memory(server, kind)
    run = Run(name, requests, duration_us / 1e6, p50 / 1000, p99 / 1000, worst / 1000, errors, used, rss)
    run.cold_rate = cold[0] / (cold[1] / 1e6)
    return run


def check_answers(port: int, url_path: str, cases: Sequence[tuple[bytes, str]]) -> None:
    """Every answer is a successful OCSP response with the expected status (so the rate counts real answers)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for der, expected in cases:
            got = post_status(connection, url_path, der)
            if got != expected:
                raise RuntimeError(f"port {port}: expected {expected}, got {got}")
    finally:
        connection.close()


def post_status(connection: http.client.HTTPConnection, url_path: str, der: bytes) -> str:
    connection.request("POST", url_path, body=der, headers={"Content-Type": "application/ocsp-request"})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        return f"HTTP {response.status}"
    parsed = ocsp.load_der_ocsp_response(body)
    if parsed.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return parsed.response_status.name
    return parsed.certificate_status.name.lower()


SERVE_EXTRA: list[str] = []  # ["--direct"]: without the front door (nginx)


def start_chargepki(
    processes: Processes, data: DataSet, work: Path, port: int, server: str, tag: str, workers: int = 2
) -> subprocess.Popen[bytes]:
    log = work / f"serve-{tag}.log"
    command = chargepki_command(
        data.home, "serve", "ocsp", "--port", str(port), "--workers", str(workers), "--server", server, *SERVE_EXTRA
    )
    process = processes.start(command, log, env=data.environ)
    wait_for(port, process, log)
    wait_idle(process.pid)
    return process


def wait_idle(root: int, timeout: float = 300) -> None:
    """Until the tree stops using CPU: the signer's first refresher pass scans every certificate."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(descendants(root))
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(descendants(root))
        if now - last < 0.05:
            return
        last = now


# -- propagation -----------------------------------------------------------------------------------
@dataclass
class Propagation:
    name: str
    first_ms: list[float]  # commit → first revoked answer on any connection
    all_ms: list[float]  # commit → every connection has answered revoked
    revoke_ms: list[float]  # the revoke call itself: token signature + commit
    regressions: int  # a connection said good again after revoked (must be 0)


def propagation(
    name: str, data: DataSet, ports: Sequence[int], serials: Sequence[int], per_port: int = 4
) -> Propagation:
    """Revoke one certificate at a time through the core (what `chargepki revoke` calls) and poll the responders."""
    pki = Pki.open(data.home, data.environ)
    presigner = Presigner(pki.token(), policy_from(pki.config.ocsp))
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for port in ports for _ in range(per_port)]
    result = Propagation(name, [], [], [], 0)
    try:
        for serial in serials:
            der = ocsp_request(data.issuer_name_hash, data.issuer_key_hash, serial)
            for connection in connections:  # cache the good answer in the workers first: the worst case
                for _ in range(2):
                    status = post_status(connection, "/ocsp", der)
                    assert status == "good", status
            with pki.store.session() as session:
                started = time.perf_counter()
                revoke(Work(session, "bench", status=presigner), serial=format_serial(serial), reason="keyCompromise")
                committed = time.perf_counter()
            result.revoke_ms.append((committed - started) * 1000)
            first_seen: dict[int, float] = {}
            streak = 0
            while streak < 3:
                if time.perf_counter() - committed > 30:
                    raise RuntimeError(f"{format_serial(serial)} not revoked everywhere after 30 s")
                answers = [post_status(connection, "/ocsp", der) for connection in connections]
                now = time.perf_counter()
                for index, status in enumerate(answers):
                    if status == "revoked":
                        first_seen.setdefault(index, now)
                    elif index in first_seen:
                        result.regressions += 1
                streak = streak + 1 if len(first_seen) == len(connections) else 0
            result.first_ms.append((min(first_seen.values()) - committed) * 1000)
            result.all_ms.append((max(first_seen.values()) - committed) * 1000)
    finally:
        for connection in connections:
            connection.close()
        pki.close()
    return result


# -- the big data set ------------------------------------------------------------------------------
def grow(data: DataSet, total: int) -> tuple[float, list[int]]:
    """Add rows up to ``total`` certificates; their certificate and response blobs copy real ones."""
    pki = Pki.open(data.home, data.environ)
    extra: list[int] = []
    started = time.perf_counter()
    try:
        with pki.store.session() as session:
            template = session.scalars(
                select(Certificate).where(Certificate.profile == "charger", Certificate.status == "valid").limit(1)
            ).one()
            responses = {
                status: session.scalars(
                    select(OcspResponse)
                    .join(Certificate, Certificate.serial == OcspResponse.serial)
                    .where(Certificate.profile == "charger", OcspResponse.cert_status == status)
                    .limit(1)
                ).one()
                for status in ("good", "revoked")
            }
            have = session.scalar(select(func.count()).select_from(Certificate).where(Certificate.profile == "charger"))
            now = datetime.now(UTC)
            for offset in range(have or 0, total, CHUNK):
                certificates, stored = [], []
                for index in range(offset, min(total, offset + CHUNK)):
                    serial = new_serial()
                    text = format_serial(serial)
                    revoked = index % 100 == 0
                    extra.append(serial)
                    certificates.append(
                        {
                            "serial": text,
                            "authority_id": template.authority_id,
                            "profile": "charger",
                            "status": "revoked" if revoked else "valid",
                            "subject": template.subject,
                            "common_name": f"CP-{index:07d}",
                            "not_before": template.not_before,
                            "not_after": template.not_after,
                            "der": template.der,
                            "fingerprint_sha256": hashlib.sha256(text.encode()).hexdigest(),
                            "public_key_sha256": template.public_key_sha256,
                            "revoked_at": now if revoked else None,
                            "revocation_reason": "keyCompromise" if revoked else None,
                            "created_at": now,
                        }
                    )
                    response = responses["revoked" if revoked else "good"]
                    stored.append(
                        {
                            "authority_id": response.authority_id,
                            "serial": text,
                            "hash_algorithm": "sha1",
                            "cert_status": response.cert_status,
                            "der": response.der,
                            "this_update": response.this_update,
                            "next_update": response.next_update,
                            "signer_serial": response.signer_serial,
                        }
                    )
                session.execute(insert(Certificate), certificates)
                session.execute(insert(OcspResponse), stored)
                session.commit()
    finally:
        pki.close()
    return time.perf_counter() - started, extra


# -- report ----------------------------------------------------------------------------------------
def versions() -> str:
    def first_line(command: list[str]) -> str:
        with suppress(OSError, subprocess.CalledProcessError):
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            return (result.stdout or result.stderr).splitlines()[0].strip()
        return "?"

    import granian

    cfssl = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "golang-cfssl"], capture_output=True, text=True)
    return (
        f"{first_line(['wrk', '--version'])}; {first_line(['openssl', 'version'])}; "
        f"golang-cfssl {cfssl.stdout.strip() or '?'}; granian {granian.__version__}; Python {platform.python_version()}"
    )


def table(runs: Sequence[Run], baseline: Run) -> list[str]:
    lines = [
        "| responder | requests/s | p50 ms | p99 ms | max ms | errors | server CPU ms/1k req "
        "| RSS after the run | vs cfssl | warm-up requests/s (fresh server) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.rate:,.0f} | {run.p50_ms:.2f} | {run.p99_ms:.2f} | {run.max_ms:.1f} | {run.errors} | "
            f"{run.server_cpu / max(run.requests, 1) * 1e6:.0f} | {run.rss.describe()} | "
            f"{run.rate / baseline.rate:.2f}× | {run.cold_rate:,.0f} |"
        )
    return lines


def summary(result: Propagation) -> str:
    if not result.first_ms:  # --revocations 0: throughput only
        return f"| {result.name} | 0 | – | – | – | – | – | {result.regressions} |"
    return (
        f"| {result.name} | {len(result.first_ms)} | {statistics.median(result.first_ms):.0f} | "
        f"{max(result.first_ms):.0f} | {statistics.median(result.all_ms):.0f} | {max(result.all_ms):.0f} | "
        f"{statistics.median(result.revoke_ms):.1f} | {result.regressions} |"
    )


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="chargepki-bench-ocsp-"))
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=int, default=100_000, help="certificates signed in the token")
    parser.add_argument("--distinct", type=int, default=10_000, help="distinct certificates wrk rotates over")
    parser.add_argument("--duration", type=float, default=15, help="seconds per measured wrk run")
    parser.add_argument(
        "--warmup", type=float, default=10, help="seconds of wrk before each measured run (fills the caches)"
    )
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (the machine's cores are shared)")
    parser.add_argument("--revocations", type=int, default=100, help="revocations per propagation scenario")
    parser.add_argument("--big", type=int, default=1_000_000, help="certificate rows for the memory part (0: skip)")
    parser.add_argument(
        "--refresh-stages", default="1000,4000", help="rows pre-signed by `chargepki ocsp refresh`, stage by stage"
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL instead of the home's SQLite (e.g. PostgreSQL)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-ocsp.md")
    parser.add_argument("--direct", action="store_true", help="serve ocsp --direct (no nginx in front)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    args = parser.parse_args()
    if args.direct:
        SERVE_EXTRA.append("--direct")
    for tool, package in (("wrk", "wrk"), ("cfssl", "golang-cfssl"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: `make bench-ocsp` installs Debian's {package}", file=sys.stderr)
            return 1
    began = time.perf_counter()
    processes = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on `kill`, too
    with workdir(args.keep) as work:
        try:
            report = benchmark(work, args, processes)
        finally:
            processes.stop_all()
    report.append(f"\nTotal run time of bench/ocsp.py: {time.perf_counter() - began:.0f} s.")
    text = "\n".join(report) + "\n"
    print(text)
    args.out.write_text(text)
    return 0


@dataclass
class Workload:
    """What the load generator sends: a sample of the data set's certificates as OCSP requests."""

    exported: list[tuple[str, str, bytes]]  # every pre-signed response: (serial, status, DER)
    sample: list[int]
    revoked_in_sample: int
    post_records: Path
    get_records: Path
    checks: list[tuple[bytes, str]]  # answers checked before each run: (request, expected status)


@dataclass
class Results:
    runs: list[Run]  # cfssl first: the baseline of every table
    cfssl_load: float
    multi: bool
    one: Propagation
    two: Propagation
    big_lines: list[str]


def benchmark(work: Path, args: argparse.Namespace, processes: Processes) -> list[str]:
    """The whole run: the data set, the peers, chargepki, revocation propagation, the big data set; the report."""
    database = "PostgreSQL" if args.database_url and args.database_url.startswith("postgres") else "SQLite"
    print(f"signing {args.certs} certificates in the token ({database}) …", file=sys.stderr)
    data = make_dataset(work, args.certs, args.database_url, [int(n) for n in args.refresh_stages.split(",") if n])
    load = workload(work, args, data)
    cfssl_run, cfssl_load = run_cfssl(work, args, processes, load)
    openssl_runs, multi = run_openssl(work, args, processes, data, load.sample)
    chargepki_runs = run_chargepki(work, args, processes, data, load)
    one, two = run_propagation(work, args, processes, data)
    runs = [cfssl_run, *openssl_runs, *chargepki_runs]
    big_lines = run_big(work, args, processes, data, cfssl_run) if args.big > args.certs else []
    return report(args, database, data, load, Results(runs, cfssl_load, multi, one, two, big_lines))


def workload(work: Path, args: argparse.Namespace, data: DataSet) -> Workload:
    """Checks the store holds one right response per certificate, then writes the request files wrk reads."""
    exported = stored_responses(data)
    assert len(exported) == args.certs, f"{len(exported)} pre-signed responses for {args.certs} certificates"
    by_serial = {int(serial, 16): status for serial, status, _ in exported}
    assert all((by_serial[s] == "revoked") == (s in data.revoked) for s in data.serials)

    rng = random.Random(2)
    sample = rng.sample(data.serials, min(args.distinct, len(data.serials)))
    requests = [ocsp_request(data.issuer_name_hash, data.issuer_key_hash, s) for s in sample]
    post_records = write_records(work / "post.bin", requests)
    get_records = write_records(work / "get.bin", [base64.urlsafe_b64encode(der).rstrip(b"=") for der in requests])
    expected = ["revoked" if s in data.revoked else "good" for s in sample]
    checks = list(zip(requests, expected, strict=True))[:300] + [
        (der, status) for der, status in zip(requests, expected, strict=True) if status == "revoked"
    ]
    revoked_in_sample = sum(1 for s in sample if s in data.revoked)
    return Workload(exported, sample, revoked_in_sample, post_records, get_records, checks)


def run_cfssl(work: Path, args: argparse.Namespace, processes: Processes, load: Workload) -> tuple[Run, float]:
    """cfssl ocspserve over the very responses chargepki pre-signed (base64 DER, one per line); and its load time."""
    cfssl_dir = work / "cfssl"
    cfssl_dir.mkdir()
    (cfssl_dir / "responses").write_text("".join(base64.b64encode(der).decode() + "\n" for _, _, der in load.exported))
    port = free_port()
    log = cfssl_dir / "serve.log"
    started = time.perf_counter()
    command = ["cfssl", "ocspserve", "-address", "127.0.0.1", "-port", str(port), "-responses", "responses"]
    process = processes.start([*command, "-loglevel", "5"], log, cwd=cfssl_dir)
    wait_for(port, process, log)
    cfssl_load = time.perf_counter() - started
    check_answers(port, "/", load.checks)
    print("cfssl ocspserve …", file=sys.stderr)
    name = "cfssl ocspserve (pre-signed file), POST"
    run = wrk(work, name, "/", port, load.post_records, "POST", args, process.pid, "cfssl")
    processes.stop(process)
    return run, cfssl_load


def run_openssl(
    work: Path, args: argparse.Namespace, processes: Processes, data: DataSet, sample: list[int]
) -> tuple[list[Run], bool]:
    """openssl ocsp: its own CA and signer, the same serials and statuses, signs every answer; 1 and 2 processes."""
    peer, name_hash, key_hash = openssl_peer(work / "openssl", data)
    openssl_requests = [ocsp_request(name_hash, key_hash, s) for s in sample]
    openssl_records = write_records(work / "openssl.bin", openssl_requests)
    openssl_checks = [
        (ocsp_request(name_hash, key_hash, s), "revoked" if s in data.revoked else "good") for s in sample[:300]
    ]
    multi = openssl_multi()
    runs = []
    for children in [1, 2] if multi else [1]:
        port = free_port()
        command = ["openssl", "ocsp", "-index", "index.txt", "-port", str(port), "-rsigner", "signer.pem"]
        command += ["-rkey", "signer.key", "-CA", "ca.pem", "-nmin", "60", "-ignore_err"]
        if children > 1:
            command += ["-multi", str(children)]
        current: list[subprocess.Popen[bytes]] = []

        def start_openssl(
            command: list[str] = command, children: int = children, current: list[subprocess.Popen[bytes]] = current
        ) -> int:
            """A fresh responder: one stalled by a client that closed without a request never recovers."""
            for process in current:
                processes.stop(process)
            current.clear()
            log = peer / f"serve-{children}.log"
            process = processes.start(command, log, cwd=peer)
            current.append(process)
            # With -multi the children log to syslog: wait for the bind, then for the forks.
            wait_for_line(log, process, "waiting for OCSP client connections" if children == 1 else "ACCEPT")
            time.sleep(0.3 if children == 1 else 1.5)
            return process.pid

        server = start_openssl()
        check_answers(port, "/", openssl_checks)
        label = "1 process" if children == 1 else f"-multi {children} (child processes)"
        print(f"openssl ocsp {label} …", file=sys.stderr)
        name = f"openssl ocsp, {label}, POST"
        runs.append(wrk(work, name, "/", port, openssl_records, "POST", args, server, "openssl", restart=start_openssl))
        for process in current:
            processes.stop(process)
    return runs, multi


def run_chargepki(
    work: Path, args: argparse.Namespace, processes: Processes, data: DataSet, load: Workload
) -> list[Run]:
    """chargepki: granian (POST, GET), gunicorn (POST); 2 workers each."""
    runs = []
    for server, method, records in (
        ("granian", "POST", load.post_records),
        ("granian", "GET", load.get_records),
        ("gunicorn", "POST", load.post_records),
    ):
        port = free_port()
        process = start_chargepki(processes, data, work, port, server, f"{server}-{method}")
        check_answers(port, "/ocsp", load.checks)
        url_path = "/ocsp" if method == "POST" else "/ocsp/"
        print(f"chargepki {server} {method} …", file=sys.stderr)
        name = f"chargepki serve ocsp, {server}, 2 workers, {method}"
        runs.append(wrk(work, name, url_path, port, records, method, args, process.pid, "chargepki"))
        processes.stop(process)
    return runs


def run_propagation(
    work: Path, args: argparse.Namespace, processes: Processes, data: DataSet
) -> tuple[Propagation, Propagation]:
    """Revocation → revoked: one responder process (2 workers), then two processes sharing one signer."""
    candidates = [s for s in data.serials if s not in data.revoked]
    picked = random.Random(3).sample(candidates, min(len(candidates), 2 * args.revocations))
    port_a, port_b = free_port(), free_port()
    first = start_chargepki(processes, data, work, port_a, "granian", "propagation-a")
    print("propagation, one process …", file=sys.stderr)
    one = propagation("one `serve ocsp` process, 2 workers (8 connections)", data, [port_a], picked[: args.revocations])
    second = start_chargepki(processes, data, work, port_b, "granian", "propagation-b")
    print("propagation, two processes …", file=sys.stderr)
    two = propagation(
        "two `serve ocsp` processes × 2 workers, shared signer (4+4 connections)",
        data,
        [port_a, port_b],
        picked[args.revocations :],
    )
    processes.stop(second)
    processes.stop(first)
    return one, two


def run_big(work: Path, args: argparse.Namespace, processes: Processes, data: DataSet, baseline: Run) -> list[str]:
    """Memory and lookups once the data set has grown to ``--big`` rows; the report's section on it."""
    print(f"growing the data set to {args.big} rows …", file=sys.stderr)
    grow_seconds, extra = grow(data, args.big)
    everything = data.serials + extra
    big_sample = random.Random(4).sample(everything, min(len(everything), 100_000))
    big_requests = [ocsp_request(data.issuer_name_hash, data.issuer_key_hash, s) for s in big_sample]
    big_records = write_records(work / "big.bin", big_requests)
    port = free_port()
    process = start_chargepki(processes, data, work, port, "granian", "big")
    idle = memory(process.pid, "chargepki")
    print("chargepki on the big data set …", file=sys.stderr)
    name = f"chargepki serve ocsp, granian, 2 workers, POST, {args.big:,} rows"
    big_run = wrk(work, name, "/ocsp", port, big_records, "POST", args, process.pid, "chargepki")
    processes.stop(process)
    size = sum(p.stat().st_size for p in data.home.glob("chargepki.db*"))
    return [
        "",
        f"## Memory and lookups with {args.big:,} certificates",
        "",
        f"{args.big:,} certificate rows and {args.big:,} pre-signed SHA-1 responses: the {args.certs:,} real ones "
        f"above plus {args.big - args.certs:,} rows added with bulk inserts in {grow_seconds:.0f} s whose "
        "certificate and response blobs are copies of one real certificate / one real good or revoked response "
        "(1% revoked), since only memory and lookup speed matter here. "
        + (f"SQLite file {size / 2**20:,.0f} MB. " if size else "")
        + f"wrk rotates over {len(big_sample):,} distinct serials drawn from all rows (more than the "
        "50,000-entry per-worker cache, so many lookups reach the database).",
        "",
        f"RSS after start, before any request: {idle.describe()}. The vs-cfssl column compares with "
        f"cfssl's run above ({args.certs:,} responses).",
        "",
        *table([big_run], baseline),
    ]


def report(args: argparse.Namespace, database: str, data: DataSet, load: Workload, results: Results) -> list[str]:
    """results-ocsp.md: the machine, the data set, throughput and latency, propagation, the big data set."""
    return [
        "# OCSP responder benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}; {versions()}.",
        *report_data_set(args, database, data),
        *report_throughput(args, load, results),
        *report_propagation(args, results),
        *results.big_lines,
        "",
        "Reproduce: `make bench-ocsp` (or `.venv/bin/python bench/ocsp.py --certs N --duration S "
        "--connections C --big M`).",
    ]


def report_data_set(args: argparse.Namespace, database: str, data: DataSet) -> list[str]:
    timings = data.timings
    return [
        "",
        "## Data set",
        "",
        f"{args.certs:,} charger certificates (EC P-256 keys, one per certificate) built with "
        "`ca.issuance.flow.build_certificate` and signed by the issuing CA's key in the SoftHSM2 token "
        f"(`Issuer.sign`, which verifies each signature): {timings['sign']:.1f} s, "
        f"{args.certs / timings['sign']:,.0f} certificates/s (plus {timings['keys']:.1f} s generating the "
        f"subjects' keys); recorded with bulk Core inserts ({database}; no audit entries: this is a data set, "
        f"not issuance); {len(data.revoked):,} (1%) recorded as revoked (keyCompromise).",
        "",
        "Pre-signing with the real refresher, `chargepki ocsp refresh` (a new process each time, signing in the "
        "token), run after each stage of rows was inserted:",
        "",
        "| rows in the table | responses signed | seconds | responses/s |",
        "|---|---|---|---|",
        *[
            f"| {rows:,} | {signed:,} | {seconds:.1f} | {signed / seconds:,.0f} |"
            for rows, signed, seconds in data.refreshes
        ],
        "",
        (
            f"The other {timings['presigned']:,.0f} responses were signed by the bench itself with the same "
            "delegated signer in the token (`ocsp.signing.ResponseSigner.sign`, the refresher's signing call) and "
            f"bulk-inserted: {timings['presign']:.1f} s, {timings['presigned'] / timings['presign']:,.0f} "
            "responses/s, because the refresher's cost per response grows with the table (see the rates above). "
            f"A final `chargepki ocsp refresh` found nothing left to sign ({timings['final refresh']:.1f} s)."
            if "presign" in timings
            else ""
        ),
        "",
    ]


def report_throughput(args: argparse.Namespace, load: Workload, results: Results) -> list[str]:
    runs, cfssl_run, multi = results.runs, results.runs[0], results.multi
    sample, checks, exported = load.sample, load.checks, load.exported
    revoked_in_sample, cfssl_load = load.revoked_in_sample, results.cfssl_load
    best = max((r for r in runs if r.name.startswith("chargepki")), key=lambda r: r.rate)
    return [
        "## Throughput and latency",
        "",
        f"wrk, {args.threads} thread, {args.connections} keep-alive connections, {args.warmup:.0f} s warm-up then "
        f"{args.duration:.0f} s measured per row; each request is a DER OCSPRequest (one SHA-1 CertID, no nonce) "
        f"rotating over {len(sample):,} distinct certificates of the data set ({revoked_in_sample} of them revoked); "
        "GET sends the same requests base64url-encoded in the path. The load generator shares the "
        f"{os.cpu_count()} cores with the servers. Before each run a sample of answers ({len(checks)} for chargepki "
        "and cfssl, 300 for openssl) was parsed and checked to be a successful response with the expected status.",
        "",
        f"- cfssl ocspserve (Go, all cores) serves the same {len(exported):,} responses chargepki pre-signed, "
        f"exported from its database as base64 DER lines (loading them took {cfssl_load:.1f} s); it keys them by "
        "serial only.",
        "- openssl ocsp reads an index.txt with the same serials and statuses but signs every answer live "
        "with its own throwaway software CA and delegated signer (EC P-256, made for the peer only). "
        "Without `-multi` it is one process answering one connection at a time"
        + (
            "; `-multi 2` forks two responder children."
            if multi
            else "; this OpenSSL has no `-multi`, so only the single process is measured."
        ),
        "- chargepki: `chargepki serve ocsp --workers 2` (granian, plain WSGI; or `--server gunicorn`, gthread "
        "2×8); answers come from the pre-signed store through each worker's cache (all "
        f"{len(sample):,} fit in its 50,000 entries after the warm-up).",
        "",
        *table(runs, cfssl_run),
        "",
        f"Target: at least 2× cfssl's throughput and p99 under 10 ms. Best chargepki row: "
        f"{best.rate / cfssl_run.rate:.2f}× cfssl, p99 {best.p99_ms:.2f} ms.",
        "",
    ]


def report_propagation(args: argparse.Namespace, results: Results) -> list[str]:
    one, two = results.one, results.two
    return [
        "## Revocation → `revoked` at the responders",
        "",
        f"{args.revocations} revocations per row, one at a time, through `ca.status.revocation.revoke` with a "
        "`Presigner` (what `chargepki revoke` calls: the revoked response is signed in the token and committed "
        "with the revocation). Before each, every connection asked for the certificate twice (so the good answer "
        "is cached in the workers); after the commit the bench polls with keep-alive POSTs on every connection "
        "until all of them have said revoked in 3 consecutive rounds. Which worker a connection lands on "
        "is the server's choice. Times are from the return of the committing call.",
        "",
        "| responders | revocations | first revoked: median ms | max ms | all connections: median ms | max ms | "
        "revoke call median ms | good after revoked |",
        "|---|---|---|---|---|---|---|---|",
        summary(one),
        summary(two),
        "",
        f"Max over both scenarios (every connection revoked): {max([*one.all_ms, *two.all_ms], default=0):.0f} ms.",
    ]


if __name__ == "__main__":
    sys.exit(main())
