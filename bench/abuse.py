"""Abuse benchmark: legitimate enrollments and OCSP requests while idle, slow-header and slow-body
clients hold EST and OCSP, with the front door (nginx) and in the direct mode.

For each mode, one fresh embedded installation's `serve est` and `serve ocsp` (default settings,
ports changed) are measured twice: quiet, then while the attack holds both services. The attack,
per service: ``--idle`` connections that send nothing, ``--slow-headers`` that send a request
head one header line every 5 s and ``--slow-bodies`` that send a complete head with
``Content-Length: 16000`` and then one body byte every 3 s, from source addresses spread over
127.0.0.0/8 (so per-address limits do not simply refuse them). EST's slow clients complete the
TLS handshake first. Legitimate clients (from 127.0.0.1, one after another, a new connection
each): ``--enrollments`` EST simpleenrolls with one-time secrets and ``--ocsp`` OCSP POSTs.
A request counts as failed on any error or after ``--timeout`` seconds; each phase stops after
``--phase-seconds`` (requests not attempted by then are reported as such).

    .venv/bin/python bench/abuse.py [--idle 1000 --slow-headers 200 --slow-bodies 200]
        [--enrollments 50 --ocsp 500] [--modes nginx,direct] [--out bench/results-abuse.md]

Not a test: it prints and writes a Markdown report.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import os
import platform
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import chargepki_command as chargepki  # noqa: E402
from bench.harness import free_port, wait_for  # noqa: E402
from ca.config import load_config, write_config  # noqa: E402
from ca.context import Pki  # noqa: E402
from ca.registry.devices import add_device  # noqa: E402
from ca.registry.secrets import issue_secret  # noqa: E402
from ca.work import Work  # noqa: E402

ORG = "Abuse Bench CPO"


@dataclass
class Phase:
    name: str
    attempted: int = 0
    ok: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    not_attempted: int = 0

    def row(self, what: str) -> str:
        if not self.latencies:
            p50 = p99 = "—"
        else:
            ordered = sorted(self.latencies)
            p50 = f"{statistics.median(ordered) * 1000:.1f} ms"
            p99 = f"{ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000:.1f} ms"
        rate = f"{100 * self.ok / self.attempted:.1f} %" if self.attempted else "—"
        skipped = f" ({self.not_attempted} not attempted)" if self.not_attempted else ""
        return f"| {self.name} | {what} | {self.ok}/{self.attempted}{skipped} | {rate} | {p50} | {p99} |"


class Attack:
    """Idle, slow-header and slow-body connections against one service, kept trickling by one thread."""

    def __init__(self, port: int, tls: ssl.SSLContext | None, path: str, first_octet: int) -> None:
        self.port, self.tls, self.path, self.first_octet = port, tls, path, first_octet
        self.sockets: list[socket.socket] = []
        self.headers: list[socket.socket] = []
        self.bodies: list[socket.socket] = []
        self.failed = 0
        self._count = 0
        self._lock = threading.Lock()

    def _source(self) -> str:
        self._count += 1
        n = self._count
        return f"127.{self.first_octet}.{(n // 250) % 250 + 1}.{n % 250 + 1}"

    def _connect(self, handshake: bool, source: str | None = None) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((source or self._source(), 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", self.port))
            if handshake and self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname="localhost")
            sock.settimeout(0.5)
            return sock
        except OSError:
            sock.close()
            with self._lock:
                self.failed += 1
            return None

    def open(self, idle: int, slow_headers: int, slow_bodies: int) -> None:
        """Open the attack connections, 100 at a time (a server that is already held makes each
        TLS handshake wait for its timeout, which must not make the set-up take hours)."""
        for _ in range(idle):
            sock = self._connect(handshake=False)
            if sock is not None:
                self.sockets.append(sock)
        sources = [self._source() for _ in range(slow_headers + slow_bodies)]
        with ThreadPoolExecutor(100) as pool:
            opened = list(pool.map(lambda source: self._connect(handshake=True, source=source), sources))
        for index, sock in enumerate(opened):
            if sock is None:
                continue
            try:
                if index < slow_headers:
                    sock.sendall(f"POST {self.path} HTTP/1.1\r\nHost: localhost\r\n".encode())
                    self.headers.append(sock)
                else:
                    head = f"POST {self.path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 16000\r\n"
                    sock.sendall(head.encode() + b"Content-Type: application/ocsp-request\r\n\r\n")
                    self.bodies.append(sock)
                self.sockets.append(sock)
            except OSError:
                self.failed += 1
                sock.close()

    def trickle(self, stop: threading.Event) -> None:
        tick = 0
        while not stop.wait(1.0):
            tick += 1
            batches = []
            if tick % 5 == 0:
                batches.append((self.headers, b"X-Slow: 1\r\n"))
            if tick % 3 == 0:
                batches.append((self.bodies, b"0"))
            for group, data in batches:
                for sock in group:
                    with contextlib.suppress(OSError):
                        sock.sendall(data)

    def held(self) -> int:
        return len(self.sockets)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@dataclass
class Installation:
    home: Path
    est_port: int
    ocsp_port: int
    root: Path
    issuing: x509.Certificate
    secrets: list[tuple[str, str]]
    certificates: list[x509.Certificate] = field(default_factory=list)


def install(work: Path, mode: str, devices: int) -> Installation:
    home = work / f"home-{mode}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CHARGEPKI_", "SOFTHSM2"))}
    setup_env = {**environ, "CHARGEPKI_ORG": ORG}
    subprocess.run(chargepki(home, "run", "--setup-only"), check=True, capture_output=True, env=setup_env, cwd=ROOT)
    config = load_config(home, environ)
    est_port, ocsp_port = free_port(), free_port()
    write_config(replace(config, est=replace(config.est, port=est_port), ocsp=replace(config.ocsp, port=ocsp_port)))
    chain = subprocess.run(chargepki(home, "ca", "chain"), check=True, capture_output=True, text=True, cwd=ROOT).stdout
    parts = [
        part + "-----END CERTIFICATE-----\n" for part in chain.split("-----END CERTIFICATE-----\n") if part.strip()
    ]
    root = work / f"root-{mode}.pem"
    root.write_text(parts[1])
    pki = Pki.open(home, environ)
    secrets = []
    with pki.store.session() as session:
        for index in range(devices):
            serial = f"CP-ABUSE-{mode}-{index:05d}"
            device = add_device(Work(session, "bench:abuse"), serial=serial)
            secrets.append((serial, issue_secret(Work(session, "bench:abuse"), device=device)))
    pki.close()
    return Installation(home, est_port, ocsp_port, root, x509.load_pem_x509_certificate(parts[0].encode()), secrets)


def enroll_once(inst: Installation, serial: str, secret: str, timeout: float) -> x509.Certificate | None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, serial)]
            )
        )
        .sign(key, hashes.SHA256())
    )
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
    response = requests.post(
        f"https://localhost:{inst.est_port}/.well-known/est/simpleenroll",
        data=body,
        headers={"Content-Type": "application/pkcs10", "Connection": "close"},
        auth=(serial, secret),
        verify=str(inst.root),
        timeout=timeout,
    )
    if response.status_code != 200:
        return None
    from cryptography.hazmat.primitives.serialization import pkcs7

    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))[0]


def ocsp_once(inst: Installation, der: bytes, timeout: float) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", inst.ocsp_port, timeout=timeout)
    try:
        connection.request("POST", "/ocsp", body=der, headers={"Content-Type": "application/ocsp-request"})
        response = connection.getresponse()
        data = response.read()
        return response.status == 200 and ocsp.load_der_ocsp_response(data).response_status.name == "SUCCESSFUL"
    finally:
        connection.close()


def measure(inst: Installation, label: str, args: argparse.Namespace) -> tuple[Phase, Phase]:
    enroll_phase, ocsp_phase = Phase(label), Phase(label)
    deadline = time.monotonic() + args.phase_seconds
    for _ in range(args.enrollments):
        if time.monotonic() > deadline or not inst.secrets:
            enroll_phase.not_attempted += 1
            continue
        serial, secret = inst.secrets.pop()
        enroll_phase.attempted += 1
        started = time.perf_counter()
        try:
            certificate = enroll_once(inst, serial, secret, args.timeout)
        except (requests.RequestException, OSError, ValueError):
            certificate = None
        if certificate is not None:
            enroll_phase.ok += 1
            enroll_phase.latencies.append(time.perf_counter() - started)
            inst.certificates.append(certificate)
    requests_der = [
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, inst.issuing, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
        for certificate in inst.certificates[-50:]
    ]
    deadline = time.monotonic() + args.phase_seconds
    for _ in range(args.ocsp):
        if time.monotonic() > deadline or not requests_der:
            ocsp_phase.not_attempted += 1
            continue
        ocsp_phase.attempted += 1
        started = time.perf_counter()
        try:
            good = ocsp_once(inst, random.choice(requests_der), args.timeout)
        except (OSError, ValueError, http.client.HTTPException):
            good = False
        if good:
            ocsp_phase.ok += 1
            ocsp_phase.latencies.append(time.perf_counter() - started)
    return enroll_phase, ocsp_phase


def run_mode(work: Path, mode: str, args: argparse.Namespace, lines: list[str]) -> None:
    inst = install(work, mode, args.enrollments * 2 + 10)
    extra = ["--direct"] if mode == "direct" else []
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CHARGEPKI_", "SOFTHSM2"))}
    processes = []
    try:
        for service, port in (("est", inst.est_port), ("ocsp", inst.ocsp_port)):
            log = work / f"{mode}-{service}.log"
            process = subprocess.Popen(
                chargepki(inst.home, "serve", service, *extra),
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=ROOT,
                start_new_session=True,
            )
            processes.append(process)
            wait_for(port, process, log)
        time.sleep(2)
        # warm-up: one enrollment (fills the worker's caches), not counted
        serial, secret = inst.secrets.pop()
        first = enroll_once(inst, serial, secret, 30)
        assert first is not None, "the warm-up enrollment failed"
        inst.certificates.append(first)
        quiet = measure(inst, f"{mode}, quiet", args)
        print(f"[{mode}] quiet: {quiet[0].row('enroll')} {quiet[1].row('ocsp')}", file=sys.stderr)
        tls = ssl.create_default_context(cafile=str(inst.root))
        attacks = [
            Attack(inst.est_port, tls, "/.well-known/est/simpleenroll", 10),
            Attack(inst.ocsp_port, None, "/ocsp", 20),
        ]
        stop = threading.Event()
        opened = time.monotonic()
        for attack in attacks:
            attack.open(args.idle, args.slow_headers, args.slow_bodies)
        threads = [threading.Thread(target=a.trickle, args=(stop,), daemon=True) for a in attacks]
        for thread in threads:
            thread.start()
        held = [a.held() for a in attacks]
        failed = [a.failed for a in attacks]
        print(
            f"[{mode}] attack: held {held} (failed to open {failed}) in {time.monotonic() - opened:.0f} s",
            file=sys.stderr,
        )
        try:
            attacked = measure(inst, f"{mode}, under attack", args)
        finally:
            stop.set()
            for attack in attacks:
                attack.close()
        print(f"[{mode}] attack: {attacked[0].row('enroll')} {attacked[1].row('ocsp')}", file=sys.stderr)
        lines.append(quiet[0].row("enrollment"))
        lines.append(quiet[1].row("OCSP POST"))
        lines.append(attacked[0].row("enrollment"))
        lines.append(attacked[1].row("OCSP POST"))
        lines.append(
            f"| {mode} | attack connections held open at the start (EST, OCSP) | {held[0]}, {held[1]} "
            f"(could not open: {failed[0]}, {failed[1]}) | | | |"
        )
        if shutil.which("wrk"):
            lines.append(throughput(work, inst, mode, args))
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


WRK_LUA = """
local f = assert(io.open("{body}", "rb")); local body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.body = body; wrk.headers["Content-Type"] = "application/ocsp-request"
function done(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.status + summary.errors.timeout))
end
"""


def throughput(work: Path, inst: Installation, mode: str, args: argparse.Namespace) -> str:
    """OCSP POST throughput without attack (wrk, 50 connections, keep-alive), for the speed comparison."""
    body = work / f"ocsp-{mode}.der"
    body.write_bytes(
        ocsp.OCSPRequestBuilder()
        .add_certificate(inst.certificates[0], inst.issuing, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    script = work / f"wrk-{mode}.lua"
    script.write_text(WRK_LUA.format(body=body))
    url = f"http://127.0.0.1:{inst.ocsp_port}/ocsp"
    command = ["wrk", "-t", "1", "-c", "50", "-d", f"{args.wrk_seconds}s", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    count, duration_us, p99_us, errors = (int(value) for value in line.split()[1:])
    rate = count / (duration_us / 1e6)
    return (
        f"| {mode} | OCSP POST throughput, quiet (wrk -c 50, {args.wrk_seconds} s) | {count} requests, "
        f"{errors} errors | {rate:,.0f} req/s | | {p99_us / 1000:.1f} ms |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow-headers", type=int, default=200)
    parser.add_argument("--slow-bodies", type=int, default=200)
    parser.add_argument("--enrollments", type=int, default=50)
    parser.add_argument("--ocsp", type=int, default=500)
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds before a legitimate request counts as failed"
    )
    parser.add_argument("--phase-seconds", type=float, default=90.0, help="cap per measured phase")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--modes", default="nginx,direct")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-abuse.md")
    args = parser.parse_args()
    began = time.perf_counter()
    lines = [
        "| mode, phase | what | succeeded | success rate | p50 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    work = Path(tempfile.mkdtemp(prefix="chargepki-abuse-"))
    try:
        for mode in args.modes.split(","):
            run_mode(work, mode, args, lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "make bench-abuse" + (f" BENCH_ABUSE_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else "")
    report = [
        "# Abuse benchmark (`bench/abuse.py`)",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: `{command}` on {platform.node()} "
        f"({os.cpu_count()} CPUs, {platform.platform()}), {time.perf_counter() - began:.0f} s in all.",
        "",
        f"Attack per service: {args.idle} idle, {args.slow_headers} slow-header (a line every 5 s), "
        f"{args.slow_bodies} slow-body (a byte every 3 s) connections from 127.x.y.z addresses; legitimate "
        f"clients one after another from 127.0.0.1, a new connection each, {args.timeout:g} s timeout, "
        f"{args.phase_seconds:g} s cap per phase. Default settings of a fresh `chargepki run` home.",
        "",
        *lines,
    ]
    text = "\n".join(report) + "\n"
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
