"""Running OCSP: the on-demand signer + refresher (holds the token) and the keyless responder.

``chargepki serve ocsp`` starts the signer as a separate process (``chargepki ocsp signer``)
so that the responder process, and every worker it forks, never opens the token.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.util
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ca import audit
from ca.audit import checkpoints
from ca.authorities.rotation import retire_finished
from ca.config import PIN_ENV, Config
from ca.context import Pki
from ca.errors import ChargepkiError, ConfigError
from ca.frontdoor import (
    Nginx,
    Site,
    child_environment,
    die_with_parent,
    spawn,
    stop_child,
    supervise,
    upstream_socket,
    wait_until_listening,
)
from ca.work import Work
from metrics.instruments import record_core_events, watch_token
from metrics.listener import worker_exited
from ocsp.presign import Presigner, policy_from, refresh, rotate_signers
from ocsp.requests import MAX_REQUEST_BYTES
from ocsp.signer_service import OnDemandSigner, SignerServer
from ocsp.wsgi import signer_socket_path

log = logging.getLogger(__name__)
WORKERS_KILL_SECONDS = 10  # granian: how long a stopping worker may take before it is killed


def maintain(pki: Pki, presigner: Presigner, *, actor: str, now: datetime | None = None) -> tuple[int, int]:
    """One refresher pass: retire superseded CAs whose last certificate expired, rotate signers that
    are due, re-sign what is due, summarise the anonymous refusals of finished minutes and sign a
    checkpoint of the audit chain when it grew and one is due. (rotated, signed)."""
    now = now or datetime.now(UTC)
    settings = pki.config.ocsp
    with pki.store.session() as session:
        for authority in retire_finished(Work(session, actor, now=lambda: now)):
            log.info("[%s] CA %s retired: its last certificate has expired", authority.environment, authority.name)
        rotated = rotate_signers(
            session, presigner, actor=actor, now=now, validity=timedelta(days=settings.signer_validity_days)
        )
        signed = refresh(session, presigner, now)
        # Anonymous refusals of finished minutes into the chain, even when no request follows them.
        audit.flush_noise(session, before=now.replace(second=0, microsecond=0), now=lambda: now)
        session.commit()
        # A signed checkpoint of the audit chain when it has grown and the last one (by any process)
        # is at least [audit] checkpoint_interval_seconds old.
        every = timedelta(seconds=pki.config.audit.checkpoint_interval_seconds)
        checkpoints.periodic_checkpoint(session, pki.token(), pki.config.home, interval=every, now=lambda: now)
    return len(rotated), signed


def signer_alive(path: Path) -> bool:
    """Whether an on-demand signer already listens on ``path`` (several responders share one)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def run_signer(pki: Pki, *, stop: threading.Event | None = None) -> None:
    """Serve on-demand signatures on the socket and refresh stored responses until ``stop``."""
    stop = stop or threading.Event()
    record_core_events()  # token signatures into the OCSP service's metrics (serve ocsp's directory)
    watch_token(pki.config.pkcs11.token_label, pki.token)  # and the token's health (the responder has none)
    settings = pki.config.ocsp
    presigner = Presigner(pki.token(), policy_from(settings))
    path = signer_socket_path(pki.config)
    server = SignerServer(path, OnDemandSigner(pki.store, presigner, rate=settings.unknown_per_second))
    threading.Thread(target=server.serve_forever, name="ocsp-signer", daemon=True).start()
    log.info("on-demand OCSP signer listening on %s", path)
    try:
        while not stop.is_set():
            try:
                rotated, signed = maintain(pki, presigner, actor="system:ocsp-refresher")
                if rotated or signed:
                    log.info("OCSP refresher: %d signer(s) rotated, %d response(s) re-signed", rotated, signed)
            except (ChargepkiError, SQLAlchemyError) as exc:
                log.warning(
                    "OCSP refresher: %s; retrying in %ss", str(exc).splitlines()[0], settings.refresh_interval_seconds
                )
            pki.audit_token_health("system:ocsp-signer")  # the refresher's and the on-demand signer's token
            stop.wait(settings.refresh_interval_seconds)
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)


