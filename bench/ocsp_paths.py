"""OCSP through each path, side by side: where the front door's throughput goes.

One data set (bench/ocsp.py's: certificates signed in the token, responses pre-signed), then, all
running at once and measured in turns (wrk, POST, the same requests), rounds × paths:

- ``cfssl ocspserve`` over the same pre-signed responses (the yardstick)
- ``chargepki serve ocsp --direct`` (granian, WSGI, 2 workers)
- ``chargepki serve ocsp`` (nginx → Unix socket → granian, 2 + 2 workers): the default front door
- copies of that nginx started by this script (same upstream socket): its configuration unchanged,
  and with one worker process
- a bounded responder (experiment, not shipped): the same WSGI app under granian's RSGI interface,
  reading the body with a whole-body deadline (408 after ``--body-seconds``), backpressure 4096

For each run: requests/s, p99, and the CPU time each process tree spent per request (from /proc),
which depends far less than requests/s on what else the machine runs. Also, per path, whether
200 slow bodies (a byte every 2 s) and 1,000 idle connections stop 5 legitimate requests, and
what a stalled body gets.

    .venv/bin/python bench/ocsp_paths.py [--certs 3000] [--rounds 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import io
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _bench_ocsp():
    spec = importlib.util.spec_from_file_location("bench_ocsp", ROOT / "bench" / "ocsp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ocsp"] = module
    spec.loader.exec_module(module)
    return module


# -- the bounded responder (experiment): `python bench/ocsp_paths.py --serve-bounded HOME PORT SECONDS` --
class Bounded:
    """RSGI: the body is awaited on granian's event loop under a deadline, so a slow body holds no
    thread; the WSGI app answers once the request is whole (on the loop: fine for cache hits, but an
    on-demand signature would block the worker's loop, one reason this is not shipped)."""

    def __init__(self, body_seconds: float) -> None:
        from ocsp.requests import MAX_REQUEST_BYTES
        from ocsp.wsgi import create_app

        self.app = create_app()
        self.limit = MAX_REQUEST_BYTES
        self.body_seconds = body_seconds

    async def __rsgi__(self, scope, protocol) -> None:  # type: ignore[no-untyped-def]
        headers = scope.headers
        environ = {
            "REQUEST_METHOD": scope.method,
            "PATH_INFO": scope.path,
            "QUERY_STRING": scope.query_string,
            "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": headers.get("content-length", ""),
        }
        if "if-none-match" in headers:
            environ["HTTP_IF_NONE_MATCH"] = headers.get("if-none-match")
        if scope.method == "POST":
            try:
                length = int(environ["CONTENT_LENGTH"])
            except ValueError:
                protocol.response_bytes(411, [("content-type", "text/plain")], b"Content-Length required\n")
                return
            if length > self.limit:
                protocol.response_bytes(413, [("content-type", "text/plain")], b"request body too large\n")
                return
            try:
                async with asyncio.timeout(self.body_seconds):
                    body = await protocol()
            except TimeoutError:
                headers_408 = [("content-type", "text/plain"), ("connection", "close")]
                protocol.response_bytes(408, headers_408, b"request body not received in time\n")
                return
            environ["wsgi.input"] = io.BytesIO(body)
        answer: dict[str, object] = {}

        def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: object = None) -> None:
            answer["status"], answer["headers"] = int(status.split(" ", 1)[0]), response_headers

        chunks = self.app(environ, start_response)
        protocol.response_bytes(answer["status"], answer["headers"], b"".join(chunks))


def _bounded_factory() -> Bounded:
    return Bounded(float(os.environ["BENCH_BODY_SECONDS"]))


def serve_bounded(home: str, port: int, body_seconds: float) -> None:
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    os.environ.update(CHARGEPKI_HOME=home, BENCH_BODY_SECONDS=str(body_seconds))
    sys.path.insert(0, str(ROOT / "bench"))
    Granian(
        "ocsp_paths:_bounded_factory",
        factory=True,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.RSGI,
        workers=2,
        websockets=False,
        backpressure=4096,
        log_access=False,
        http1_settings=HTTP1Settings(header_read_timeout=10_000, max_buffer_size=64 * 1024),
    ).serve()


