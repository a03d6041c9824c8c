"""Each service's metrics listener: bound by the service at start, served by a process or thread of its own.

``serve est`` and ``serve ocsp`` (``exporting``) empty the service's multiprocess directory
``<home>/run/metrics-<service>``, point their workers at it, bind ``[metrics] address`` and the
service's port, and hand the socket to a child process (``python -m metrics.exporter``) that sums
the workers' files and adds the store-derived values. ``crl publish --watch`` (one process) serves
its own values from a thread (``serve_in_thread``). Either way a scrape is answered by a thread of
the listener (one per connection, each with a time limit), never by a request worker, so a slow or
stalled scraper holds nothing but that thread. The listener is not behind the front door.

A port that cannot be bound is reported on stderr and the service runs without metrics: a second
installation on the host, or a test, must not stop a CA from serving.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from ca.config import Config, MetricsSettings
from ca.frontdoor import child_environment, die_with_parent, run_dir
from ca.keys.pkcs11_token import Token
from ca.store.engine import Store
from metrics.instruments import MULTIPROC_ENV, configure, instruments, record_core_events, watch_token
from metrics.store import StoreCollector

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 10.0  # seconds a scraper may take per read or write before its connection is closed


def multiprocess_dir(config: Config, service: str) -> Path:
    return run_dir(config) / f"metrics-{service}"


def prepare_directory(path: Path) -> Path:
    """The service's multiprocess directory, emptied (values of an earlier run are not this run's), 0700."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    return path


def bind(settings: MetricsSettings, service: str) -> socket.socket | None:
    """The listening socket of ``service``'s listener, or None (with a message) when it cannot be bound."""
    address, port = settings.address, settings.port(service)
    try:
        family, _, _, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        print(
            f"metrics: cannot listen on {address}:{port} ({exc.strerror or exc}); {service} runs without metrics",
            file=sys.stderr,
            flush=True,
        )
        return None
    return sock


class _Handler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT  # per socket operation: a stalled scraper loses its connection, nothing else

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # one thread per connection; none outlives the process


def serve_in_thread(sock: socket.socket, registry: CollectorRegistry) -> _Server:
    """Serve ``registry`` on an already listening socket from a daemon thread (and one per connection)."""
    server = _Server(sock.getsockname()[:2], _Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    host, port = sock.getsockname()[:2]
    server.server_name, server.server_port = host, port
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics-listener", daemon=True).start()
    return server


class Workers(Collector):
    """The multiprocess directory's values, summed over every process that wrote there. Processes that
    are gone (a worker killed without its server's exit hook) get ``mark_process_dead`` first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files = MultiProcessCollector(None, path=str(directory))

    def collect(self) -> Any:
        sweep_dead(self.directory)
        return self._files.collect()


def sweep_dead(directory: Path) -> None:
    for path in glob.glob(str(directory / "gauge_live*_*.db")):
        try:
            pid = int(Path(path).stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if not _alive(pid):
            mark_process_dead(pid, str(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_exited(pid: int) -> None:
    """A worker of this service stopped: its live gauges (requests in flight) leave the sums."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        with contextlib.suppress(OSError):
            mark_process_dead(pid, directory)


@contextlib.contextmanager
def exporting(config: Config, service: str, environ: Mapping[str, str]) -> Iterator[Path | None]:
    """While the block runs, ``service`` (``est``, ``ocsp``) records into its emptied multiprocess
    directory and a listener process serves it; yields the directory (None: metrics off).

    The directory is set for this process and every child started inside the block. The listener
    gets an environment without the PIN: it signs nothing and opens no token.
    """
    settings = config.metrics
    sock = bind(settings, service) if settings.enabled else None
    if sock is None:
        # Off, or another process has the port: perhaps a second `serve ocsp` of this home, whose
        # directory is then not ours to empty. The workers count in memory, unserved.
        configure(None)
        yield None
        return
    directory = prepare_directory(multiprocess_dir(config, service))  # the port is ours: so is the directory
    configure(directory)
    environment = child_environment({**environ, MULTIPROC_ENV: str(directory)}, config.pkcs11.pin_env)
    command = [sys.executable, "-m", "metrics.exporter", "--home", str(config.home), "--service", service]
    command += ["--fd", str(sock.fileno())]
    process = subprocess.Popen(
        command, env=environment, stdin=subprocess.DEVNULL, pass_fds=(sock.fileno(),), preexec_fn=die_with_parent
    )
    sock.close()  # the listener's now
    log.info("metrics of %s on http://%s:%s/metrics", service, settings.address, settings.port(service))
    try:
        yield directory
    finally:
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
                process.wait(5)


def serve_publisher(config: Config, directory: Path, token: Callable[[], Token]) -> _Server | None:
    """``crl publish --watch``'s listener, a thread of the publisher: its token signatures and token
    checks (in this process's memory) and the published CRLs of ``directory``. None: metrics off."""
    settings = config.metrics
    if not settings.enabled:
        return None
    configure(None)
    record_core_events()
    sock = bind(settings, "crl")
    if sock is None:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(instruments().signing)
    registry.register(instruments().token_up)
    watch_token(config.pkcs11.token_label, token)
    store = Store(config.database_url, read_only=True, settings=config.database)
    registry.register(StoreCollector("crl", store, cache_seconds=settings.cache_seconds, publication_dir=directory))
    log.info("metrics of crl on http://%s:%s/metrics", settings.address, settings.port("crl"))
    return serve_in_thread(sock, registry)
