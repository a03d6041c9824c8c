"""``chargepki serve console``: the fleet console on its own HTTPS listener (``[console]``, loopback by default).

gunicorn's gthread worker with a time limit on every socket operation (``web/workers.py``), as EST
runs in the direct mode: a slow or idle client holds one thread for at most the time limit, never a
worker. The console has its own TLS key and certificate (``<home>/console/``, issued by the issuing CA
like EST's) and asks for an optional client certificate chaining to one of the installation's CAs;
the application then accepts only ``admin`` certificates in good standing, or a login link's session.
The workers hold no PIN and never open the token: the server reads the audit key's public half
(to check the last checkpoint) once at start, before it forks them.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gunicorn.app.base import BaseApplication

from ca.audit.checkpoints import audit_public_key
from ca.config import ConsoleSettings, load_config
from ca.context import Pki
from ca.errors import ChargepkiError, TokenError, one_line
from ca.frontdoor import child_environment
from web.console.app import create_console_app
from web.server import prepare_tls
from web.workers import TIMEOUT_ENV, ssl_context

log = logging.getLogger(__name__)

# The request line is logged without its query string: a login link's token never reaches a log.
ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s"'


class ConsoleServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code; each worker opens the installation after the fork."""

    def __init__(
        self, home: Path, environ: Mapping[str, str], options: dict[str, Any], audit_key: bytes | None
    ) -> None:
        self.home = home
        self.environ = dict(environ)
        self.options = options
        self.audit_key = audit_key
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        pki = Pki.open(self.home, self.environ, check_schema=False)  # boots (and answers 503) while the db is away
        return create_console_app(pki, pki.config.console, audit_key=functools.partial(_audit_key, self.audit_key))


def _read_audit_key(pki: Pki) -> bytes | None:
    """The audit key's public half as PEM, read in the server before the workers exist; None when the
    token has no audit key yet (no checkpoint was ever made) or cannot be reached now."""
    try:
        public_key = audit_public_key(pki.token())
    except ChargepkiError as exc:
        log.warning("the console cannot check audit checkpoints until it is restarted: %s", one_line(exc))
        return None
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _audit_key(pem: bytes | None) -> ec.EllipticCurvePublicKey:
    if pem is None:
        raise TokenError("the audit key was not in the token when the console started: restart it to check checkpoints")
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def console_url(pki: Pki, settings: ConsoleSettings) -> str:
    """The origin admins open (and login links point at)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return f"https://{pki.config.est.server_names[0]}:{settings.port}"


AUDIT_KEY_ENV = "CHARGEPKI_CONSOLE_AUDIT_KEY"  # the audit key's public half (PEM): not a secret


def serve_console(pki: Pki, *, host: str, port: int, workers: int) -> None:
    """Prepare what needs the token (the console's TLS certificate, the audit key's public half),
    then replace this process by the server itself, started afresh without the PIN: a forked
    worker would still carry the PIN in its copy of this process's memory and environment."""
    settings = pki.config.console
    tls = prepare_tls(pki, pki.config.est, service="console")
    audit_key = _read_audit_key(pki)
    environ = child_environment(pki.environ, pki.config.pkcs11.pin_env)
    environ[TIMEOUT_ENV] = str(settings.request_timeout_seconds)
    environ.pop(AUDIT_KEY_ENV, None)
    if audit_key is not None:
        environ[AUDIT_KEY_ENV] = audit_key.decode()
    home = pki.config.home
    (home / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    pki.close()
    arguments = [str(home), host, str(port), str(workers), tls["certfile"], tls["keyfile"], tls["ca_certs"]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "web.console.server", *arguments], environ)


def main(argv: list[str]) -> None:
    """The console server proper, as ``serve_console`` starts it (no PIN in its environment)."""
    home, host, port, workers, certfile, keyfile, ca_certs = argv
    settings = load_config(Path(home), os.environ).console
    options: dict[str, Any] = {
        "bind": f"{host}:{port}",
        "workers": int(workers),
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
        "control_socket": str(Path(home) / "run" / "gunicorn-console.ctl"),
        "certfile": certfile,
        "keyfile": keyfile,
        "ca_certs": ca_certs,
        "cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_context": ssl_context,
    }
    audit_key = os.environ.get(AUDIT_KEY_ENV)
    ConsoleServer(Path(home), os.environ, options, audit_key.encode() if audit_key else None).run()


if __name__ == "__main__":
    main(sys.argv[1:])
