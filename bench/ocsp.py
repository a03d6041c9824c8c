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
import socket
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
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

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
class Processes:
    """Every server this run starts, each in its own process group, so a whole tree is stopped by its group id."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, command: Sequence[str], log: Path, cwd: Path = ROOT, env: dict[str, str] | None = None):
        process = subprocess.Popen(
            list(command), cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, process_group=0
        )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with suppress(ProcessLookupError):  # workers left behind by a parent that died first
            os.killpg(process.pid, signal.SIGKILL)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in list(reversed(self.running)):
            self.stop(process)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-1500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start: {log.read_text(errors='replace')[-1500:]}")


def wait_for_line(log: Path, process: subprocess.Popen[bytes], marker: str, timeout: float = 60) -> None:
    """For openssl ocsp: a probe connection closed without a request stalls its responder (3.0.x)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if marker in text:
            return
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {text[-1500:]}")
        time.sleep(0.1)
    raise RuntimeError(f"server did not start: {log.read_text(errors='replace')[-1500:]}")


def descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
    return found


def rss_mb(pid: int) -> float:
    with suppress(OSError), open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cmdline(pid: int) -> str:
    with suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with suppress(OSError, IndexError, ValueError), open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


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
        return Memory([rss_mb(pid) for pid in pids], {})
    workers, others = [], {}
    for pid in pids:
        line = cmdline(pid)
        if "ocsp signer" in line:
            others["on-demand signer"] = rss_mb(pid)
        elif pid == root_pid:
            others["main"] = rss_mb(pid)
        else:
            workers.append(rss_mb(pid))
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


def chargepki_command(home: Path, *arguments: str) -> list[str]:
    return [sys.executable, "-c", "from cli.main import main; main()", "--home", str(home), *arguments]


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
def machine() -> str:
    model = "unknown CPU"
    with suppress(OSError), open("/proc/cpuinfo") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    with open("/proc/meminfo") as handle:
        total = int(handle.readline().split()[1]) // 1024
    return f"{os.cpu_count()} CPUs ({model}), {total} MB RAM, {platform.system()} {platform.release()}"


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


def benchmark(work: Path, args: argparse.Namespace, processes: Processes) -> list[str]:
    database = "PostgreSQL" if args.database_url and args.database_url.startswith("postgres") else "SQLite"
    print(f"signing {args.certs} certificates in the token ({database}) …", file=sys.stderr)
    data = make_dataset(work, args.certs, args.database_url, [int(n) for n in args.refresh_stages.split(",") if n])
    exported = stored_responses(data)
    assert len(exported) == args.certs, f"{len(exported)} pre-signed responses for {args.certs} certificates"
    by_serial = {int(serial, 16): status for serial, status, _ in exported}
    assert all((by_serial[s] == "revoked") == (s in data.revoked) for s in data.serials)

    rng = random.Random(2)
    sample = rng.sample(data.serials, min(args.distinct, len(data.serials)))
    revoked_in_sample = sum(1 for s in sample if s in data.revoked)
    requests = [ocsp_request(data.issuer_name_hash, data.issuer_key_hash, s) for s in sample]
    post_records = write_records(work / "post.bin", requests)
    get_records = write_records(work / "get.bin", [base64.urlsafe_b64encode(der).rstrip(b"=") for der in requests])
    expected = ["revoked" if s in data.revoked else "good" for s in sample]
    checks = list(zip(requests, expected, strict=True))[:300] + [
        (der, status) for der, status in zip(requests, expected, strict=True) if status == "revoked"
    ]

    runs: list[Run] = []
    # cfssl ocspserve over the very responses chargepki pre-signed (base64 DER, one per line).
    cfssl_dir = work / "cfssl"
    cfssl_dir.mkdir()
    (cfssl_dir / "responses").write_text("".join(base64.b64encode(der).decode() + "\n" for _, _, der in exported))
    port = free_port()
    log = cfssl_dir / "serve.log"
    started = time.perf_counter()
    process = processes.start(
        [
            "cfssl",
            "ocspserve",
            "-address",
            "127.0.0.1",
            "-port",
            str(port),
            "-responses",
            "responses",
            "-loglevel",
            "5",
        ],
        log,
        cwd=cfssl_dir,
    )
    wait_for(port, process, log)
    cfssl_load = time.perf_counter() - started
    check_answers(port, "/", checks)
    print("cfssl ocspserve …", file=sys.stderr)
    runs.append(
        wrk(
            work, "cfssl ocspserve (pre-signed file), POST", "/", port, post_records, "POST", args, process.pid, "cfssl"
        )
    )
    processes.stop(process)

    # openssl ocsp: its own CA and signer, the same serials and statuses, signs every answer.
    peer, name_hash, key_hash = openssl_peer(work / "openssl", data)
    openssl_requests = [ocsp_request(name_hash, key_hash, s) for s in sample]
    openssl_records = write_records(work / "openssl.bin", openssl_requests)
    openssl_checks = [
        (ocsp_request(name_hash, key_hash, s), "revoked" if s in data.revoked else "good") for s in sample[:300]
    ]
    multi = openssl_multi()
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

        check_answers_at = start_openssl()
        check_answers(port, "/", openssl_checks)
        label = "1 process" if children == 1 else f"-multi {children} (child processes)"
        print(f"openssl ocsp {label} …", file=sys.stderr)
        runs.append(
            wrk(
                work,
                f"openssl ocsp, {label}, POST",
                "/",
                port,
                openssl_records,
                "POST",
                args,
                check_answers_at,
                "openssl",
                restart=start_openssl,
            )
        )
        for process in current:
            processes.stop(process)

    # chargepki: granian (POST, GET), gunicorn (POST); 2 workers each.
    for server, method, records in (
        ("granian", "POST", post_records),
        ("granian", "GET", get_records),
        ("gunicorn", "POST", post_records),
    ):
        port = free_port()
        process = start_chargepki(processes, data, work, port, server, f"{server}-{method}")
        check_answers(port, "/ocsp", checks)
        url_path = "/ocsp" if method == "POST" else "/ocsp/"
        print(f"chargepki {server} {method} …", file=sys.stderr)
        runs.append(
            wrk(
                work,
                f"chargepki serve ocsp, {server}, 2 workers, {method}",
                url_path,
                port,
                records,
                method,
                args,
                process.pid,
                "chargepki",
            )
        )
        processes.stop(process)

    # Revocation → revoked: one responder process (2 workers), then two processes sharing one signer.
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

    big_lines: list[str] = []
    if args.big > args.certs:
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
        big_run = wrk(
            work,
            f"chargepki serve ocsp, granian, 2 workers, POST, {args.big:,} rows",
            "/ocsp",
            port,
            big_records,
            "POST",
            args,
            process.pid,
            "chargepki",
        )
        processes.stop(process)
        size = sum(p.stat().st_size for p in data.home.glob("chargepki.db*"))
        big_lines = [
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
            *table([big_run], runs[0]),
        ]

    timings = data.timings
    cfssl_run = runs[0]
    best = max((r for r in runs if r.name.startswith("chargepki")), key=lambda r: r.rate)
    lines = [
        "# OCSP responder benchmark",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}; {versions()}.",
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
        f"Max over both scenarios (every connection revoked): {max(max(one.all_ms), max(two.all_ms)):.0f} ms.",
        *big_lines,
        "",
        "Reproduce: `make bench-ocsp` (or `.venv/bin/python bench/ocsp.py --certs N --duration S "
        "--connections C --big M`).",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