# -- measuring --------------------------------------------------------------------------------------
def measure(b, script: Path, port: int, path: str, seconds: int, trees: dict[str, int]) -> dict[str, float]:
    pids = {name: b.descendants(pid) for name, pid in trees.items()}
    before = {name: b.cpu_seconds(p) for name, p in pids.items()}
    command = ["wrk", "-t", "1", "-c", "50", "-d", f"{seconds}s", "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    after = {name: b.cpu_seconds(p) for name, p in pids.items()}
    found = re.search(r"RESULT (.*)", output)
    assert found is not None, output
    requests, duration_us, _p50, p99, _worst, errors = (int(v) for v in found.group(1).split())
    result = {"rate": requests / (duration_us / 1e6), "p99": p99 / 1000, "errors": errors}
    for name in trees:
        result[f"cpu:{name}"] = 1e6 * (after[name] - before[name]) / max(requests, 1)
    return result


def attack(port: int, path: str, slow_bodies: int, idle: int) -> tuple[int, str]:
    """(legitimate answers out of 5 while slow bodies and idle connections are held, what a stalled body got)."""
    held = []
    for index in range(slow_bodies + idle):
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=(f"127.1.{index // 250}.{index % 250 + 1}", 0)
        )
        if index < slow_bodies:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n".encode()
                + b"Content-Length: 16000\r\n\r\n0"
            )
        held.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(2):
            for sock in held[:slow_bodies]:
                with contextlib.suppress(OSError):
                    sock.sendall(b"0")

    threading.Thread(target=trickle, daemon=True).start()
    served = 0
    for _ in range(5):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                served += sock.recv(100).startswith(b"HTTP/1.1 200")
        except OSError:
            pass
    stop.set()
    for sock in held:
        sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n".encode()
            + b"Content-Length: 100\r\n\r\n0"
        )
        try:
            got = sock.recv(200).split(b"\r\n", 1)[0].decode() or "connection closed, no answer"
        except ConnectionResetError:
            got = "connection reset, no answer"
        except TimeoutError:
            got = "nothing within 30 s"
    return served, got


