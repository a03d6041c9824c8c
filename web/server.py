"""``chargepki serve est``: gunicorn over HTTPS, with a server certificate from the hierarchy.

The TLS key of the *service* is a software key file (0600) in the home: gunicorn needs a
file, and it is not a CA key. Its certificate is issued by the issuing CA on first start and
renewed on start when a third of its life is left, so ``chargepki ca chain``'s root verifies
the service. Client certificates are optional at the TLS layer (``CERT_OPTIONAL``) and
accepted only when they chain to one of this installation's CAs; the application then
decides what each one may do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import sys
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gunicorn.app.base import BaseApplication
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ca.authorities.issuers import default_issuing_ca, issuer_for, list_authorities
from ca.clock import utcnow
from ca.config import EstSettings
from ca.context import Pki
from ca.errors import ChargepkiError, ConfigError
from ca.frontdoor import (
    CLIENT_CERT_HEADER,
    TRUSTED_UNIX,
    Nginx,
    Site,
    Tls,
    spawn,
    stop_child,
    supervise,
    upstream_socket,
    wait_until_listening,
)
from ca.issuance.flow import IssueRequest, abandon_stale_pending, issue
from ca.issuance.profiles import get_profile
from ca.kinds import CaRole
from ca.work import Work
from metrics.instruments import record_core_events, watch_token
from metrics.listener import exporting, worker_exited
from ocsp.presign import Presigner, policy_from
from web.app import create_app
from web.metrics import instrument
from web.responses import MAX_BODY
from web.workers import TIMEOUT_ENV, ssl_context

SERVER_VALIDITY = timedelta(days=90)
BUNDLE_CHECK_SECONDS = 2.0  # how soon the proxy trusts a new CA's devices after a rotation
log = logging.getLogger(__name__)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _needs_renewal(certificate_file: Path, names: tuple[str, ...]) -> bool:
    if not certificate_file.exists():
        return True
    try:
        leaf = x509.load_pem_x509_certificates(certificate_file.read_bytes())[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return True
    remaining = leaf.not_valid_after_utc - utcnow()
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    return remaining < lifetime / 3 or set(san.get_values_for_type(x509.DNSName)) != set(names)


def prepare_tls(pki: Pki, settings: EstSettings, service: str = "est") -> dict[str, str]:
    """Server certificate (leaf + issuing CA), its key, and the bundle of CAs accepted from clients,
    in ``<home>/<service>/`` (EST and the console each have their own TLS key)."""
    directory = pki.config.home / service
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    certificate_file, key_file, clients_file = (
        directory / name for name in ("server.pem", "server.key", "client-ca.pem")
    )
    with pki.store.session() as session:
        authority = default_issuing_ca(session, settings.default_environment)
        if _needs_renewal(certificate_file, settings.server_names):
            key = ec.generate_private_key(ec.SECP256R1())
            issuer = issuer_for(authority, pki.token())
            request = IssueRequest(
                get_profile("csms-server"),
                key.public_key(),
                settings.server_names[0],
                dns_names=settings.server_names,
                validity=SERVER_VALIDITY,
            )
            status = Presigner(pki.token(), policy_from(pki.config.ocsp))
            row = issue(Work(session, f"system:{service}", status=status), issuer=issuer, request=request)
            chain_pem = x509.load_der_x509_certificate(row.der or b"").public_bytes(serialization.Encoding.PEM)
            chain_pem += x509.load_der_x509_certificate(authority.certificate_der).public_bytes(
                serialization.Encoding.PEM
            )
            _write_private(
                key_file,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            _write_private(certificate_file, chain_pem)
        write_client_ca_bundle(session, clients_file)
    return {"certfile": str(certificate_file), "keyfile": str(key_file), "ca_certs": str(clients_file)}


def client_ca_bundle_path(pki: Pki) -> Path:
    return pki.config.home / "est" / "client-ca.pem"


def client_ca_bundle(session: Session) -> bytes:
    """Every CA's certificate but the imported OEM roots (trust anchors for stations, never for clients here)."""
    return b"".join(
        x509.load_der_x509_certificate(a.certificate_der).public_bytes(serialization.Encoding.PEM)
        for a in list_authorities(session)
        if a.role != CaRole.OEM_ROOT
    )


