"""The front door: Debian's nginx in front of EST + the CSMS API and in front of OCSP.

gunicorn's threaded workers and the OCSP responder's blocking threads must not face clients
directly: a client that sends its request slowly, or just keeps a connection open, holds a
thread. nginx holds such connections in its event loop instead, reads each request whole
(bounded in time and size) before the application sees it, buffers the answer, and limits
connections and requests per client address. The application servers listen on Unix sockets in
``<home>/run`` (0700), which only processes of the installation's owner can reach, and the proxy
passes the verified TLS client certificate in :data:`CLIENT_CERT_HEADER`, a header it always sets
itself (a client's own copy is dropped), with the client's address in ``X-Forwarded-For``.

This module renders the configuration from the installation's settings and runs nginx as a
child process (:class:`Nginx`); ``web/server.py`` and ``ocsp/server.py`` wire it to their
services. It holds no secret: nginx gets an environment without the PIN.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ca.config import Config, FrontDoorSettings
from ca.errors import ConfigError

CLIENT_CERT_HEADER = "X-Chargepki-Client-Cert"  # set by the proxy only: URL-encoded PEM of a verified certificate
TRUSTED_UNIX = "unix"  # an est.trusted_proxies entry: the peers of the service's Unix socket (the proxy)
_SEARCH = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tls:
    certificate: Path  # chain without the root
    key: Path
    client_cas: Path | None  # ask for client certificates and verify them against this bundle


@dataclass(frozen=True)
class Site:
    """One service behind nginx: where clients connect, where the application listens."""

    service: str  # est | ocsp
    host: str
    port: int
    upstream: Path  # the application server's Unix socket
    max_body: int  # bytes; 413 beyond
    tls: Tls | None = None


@dataclass(frozen=True)
class Account:
    """The unprivileged account nginx's worker processes run as (its master keeps root to bind ports)."""

    user: str
    group: str
    uid: int
    gid: int


def _can_enter(account: Account, directory: Path) -> bool:
    info = directory.stat()
    if info.st_uid == account.uid:
        return bool(info.st_mode & 0o100)
    groups = {account.gid} | {g.gr_gid for g in grp.getgrall() if account.user in g.gr_mem}
    if info.st_gid in groups:
        return bool(info.st_mode & 0o010)
    return bool(info.st_mode & 0o001)


def blocking_ancestor(account: Account, home: Path) -> Path | None:
    """The first directory above the home that ``account`` may not enter (then it cannot reach the sockets)."""
    for directory in reversed(home.parents):
        if not _can_enter(account, directory):
            return directory
    return None


def worker_account(settings: FrontDoorSettings, home: Path) -> Account | None:
    """When chargepki runs as root: ``front_door.user``, else the home's owner unless that is root, else
    ``nobody``. ``None`` when not root: the workers then run as the calling user, who owns everything.

    Also ``None`` (workers as root, with a warning) when an unset ``front_door.user`` would give an
    account that cannot enter a directory above the home (e.g. a home under ``/root``)."""
    if os.geteuid() != 0:
        return None
    name = settings.user
    if not name:
        owner = home.stat().st_uid
        name = pwd.getpwuid(owner).pw_name if owner != 0 else "nobody"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"front_door.user: no account {name!r} on this host") from None
    if entry.pw_uid == 0:
        return None  # asked for, or the home's owner: workers as root (`user root`)
    account = Account(name, grp.getgrgid(entry.pw_gid).gr_name, entry.pw_uid, entry.pw_gid)
    blocked = blocking_ancestor(account, home)
    if blocked is not None:
        if settings.user:
            raise ConfigError(f"front_door.user {name!r} cannot enter {blocked}, so not reach the sockets in {home}")
        log.warning(
            "front door: nginx's workers run as root: %s cannot enter %s (set front_door.user to an account "
            "that can reach %s, or move the home)",
            name,
            blocked,
            home,
        )
        return None
    return account