def nginx_variant(b, processes, work: Path, home: Path, name: str, port: int, edits: list[tuple[str, str]]):
    """Another nginx from the front door's own configuration, on ``port``, to the same upstream socket."""
    source = (home / "run" / "nginx-ocsp" / "nginx.conf").read_text()
    workdir = work / f"nginx-{name}"
    (workdir / "tmp").mkdir(parents=True)
    text = source.replace(str(home / "run" / "nginx-ocsp"), str(workdir))
    text = re.sub(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{port};", text)
    for pattern, replacement in edits:
        text = re.sub(pattern, replacement, text)
    (workdir / "nginx.conf").write_text(text)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    command = [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")]
    process = processes.start([*command, "-g", "daemon off;"], workdir / "stdout.log")
    b.wait_for(port, process, workdir / "error.log")
    return process


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-bounded":
        serve_bounded(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--body-seconds", type=float, default=10, help="the bounded responder's body deadline")
    parser.add_argument("--no-attack", action="store_true")
    args = parser.parse_args()
    b = _bench_ocsp()
    processes = b.Processes()
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    work = Path(tempfile.mkdtemp(prefix="ocsp-paths-"))
    try:
        print(f"signing {args.certs} certificates …", file=sys.stderr)
        data = b.make_dataset(work, args.certs, None, [])
        exported = b.stored_responses(data)
        sample = random.Random(2).sample(data.serials, min(2000, len(data.serials)))
        records = b.write_records(
            work / "post.bin", [b.ocsp_request(data.issuer_name_hash, data.issuer_key_hash, s) for s in sample]
        )
        scripts = {}
        for path in ("/", "/ocsp"):
            script = work / f"wrk{len(scripts)}.lua"
            script.write_text(b.WRK_LUA.format(records=records, method="POST", path=path))
            scripts[path] = script
        (work / "cfssl").mkdir()
        (work / "cfssl" / "responses").write_text(
            "".join(base64.b64encode(der).decode() + "\n" for _, _, der in exported)
        )

        ports = {name: b.free_port() for name in ("cfssl", "direct", "nginx", "nginx-copy", "nginx-1worker", "bounded")}
        cfssl = processes.start(
            [
                "cfssl",
                "ocspserve",
                "-address",
                "127.0.0.1",
                "-port",
                str(ports["cfssl"]),
                "-responses",
                "responses",
                "-loglevel",
                "5",
            ],
            work / "cfssl.log",
            cwd=work / "cfssl",
        )
        b.wait_for(ports["cfssl"], cfssl, work / "cfssl.log")
        serve = b.chargepki_command(data.home, "serve", "ocsp", "--workers", "2")
        door = processes.start([*serve, "--port", str(ports["nginx"])], work / "door.log", env=data.environ)
        b.wait_for(ports["nginx"], door, work / "door.log")
        direct = processes.start(
            [*serve, "--port", str(ports["direct"]), "--direct"], work / "direct.log", env=data.environ
        )
        b.wait_for(ports["direct"], direct, work / "direct.log")
        bounded = processes.start(
            [
                sys.executable,
                __file__,
                "--serve-bounded",
                str(data.home),
                str(ports["bounded"]),
                str(args.body_seconds),
            ],
            work / "bounded.log",
            env=data.environ,
        )
        b.wait_for(ports["bounded"], bounded, work / "bounded.log")
        copy = nginx_variant(b, processes, work, data.home, "copy", ports["nginx-copy"], [])
        one = nginx_variant(
            b,
            processes,
            work,
            data.home,
            "1worker",
            ports["nginx-1worker"],
            [(r"worker_processes \d+;", "worker_processes 1;")],
        )
        responder = next(pid for pid in b.descendants(door.pid) if "--unix-socket" in b.cmdline(pid))
        door_nginx = next(pid for pid in b.descendants(door.pid) if b.cmdline(pid).startswith("nginx: master"))
        paths = {
            "cfssl ocspserve": (ports["cfssl"], "/", {"cfssl": cfssl.pid}),
            "granian --direct (WSGI)": (ports["direct"], "/ocsp", {"granian": direct.pid}),
            "nginx (copy of the front door's, same socket) → granian": (
                ports["nginx-copy"],
                "/ocsp",
                {"nginx": copy.pid, "granian": responder},
            ),
            "nginx (copy, 1 worker process) → granian": (
                ports["nginx-1worker"],
                "/ocsp",
                {"nginx": one.pid, "granian": responder},
            ),
            "nginx → granian (the front door `serve ocsp` runs)": (
                ports["nginx"],
                "/ocsp",
                {"nginx": door_nginx, "granian": responder},
            ),
            "bounded granian (RSGI, experiment)": (ports["bounded"], "/ocsp", {"granian": bounded.pid}),
        }
        for port, path, _ in paths.values():
            b.check_answers(
                port,
                path,
                [
                    (
                        b.ocsp_request(data.issuer_name_hash, data.issuer_key_hash, s),
                        "revoked" if s in data.revoked else "good",
                    )
                    for s in sample[:50]
                ],
            )
            subprocess.run(
                [
                    "wrk",
                    "-t",
                    "1",
                    "-c",
                    "50",
                    "-d",
                    "2s",
                    "-s",
                    str(scripts["/" if path == "/" else "/ocsp"]),
                    f"http://127.0.0.1:{port}{path}",
                ],
                capture_output=True,
                check=True,
            )
        results: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for round_ in range(args.rounds):
            for name, (port, path, trees) in paths.items():
                print(f"round {round_ + 1}: {name} …", file=sys.stderr)
                results[name].append(
                    measure(b, scripts["/" if path == "/" else "/ocsp"], port, path, args.duration, trees)
                )
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        lines = [
            f"Run {began}: `.venv/bin/python bench/ocsp_paths.py --certs {args.certs} --rounds {args.rounds} "
            f"--duration {args.duration}` on {platform.node()} ({os.cpu_count()} CPUs); load average before "
            f"{' '.join(load_before)}, after {' '.join(load_after)}.",
            "",
            "| path | req/s per round | median req/s (× cfssl) | p99 ms (median) | CPU µs per request (median) |",
            "|---|---|---|---|---|",
        ]
        import statistics

        cfssl_rates = [run["rate"] for run in results["cfssl ocspserve"]]
        cfssl_cpu = statistics.median(run["cpu:cfssl"] for run in results["cfssl ocspserve"])
        for name, runs in results.items():
            rates = [run["rate"] for run in runs]
            ratios = [rate / base for rate, base in zip(rates, cfssl_rates, strict=True)]
            cpus = {key[4:]: statistics.median(run[key] for run in runs) for key in runs[0] if key.startswith("cpu:")}
            cpu = " + ".join(f"{key} {value:.0f}" for key, value in cpus.items())
            total = sum(cpus.values())
            lines.append(
                f"| {name} | {', '.join(f'{r:,.0f}' for r in rates)} | {statistics.median(rates):,.0f} "
                f"({statistics.median(ratios):.2f}×) | {statistics.median(run['p99'] for run in runs):.1f} | "
                f"{cpu}{f' = {total:.0f}' if len(cpus) > 1 else ''} (cfssl/this: {cfssl_cpu / total:.2f}) |"
            )
        if not args.no_attack:
            lines += [
                "",
                "| path | legitimate answers while 200 slow bodies + 1,000 idle connections are held "
                "| a body that stalls gets |",
                "|---|---|---|",
            ]
            for name in (
                "nginx → granian (the front door `serve ocsp` runs)",
                "granian --direct (WSGI)",
                "bounded granian (RSGI, experiment)",
            ):
                port, path, _ = paths[name]
                print(f"attack: {name} …", file=sys.stderr)
                served, got = attack(port, path, 200, 1000)
                lines.append(f"| {name} | {served}/5 | {got} |")
        text = "\n".join(lines) + "\n"
        print(text)
        return 0
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