def write_client_ca_bundle(session: Session, path: Path) -> None:
    """Every CA's certificate, the TLS layer's trust for client certificates.

    gunicorn's gthread worker reads this file for every new connection, so rewriting it (as
    ``ca rotate`` and ``ca rollover-root`` do) makes a new CA's devices welcome without a restart;
    the front door compares the store's CAs with what nginx loaded and reloads it (below).
    """
    _write_private(path, client_ca_bundle(session))


def _stop_background_work(_server: Any, worker: Any) -> None:
    """gunicorn's ``worker_exit`` hook: stop the job runner and close the installation before the
    interpreter shuts down. A runner thread still checking out a database connection then adds a
    finalizer while ``atexit`` walks them ("dictionary changed size during iteration")."""
    runtime = getattr(getattr(worker, "wsgi", None), "runtime", None)
    if runtime is not None:
        runtime.close()


def _worker_gone(_server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook (in the master): the worker's live gauges leave the metrics' sums."""
    worker_exited(worker.pid)


class EstServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code; each worker opens the installation after the fork."""

    def __init__(self, home: Path, environ: Mapping[str, str], options: dict[str, Any], settings: EstSettings) -> None:
        self.home = home
        self.environ = dict(environ)
        self.options = options
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # The master checked the schema; a worker (re)started while the database is away must
        # still boot (and answer 503) rather than fail, which would make gunicorn stop the service.
        pki = Pki.open(self.home, self.environ, check_schema=False)
        record_core_events()  # into the service's multiprocess directory (docs/metrics.md)
        watch_token(pki.config.pkcs11.token_label, pki.token)  # chargepki_token_up, from this worker
        app = create_app(pki, self.settings, run_jobs=True)
        instrument(app)
        return app


def behind_front_door(settings: EstSettings) -> EstSettings:
    """The application's settings behind the proxy: the client certificate (verified by nginx) and the
    client's address come in headers, trusted only from the Unix socket's peers (the proxy)."""
    return replace(
        settings,
        tls=False,
        client_cert_header=CLIENT_CERT_HEADER,
        trusted_proxies=(TRUSTED_UNIX,),
        require_tls_unique=False,
    )


def check_front_door(settings: EstSettings) -> None:
    if settings.require_tls_unique:
        raise ConfigError(
            "est.require_tls_unique needs the direct mode: RFC 7030 tls-unique cannot cross a TLS-terminating "
            'proxy; set front_door.mode = "direct" (or run `serve est --direct`), or turn require_tls_unique off'
        )


def serve_est_front_door(pki: Pki, *, host: str, port: int, workers: int) -> None:
    """nginx on host:port (TLS, optional client certificates) → gunicorn on ``<home>/run/est.sock``.

    gunicorn runs as a child (``serve est --direct --unix-socket``, with the PIN: it signs); nginx
    runs as a child without it. This process keeps the client CA bundle current from the store and
    reloads nginx when it changes (rotations), and stops both when either stops or it is told to.
    """
    config = pki.config
    settings = config.est
    check_front_door(settings)
    tls = None
    if settings.tls:
        files = prepare_tls(pki, settings)
        client_cas = Path(files["ca_certs"]) if config.front_door.verify_client_certificates else None
        tls = Tls(Path(files["certfile"]), Path(files["keyfile"]), client_cas)
    sock = upstream_socket(config, "est")
    site = Site("est", host, port, sock, MAX_BODY, tls)
    nginx = Nginx(config, site, pki.environ)  # finds nginx (clear error) before anything starts
    command = [sys.executable, "-m", "cli.main", "--home", str(config.home), "serve", "est", "--direct"]
    command += ["--unix-socket", str(sock), "--workers", str(workers)]
    metrics = contextlib.ExitStack()
    metrics.enter_context(exporting(config, "est", pki.environ))  # the workers' directory, the listener
    app = spawn(command)  # with this process's environment: gunicorn signs, so it needs the PIN
    try:
        if not wait_until_listening(str(sock), lambda: app.poll() is None, timeout=60):
            raise ConfigError(f"the EST application server did not start on {sock}")
        nginx.start()
        log.info("EST front door: nginx on %s:%s -> gunicorn on %s", host, port, sock)

        loaded = [tls.client_cas.read_bytes()] if tls is not None and tls.client_cas is not None else []

        def refresh_bundle() -> None:
            """The CAs in the store against the bundle nginx loaded: rewrite it and reload on a change."""
            if not loaded or tls is None or tls.client_cas is None:
                return
            try:
                with pki.store.session() as session:
                    current = client_ca_bundle(session)
            except (ChargepkiError, SQLAlchemyError) as exc:
                log.warning("front door: cannot read the CAs for the client CA bundle: %s", str(exc).splitlines()[0])
                return
            if current != loaded[0]:
                _write_private(tls.client_cas, current)
                loaded[0] = current
                log.info("front door: the CAs changed; nginx reloads %s", tls.client_cas)
                nginx.reload()

        def tick() -> None:
            refresh_bundle()
            nginx.rotate_logs()

        stopped = supervise({"gunicorn": lambda: app.poll() is None, "nginx": nginx.alive}, tick, BUNDLE_CHECK_SECONDS)
        raise ChargepkiError(f"the EST front door stopped: {stopped} exited")
    finally:
        nginx.stop()
        stop_child(app)
        metrics.close()
        pki.close()


def serve_est(pki: Pki, *, host: str, port: int, workers: int, unix_socket: Path | None = None) -> None:
    """gunicorn itself on host:port (the direct mode), or on a Unix socket behind the front door."""
    settings = pki.config.est
    if unix_socket is not None:
        settings = behind_front_door(settings)
    # Size and time limits: request line 4 KiB, 50 header fields of at most 8 KiB each, bodies
    # 32 KiB (web/app.py), and a connection that stalls mid-request for request_timeout_seconds
    # is closed (web/workers.py); idle keep-alive connections close after 30 s.
    os.environ[TIMEOUT_ENV] = str(settings.request_timeout_seconds)
    options: dict[str, Any] = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "web.workers.TimedThreadWorker",
        "threads": 4,
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 30,
        "limit_request_line": 4096,
        "limit_request_fields": 50,
        "limit_request_field_size": 8190,
        "accesslog": "-",
        "errorlog": "-",
        # gunicornc's control socket, per installation (gunicorn's default under ~ is shared by all)
        "control_socket": str(pki.config.home / "run" / "gunicorn-est.ctl"),
        "worker_exit": _stop_background_work,
        "child_exit": _worker_gone,
    }
    (pki.config.home / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    if unix_socket is not None:
        unix_socket.unlink(missing_ok=True)  # left by a killed run
        # 0600 socket: only the installation's owner (the proxy) connects. No access log of its own:
        # nginx's access.log already has every request, with the client's address and the ones the
        # application never saw; a second line per request cost ~2% of an enrollment's CPU.
        options.update(bind=f"unix:{unix_socket}", umask=0o077, accesslog=None)
    if settings.tls:
        tls = prepare_tls(pki, settings)
        options.update(
            certfile=tls["certfile"],
            keyfile=tls["keyfile"],
            ca_certs=tls["ca_certs"],
            cert_reqs=ssl.CERT_OPTIONAL,
            ssl_context=ssl_context,  # TLS sockets with the request time limit (web/workers.py)
        )
    with pki.store.session() as session:
        abandon_stale_pending(session, actor="system:est")  # what a crash left behind (workers sweep too)
    home = pki.config.home
    pki.close()  # the workers open their own connections and token sessions after the fork
    if unix_socket is not None:  # behind the front door, whose process runs the metrics listener
        EstServer(home, pki.environ, options, settings).run()
        return
    with exporting(pki.config, "est", pki.environ):
        EstServer(home, pki.environ, options, settings).run()
