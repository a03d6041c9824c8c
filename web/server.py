"""``chargepki serve est``: gunicorn over HTTPS, with a server certificate from the hierarchy.

The TLS key of the *service* is a software key file (0600) in the home: gunicorn needs a
file, and it is not a CA key. Its certificate is issued by the issuing CA on first start and
renewed on start when a third of its life is left, so ``chargepki ca chain``'s root verifies
the service. Client certificates are optional at the TLS layer (``CERT_OPTIONAL``) and
accepted only when they chain to one of this installation's CAs; the application then
decides what each one may do.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gunicorn.app.base import BaseApplication
from sqlalchemy.orm import Session

from ca.authorities import default_issuing_ca, issuer_for, list_authorities
from ca.config import EstSettings
from ca.context import Pki
from ca.issuance import IssueRequest, abandon_stale_pending, issue, utcnow
from ca.profiles import get_profile
from ocsp.presign import Presigner, policy_from
from web.app import create_app
from web.workers import TIMEOUT_ENV, ssl_context

SERVER_VALIDITY = timedelta(days=90)


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


def prepare_tls(pki: Pki, settings: EstSettings) -> dict[str, str]:
    """Server certificate (leaf + issuing CA), its key, and the bundle of CAs accepted from clients."""
    directory = pki.config.home / "est"
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
            row = issue(session, issuer, request, actor="system:est", status=status)
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


def write_client_ca_bundle(session: Session, path: Path) -> None:
    """Every CA's certificate, the TLS layer's trust for client certificates.

    gunicorn's gthread worker reads this file for every new connection, so rewriting it (as
    ``ca rotate`` and ``ca rollover-root`` do) makes a new CA's devices welcome without a restart.
    """
    bundle = b"".join(
        x509.load_der_x509_certificate(a.certificate_der).public_bytes(serialization.Encoding.PEM)
        for a in list_authorities(session)
    )
    _write_private(path, bundle)


class EstServer(BaseApplication):  # type: ignore[misc]
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
        # The master checked the schema; a worker (re)started while the database is away must
        # still boot (and answer 503) rather than fail, which would make gunicorn stop the service.
        pki = Pki.open(self.home, self.environ, check_schema=False)
        return create_app(pki, pki.config.est, run_jobs=True)


def serve_est(pki: Pki, *, host: str, port: int, workers: int) -> None:
    settings = pki.config.est
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
    }
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
    EstServer(home, pki.environ, options).run()
