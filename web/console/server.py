"""``chargepki serve console``: the fleet console on its own HTTPS listener (``[console]``, loopback by default).

gunicorn's gthread worker with a time limit on every socket operation (``web/workers.py``), as EST
runs in the direct mode: a slow or idle client holds one thread for at most the time limit, never a
worker. The console has its own TLS key and certificate (``<home>/console/``, issued by the issuing CA
like EST's) and asks for an optional client certificate chaining to one of the installation's CAs;
the application then accepts only ``admin`` certificates in good standing, or a login link's session.
Workers open the token only to read the audit key's public half (to check the last checkpoint); they sign nothing.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from gunicorn.app.base import BaseApplication

from ca.audit.checkpoints import audit_public_key
from ca.config import ConsoleSettings
from ca.context import Pki
from web.console.app import create_console_app
from web.server import prepare_tls
from web.workers import TIMEOUT_ENV, ssl_context

# The request line is logged without its query string: a login link's token never reaches a log.
ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s"'


class ConsoleServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code; each worker opens the installation after the fork."""

    def __init__(self, home: Path, environ: Mapping[str, str], options: dict[str, Any]) -> None:
        self.home = home
        self.environ = dict(environ)
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        pki = Pki.open(self.home, self.environ, check_schema=False)  # boots (and answers 503) while the db is away
        return create_console_app(pki, pki.config.console, audit_key=functools.cache(lambda: _audit_key(pki)))


def _audit_key(pki: Pki) -> ec.EllipticCurvePublicKey:
    """The audit key's public half, read from the token at first need (cached while it succeeds)."""
    return audit_public_key(pki.token())


def console_url(pki: Pki, settings: ConsoleSettings) -> str:
    """The origin admins open (and login links point at)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return f"https://{pki.config.est.server_names[0]}:{settings.port}"


def serve_console(pki: Pki, *, host: str, port: int, workers: int) -> None:
    settings = pki.config.console
    os.environ[TIMEOUT_ENV] = str(settings.request_timeout_seconds)
    tls = prepare_tls(pki, pki.config.est, service="console")
    options: dict[str, Any] = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "web.workers.TimedThreadWorker",
        "threads": settings.threads,
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 15,
        "limit_request_line": 4096,
        "limit_request_fields": 50,
        "limit_request_field_size": 8190,
        "accesslog": "-",
        "errorlog": "-",
        "access_log_format": ACCESS_LOG_FORMAT,
        "control_socket": str(pki.config.home / "run" / "gunicorn-console.ctl"),
        "certfile": tls["certfile"],
        "keyfile": tls["keyfile"],
        "ca_certs": tls["ca_certs"],
        "cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_context": ssl_context,
    }
    (pki.config.home / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    home, environ = pki.config.home, pki.environ
    pki.close()  # the workers open their own connections after the fork
    ConsoleServer(home, environ, options).run()