def open_path_for(account: Account, home: Path, directories: tuple[Path, ...]) -> None:
    """Let ``account`` reach the application sockets and nginx's temporary files: the home and the given
    directories under it become 0710 with the account's group (enter, never list; every file in them
    stays 0600 and every other directory 0700). Nothing changes when the account owns the home."""
    if home.stat().st_uid == account.uid:
        return
    for directory in (home, *directories):
        os.chown(directory, -1, account.gid)
        directory.chmod(0o710)


def admit(account: Account | None, path: Path) -> None:
    """Hand an application server's Unix socket (0600) to nginx's worker account: only it (and root) may
    connect, so the headers the proxy sets still come only from the proxy."""
    if account is not None:
        os.chown(path, account.uid, account.gid)
        path.chmod(0o600)


def run_dir(config: Config) -> Path:
    path = config.home / "run"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def upstream_socket(config: Config, service: str) -> Path:
    """The application server's Unix socket behind the proxy (one per service and installation)."""
    return run_dir(config) / f"{service}.sock"


def find_nginx(configured: str) -> str:
    """The nginx binary: a path, or a name in PATH or the sbin directories (Debian's is /usr/sbin/nginx)."""
    if os.sep in configured:
        if os.access(configured, os.X_OK):
            return configured
    else:
        found = shutil.which(configured) or shutil.which(configured, path=os.pathsep.join(_SEARCH))
        if found:
            return found
    raise ConfigError(
        f"nginx not found ({configured!r}): install Debian's nginx-light (`make setup` does), set "
        'front_door.nginx to its path, or run without the front door (front_door.mode = "direct")'
    )


