"""Runs `chargepki serve est` / `serve ocsp` in a real process on loopback for the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ca.config import Config, EstSettings, Pkcs11Settings, write_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EstServer:
    home: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    scheme: str = "https"

    @property
    def url(self) -> str:
        return f"{self.scheme}://localhost:{self.port}/.well-known/est"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def write_home(home: Path, db_url: str, settings: Pkcs11Settings, est: EstSettings | None = None) -> Path:
    write_config(Config(home=home, database_url=db_url, pkcs11=settings, est=est or EstSettings()))
    return home


def start_server(
    home: Path,
    port: int,
    *,
    workers: int = 2,
    scheme: str = "https",
    service: str = "est",
    extra: tuple[str, ...] = (),
    process_group: bool = False,
    direct: bool = True,
    environ: dict[str, str] | None = None,
) -> EstServer:
    """``chargepki serve <service>`` in its own process, once its port accepts connections.

    ``process_group``: in a new session, so a test can kill the service with all its workers.
    ``direct``: without the front door (nginx), the application server itself on the port; the
    front door's own tests (tests/e2e/test_front_door.py) pass False. ``environ``: extra variables.
    """
    log = home / f"{service}-{port}.log"
    if log.exists():  # a restart on the same port keeps the earlier run's log
        log.rename(log.with_suffix(f".{time.monotonic_ns()}.log"))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPKI_")} | (environ or {})
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli.main import main; main()",
            "--home",
            str(home),
            "serve",
            service,
            "--port",
            str(port),
            "--workers",
            str(workers),
            *(("--direct",) if direct else ()),
            *extra,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=environment,
        cwd=Path(__file__).parent.parent,
        start_new_session=process_group,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve {service} exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return EstServer(home, port, process, log, scheme)
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"serve {service} did not start: {log.read_text()[-2000:]}")