def wait_for_signer(path: Path, process_alive: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if signer_alive(path):
            return True
        if not process_alive():
            return False
        time.sleep(0.1)
    return False


def granian_worker_app() -> Any:
    """The app factory of granian's worker processes: each worker leaves the terminal's process group
    first, so Ctrl-C reaches only granian's main process, which stops the workers with SIGTERM. (A worker
    that got the terminal's SIGINT as well as its main's SIGTERM under load sometimes never finished
    its graceful stop, and the service hung.) A worker still dies with the main process."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    die_with_parent()
    # At the worker's exit (multiprocessing runs its finalizers, not atexit): its live gauges leave the
    # metrics' sums. A worker killed outright is swept by the listener instead (metrics/listener.py).
    multiprocessing.util.Finalize(None, worker_exited, args=(os.getpid(),), exitpriority=0)
    from ocsp.wsgi import create_app

    return create_app()


def serve_responder(
    config: Config,
    *,
    host: str,
    port: int,
    workers: int,
    server: str,
    signer: bool,
    unix_socket: Path | None = None,
) -> None:
    """Serve the keyless responder in the foreground (granian by default, gunicorn on request), on
    host:port or, behind the front door, on a Unix socket (0600)."""
    # The responder holds no key: neither it nor any worker it forks carries the PIN.
    for name in {config.pkcs11.pin_env, PIN_ENV}:
        os.environ.pop(name, None)
    os.environ["CHARGEPKI_HOME"] = str(config.home)
    os.environ["CHARGEPKI_OCSP_NO_SIGNER"] = "0" if signer else "1"
    timeout = config.ocsp.request_timeout_seconds
    if unix_socket is not None:
        unix_socket.unlink(missing_ok=True)  # left by a killed run
    # Size limits: bodies 16 KiB (ocsp/wsgi.py), request heads 64 KiB; time limits: see below.
    if server == "gunicorn":
        os.environ["CHARGEPKI_REQUEST_TIMEOUT"] = str(timeout)  # read by web.workers (per read/write)
        arguments = [
            sys.executable, "-m", "gunicorn",
            "--bind", f"unix:{unix_socket}" if unix_socket is not None else f"{host}:{port}",
            "--umask", "0o077",
            "--no-control-socket",  # EST's is the installation's one (web/server.py)
            "--workers", str(workers),
            "--worker-class", "web.workers.TimedThreadWorker",  # gthread + socket timeouts (by name: no import)
            "--threads", "8",
            "--keep-alive", "30",
            "--limit-request-line", "8190",
            "--limit-request-fields", "50",
            "--limit-request-field_size", "8190",
            "--config", "python:metrics.gunicorn_hooks",  # child_exit: a worker's live gauges leave the sums
            "ocsp.wsgi:create_app()",
        ]  # fmt: skip
        os.execv(sys.executable, arguments)
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    where: dict[str, Any] = (
        {"uds": unix_socket, "uds_permissions": 0o600} if unix_socket is not None else {"address": host, "port": port}
    )
    Granian(
        "ocsp.server:granian_worker_app",
        factory=True,
        **where,
        interface=Interfaces.WSGI,
        workers=workers,
        websockets=False,
        blocking_threads=4,  # the handler is short and mostly CPU: more threads only contend for the GIL
        backpressure=256,
        log_access=False,
        respawn_failed_workers=True,
        workers_kill_timeout=WORKERS_KILL_SECONDS,  # a worker that does not stop gracefully is killed
        # A client gets request_timeout_seconds to send its request head, which may not exceed 64 KiB.
        http1_settings=HTTP1Settings(header_read_timeout=timeout * 1000, max_buffer_size=64 * 1024),
    ).serve()


def serve_responder_front_door(
    config: Config,
    environ: dict[str, str],
    *,
    host: str,
    port: int,
    workers: int,
    server: str,
    signer: bool,
    alive: dict[str, Callable[[], bool]],
) -> None:
    """nginx on host:port (plain HTTP) → the responder on ``<home>/run/ocsp.sock``, until one stops.

    The responder runs as a child (``serve ocsp --direct --unix-socket``) without the PIN; nginx
    reads each request whole (16 KiB at most, within the body timeout) before the responder sees
    it, and caches nothing: every answer comes from the responder, so a revocation reaches clients
    as fast as it reaches the responder. ``alive``: other children to watch (the signer).
    """
    sock = upstream_socket(config, "ocsp")
    nginx = Nginx(config, Site("ocsp", host, port, sock, MAX_REQUEST_BYTES), environ)
    command = [sys.executable, "-m", "cli.main", "--home", str(config.home), "serve", "ocsp", "--direct"]
    command += ["--unix-socket", str(sock), "--workers", str(workers), "--server", server]
    if not signer:
        command.append("--no-signer")
    responder = spawn(command, child_environment(environ, config.pkcs11.pin_env))
    try:
        if not wait_until_listening(str(sock), lambda: responder.poll() is None, timeout=60):
            raise ConfigError(f"the OCSP responder did not start on {sock}")
        nginx.start()
        log.info("OCSP front door: nginx on %s:%s -> responder on %s", host, port, sock)
        stopped = supervise(
            {"responder": lambda: responder.poll() is None, "nginx": nginx.alive, **alive}, nginx.rotate_logs
        )
        raise ChargepkiError(f"the OCSP front door stopped: {stopped} exited")
    finally:
        nginx.stop()
        stop_child(responder)