def _listen_address(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _request_headers(site: Site, client_cert: str) -> str:
    """What the application server is told about a request besides its method, path and body.

    The OCSP responder reads only the media type and ``If-None-Match``: nothing else a client
    sends reaches it (a smaller environ per request, measured in bench/ocsp_paths.py, and less
    client-chosen input). EST and the API get every header, the client's address and scheme, and
    the verified client certificate."""
    if site.service == "ocsp":
        return (
            "            proxy_pass_request_headers off;\n"
            "            proxy_set_header Host $http_host;\n"
            "            proxy_set_header Content-Type $content_type;\n"
            "            proxy_set_header If-None-Match $http_if_none_match;\n"
        )
    return (
        "            proxy_set_header Host $http_host;\n"
        "            proxy_set_header X-Forwarded-For $remote_addr;\n"
        "            proxy_set_header X-Forwarded-Proto $scheme;\n"
        f'            proxy_set_header {CLIENT_CERT_HEADER} "{client_cert}";\n'
    )


def render(settings: FrontDoorSettings, site: Site, workdir: Path, account: Account | None = None) -> str:
    """nginx.conf for one site. Every limit comes from ``[front_door]``; see docs/front-door.md.
    ``account``: the unprivileged account of the worker processes when nginx starts as root."""
    tls = site.tls
    user = f"user {account.user} {account.group};\n" if account is not None else ""
    if account is None and os.geteuid() == 0:
        user = "user root;\n"  # else nginx would make its workers nobody, who cannot reach the sockets
    ssl_lines = ""
    client_cert = ""
    if tls is not None:
        ssl_lines = (
            f"        ssl_certificate {tls.certificate};\n"
            f"        ssl_certificate_key {tls.key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
            "        ssl_session_cache shared:tls:4m;\n"
        )
        if tls.client_cas is not None:
            ssl_lines += (
                "        ssl_verify_client optional;\n"
                f"        ssl_client_certificate {tls.client_cas};\n"
                "        ssl_verify_depth 4;\n"
            )
            client_cert = "$chargepki_client_cert"
    # The header is always set: empty (so not sent) unless nginx verified a client certificate,
    # and a header of that name sent by a client is never passed on.
    if site.service == "ocsp":
        connections, rate = settings.ocsp_connections_per_address, settings.ocsp_requests_per_second
    else:
        connections, rate = settings.connections_per_address, settings.requests_per_second
    rate_lines = (
        f"    limit_req_zone $binary_remote_addr zone=rate:10m rate={rate}r/s;\n"
        f"    limit_req zone=rate burst={rate} nodelay;\n"
        if rate
        else ""
    )
    return f"""# Written by chargepki for the {site.service} front door; rewritten at every start.
{user}worker_processes {settings.worker_processes};
worker_rlimit_nofile {settings.worker_connections * 2 + 64};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections {settings.worker_connections}; }}

http {{
    access_log {workdir}/access.log combined buffer=32k flush=1s;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    server_tokens off;
    default_type application/octet-stream;

    # Per client address: concurrent connections and a request rate (429 beyond either).
    limit_conn_zone $binary_remote_addr zone=per_address:10m;
    limit_conn per_address {connections};
{rate_lines}    limit_conn_status 429;
    limit_req_status 429;

    # Time: the TLS handshake and the request head, each body read, each response write, idle keep-alive.
    client_header_timeout {settings.header_timeout_seconds}s;
    client_body_timeout {settings.body_timeout_seconds}s;
    send_timeout {settings.send_timeout_seconds}s;
    keepalive_timeout {settings.keepalive_timeout_seconds}s;
    reset_timedout_connection on;
    lingering_time 10s;
    # Size: heads of at most 8 KiB per line, bodies kept whole in memory up to the service's limit.
    client_header_buffer_size 1k;
    large_client_header_buffers 4 8k;
    client_max_body_size {site.max_body};
    client_body_buffer_size {site.max_body};

    map $ssl_client_verify $chargepki_client_cert {{
        SUCCESS $ssl_client_escaped_cert;
        default "";
    }}

    upstream app {{
        server unix:{site.upstream};
        keepalive 32;
        keepalive_timeout 20s;
    }}

    server {{
        listen {_listen_address(site.host)}:{site.port}{" ssl" if tls is not None else ""};
{ssl_lines}
        # nginx's own refusals as one line of text, like the application's
        error_page 413 @too_large;
        error_page 429 @too_many;
        error_page 502 503 504 @unavailable;
        location @too_large {{
            default_type text/plain;
            return 413 "request body larger than {site.max_body} bytes\n";
        }}
        location @too_many {{
            default_type text/plain;
            add_header Retry-After 1 always;
            return 429 "too many connections or requests from this address\n";
        }}
        location @unavailable {{
            default_type text/plain;
            add_header Retry-After 5 always;
            return 503 "temporarily unavailable: the application server is not answering\n";
        }}

        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_request_buffering on;
            proxy_buffering on;
            proxy_buffers 16 16k;
            proxy_connect_timeout 5s;
            proxy_read_timeout 60s;
            proxy_send_timeout 60s;
            proxy_set_header Connection "";
{_request_headers(site, client_cert)}        }}
    }}
}}
"""


def child_environment(environ: Mapping[str, str], pin_env: str) -> dict[str, str]:
    """The environment for a child that needs no token: without the PIN."""
    return {key: value for key, value in environ.items() if key not in (pin_env, "CHARGEPKI_PKCS11_PIN")}


def die_with_parent() -> None:
    """``preexec_fn`` for children: SIGTERM when the supervising process dies (Linux), never orphaned."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(command: list[str], environ: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A supervised child in its own process group (so :func:`stop_child` reaches its workers too, and a
    Ctrl-C reaches only the supervisor, which stops the children in order), SIGTERMed if the supervisor dies.

    A process group, not a new session: with Linux's scheduler autogroups (one per session) a child
    in a session of its own is scheduled as a separate group, and the request path nginx → responder
    then cost about twice the CPU per request on 2 cores (bench/ocsp_paths.py)."""
    return subprocess.Popen(
        command,
        env=dict(environ) if environ is not None else None,
        stdin=subprocess.DEVNULL,
        process_group=0,
        preexec_fn=die_with_parent,
    )


def wait_until_listening(address: str | tuple[str, int], alive: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether something accepts connections on a Unix socket path or (host, port) before ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        family = (
            socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        )
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(address)
                return True
            except OSError:
                pass
        if not alive():
            return False
        time.sleep(0.05)
    return False


class Nginx:
    """nginx for one site, in the foreground as a child of the calling process."""

    def __init__(self, config: Config, site: Site, environ: Mapping[str, str]) -> None:
        self.binary = find_nginx(config.front_door.nginx)
        self.site = site
        self.workdir = run_dir(config) / f"nginx-{site.service}"
        for sub in ("", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.account = worker_account(config.front_door, config.home)
        if self.account is not None:  # the workers reach the sockets and their temporary files, nothing else
            open_path_for(self.account, config.home, (run_dir(config), self.workdir))
            os.chown(self.workdir / "tmp", self.account.uid, self.account.gid)
        self.conf = self.workdir / "nginx.conf"
        self.conf.write_text(render(config.front_door, site, self.workdir, self.account), encoding="utf-8")
        self.environ = child_environment(environ, config.pkcs11.pin_env)
        self.log_max_bytes = config.front_door.log_max_megabytes * 1024 * 1024
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.workdir),
            "-c",
            str(self.conf),
            "-e",
            str(self.workdir / "error.log"),
            *extra,
        ]

    def _errors(self, output: bytes) -> str:
        text = output.decode("utf-8", "replace").strip()
        with contextlib.suppress(OSError):
            text += "\n" + (self.workdir / "error.log").read_text(encoding="utf-8", errors="replace")[-1500:]
        lines = [line for line in text.splitlines() if "[emerg]" in line or "[alert]" in line] or text.splitlines()
        return lines[-1] if lines else "no message"

    def start(self) -> None:
        """Check the configuration, start nginx and wait until it listens (clear error if it cannot)."""
        check = subprocess.run(self._command("-t", "-q"), capture_output=True, env=self.environ, check=False)
        if check.returncode != 0:
            raise ConfigError(f"nginx refused its configuration {self.conf}: {self._errors(check.stderr)}")
        admit(self.account, self.site.upstream)  # the application server listens on it by now
        self.process = spawn(self._command("-g", "daemon off;"), self.environ)
        if not wait_until_listening((self.site.host, self.site.port), self.alive):
            self.stop()
            raise ConfigError(f"nginx did not start on {self.site.host}:{self.site.port}: {self._errors(b'')}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def reload(self) -> None:
        """Re-read the configuration and the files it names (the client CA bundle) without dropping requests."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGHUP)

    def rotate_logs(self) -> list[Path]:
        """Size cap: ``access.log`` or ``error.log`` above ``front_door.log_max_megabytes`` becomes
        ``*.log.1`` (replacing the previous one) and nginx reopens its logs (SIGUSR1, nothing dropped).
        Called by the supervisors every few seconds; returns the logs it rotated."""
        rotated = []
        for name in ("access.log", "error.log"):
            path = self.workdir / name
            with contextlib.suppress(OSError):
                if path.stat().st_size > self.log_max_bytes:
                    os.replace(path, path.with_name(name + ".1"))
                    rotated.append(path)
        if rotated and self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGUSR1)
        return rotated

    def stop(self) -> None:
        stop_child(self.process, signal.SIGQUIT)  # graceful: finish what is in flight


def stop_child(process: subprocess.Popen[bytes] | None, first: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop a child made by :func:`spawn` and its process group: ``first``, then SIGKILL after ``timeout``."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left (workers of a stuck server)
    process.wait()


def supervise(
    children: Mapping[str, Callable[[], bool]], tick: Callable[[], None] | None = None, interval: float = 1.0
) -> str:
    """Block until one child has stopped (returns its name); ``tick`` runs every ``interval`` seconds.

    SIGTERM and SIGINT end the wait with SystemExit, so the caller's ``finally`` stops the rest; a
    second signal is ignored so it cannot interrupt that clean-up.
    """

    def _exit(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    while True:
        for name, alive in children.items():
            if not alive():
                return name
        if tick is not None:
            tick()
        time.sleep(interval)
