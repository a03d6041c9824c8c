"""The responder's HTTP face: a plain WSGI callable (no framework on this hot path; bench/results-ocsp.md).

RFC 5019 over HTTP: ``POST <path>`` with ``application/ocsp-request``, or ``GET <path>/<base64>``,
answered with ``application/ocsp-response`` and caching headers that never reach past
nextUpdate. It also serves the publication directory (CRLs, CA certificates) at the
repository URL the certificates name. Errors are OCSP error statuses or short 4xx texts.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import Any

from ca.config import Config, OcspSettings, load_config, resolve_home
from ca.store.engine import Store
from metrics.instruments import configure_from_environment, instruments
from ocsp.host_counter import HostCounter
from ocsp.requests import MAX_REQUEST_BYTES, MalformedRequest, decode_get_path
from ocsp.responder import MALFORMED, Answer, Responder
from ocsp.signer_service import SignerClient
from ocsp.signing import INTERNAL_ERROR
from ocsp.source import CachedSource, StoreSource

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
OCSP_RESPONSE = "application/ocsp-response"
OCSP_REQUEST = "application/ocsp-request"
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.(crl|crt|pem)$")
_FILE_TYPES = {"crl": "application/pkix-crl", "crt": "application/pkix-cert", "pem": "application/x-pem-file"}


def _text(
    start_response: StartResponse, status: str, message: str, extra: Sequence[tuple[str, str]] = ()
) -> list[bytes]:
    body = (message + "\n").encode()
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *extra],
    )
    return [body]


def _cache_control(max_age: int) -> str:
    return f"max-age={max_age}, public, no-transform, must-revalidate"


def _media_type(content_type: str | None) -> str:
    """``Application/OCSP-request; charset=x`` → ``application/ocsp-request``."""
    return (content_type or "").split(";")[0].strip().lower()


class OcspApp:
    def __init__(
        self,
        responder: Responder,
        *,
        path: str = "/ocsp",
        repository_path: str = "/pki",
        repository_dir: Path | None = None,
        max_age: int = 3600,
    ) -> None:
        self.responder = responder
        self.path = path.rstrip("/")
        self.prefix = self.path + "/"
        self.repository_prefix = repository_path.rstrip("/") + "/"
        self.repository_dir = repository_dir
        self.max_age = max_age
        self._cache_control = _cache_control(max_age)
        # (status, source) → its counter. One increment per answer is all the hot path pays for
        # metrics (a write to this worker's file in the multiprocess directory, a few µs).
        self._counted: dict[tuple[str, str], Any] = {}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if path == self.path or path.startswith(self.prefix):
                return self._ocsp(environ, start_response, method, path)
            if path.startswith(self.repository_prefix):
                return self._file(environ, start_response, method, path[len(self.repository_prefix) :])
            if path == "/healthz":
                return _text(start_response, "200 OK", "ok")
            return _text(start_response, "404 Not Found", f"nothing here; OCSP is at {self.path}")
        except Exception:
            log.exception("OCSP responder failed on %s %s", method, path[:200])
            return self._send(start_response, self._count(Answer(INTERNAL_ERROR)), method)

    def _count(self, answer: Answer) -> Answer:
        """Count the answer by status and source (chargepki_ocsp_requests_total)."""
        key = (answer.status, answer.source)
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = instruments().ocsp_requests.labels(*key)
        counter.inc()
        return answer

    # -- OCSP ------------------------------------------------------------------------------------
    def _ocsp(self, environ: dict[str, Any], start_response: StartResponse, method: str, path: str) -> list[bytes]:
        if method == "POST":
            content_type = environ.get("CONTENT_TYPE")
            if content_type != OCSP_REQUEST and _media_type(content_type) != OCSP_REQUEST:
                return _text(
                    start_response, "415 Unsupported Media Type", "POST needs Content-Type application/ocsp-request"
                )
            try:
                length = int(environ.get("CONTENT_LENGTH") or "")
            except ValueError:
                return _text(start_response, "411 Length Required", "Content-Length required")
            if length < 0 or length > MAX_REQUEST_BYTES:
                return _text(
                    start_response, "413 Content Too Large", f"OCSP requests are at most {MAX_REQUEST_BYTES} bytes"
                )
            body = environ["wsgi.input"].read(length)
            return self._send(start_response, self._count(self.responder.answer(body)), method)
        if method in ("GET", "HEAD"):
            encoded = path[len(self.prefix) :] if path.startswith(self.prefix) else ""
            try:
                der = decode_get_path(encoded)
            except MalformedRequest:
                return self._send(start_response, self._count(MALFORMED), method)
            answer = self._count(self.responder.answer(der))
            if answer.cache is not None and environ.get("HTTP_IF_NONE_MATCH") == answer.cache.etag:
                start_response("304 Not Modified", self._cache_headers(answer))
                return []
            return self._send(start_response, answer, method)
        return _text(start_response, "405 Method Not Allowed", "use GET or POST", [("Allow", "GET, HEAD, POST")])

    def _cache_headers(self, answer: Answer) -> list[tuple[str, str]]:
        facts = answer.cache
        if facts is None:
            return [("Cache-Control", "no-cache")]
        remaining = int(facts.next_update - time.time())
        # RFC 5019 §6.2: never beyond nextUpdate
        cache_control = self._cache_control if remaining >= self.max_age else _cache_control(max(0, remaining))
        return [
            ("Cache-Control", cache_control),
            ("Last-Modified", facts.last_modified),
            ("Expires", facts.expires),
            ("ETag", facts.etag),
        ]

    def _send(self, start_response: StartResponse, answer: Answer, method: str) -> list[bytes]:
        headers = [("Content-Type", OCSP_RESPONSE), ("Content-Length", str(len(answer.body)))]
        start_response("200 OK", headers + self._cache_headers(answer))
        return [] if method == "HEAD" else [answer.body]

    # -- the publication directory ---------------------------------------------------------------
    def _file(self, environ: dict[str, Any], start_response: StartResponse, method: str, name: str) -> list[bytes]:
        if method not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed", "use GET", [("Allow", "GET, HEAD")])
        match = _FILE.match(name)
        if self.repository_dir is None or match is None:
            return _text(start_response, "404 Not Found", "no such file")
        found = read_published(self.repository_dir, name)
        if found is None:
            return _text(start_response, "404 Not Found", "no such file")
        data, modified = found
        headers = [
            ("Content-Type", _FILE_TYPES[match.group(1)]),
            ("Content-Length", str(len(data))),
            ("Last-Modified", formatdate(modified, usegmt=True)),
            ("Cache-Control", "max-age=300, public, no-transform"),
        ]
        start_response("200 OK", headers)
        return [] if method == "HEAD" else [data]


_NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def read_published(directory: Path, name: str) -> tuple[bytes, float] | None:
    """(bytes, mtime) of a regular file directly in the publication directory, or None.

    Never through a symlink (the directory itself or the file: ``O_NOFOLLOW``), and nothing but a
    regular file (no FIFO to block on, no device): a link placed there cannot publish the PIN files.
    """
    try:
        folder = os.open(directory, _NO_FOLLOW | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        descriptor = os.open(name, _NO_FOLLOW, dir_fd=folder)
    except OSError:
        return None
    finally:
        os.close(folder)
    with os.fdopen(descriptor, "rb") as handle:
        facts = os.fstat(handle.fileno())
        if not stat.S_ISREG(facts.st_mode):
            return None
        return handle.read(), facts.st_mtime


def build_app(config: Config, *, signer_socket: Path | None) -> OcspApp:
    """The responder for one installation: a read-only store, its cache and the signer's socket."""
    settings: OcspSettings = config.ocsp
    store = Store(settings.database_url or config.database_url, read_only=True, settings=config.database)
    source = CachedSource(
        StoreSource(store, read_timeout=settings.store_timeout_ms / 1000),
        max_entries=settings.cache_entries,
        stale_bound=settings.stale_bound_seconds,
        standby_poll=settings.standby_poll_ms / 1000,
        host=host_counter(config),
    )
    responder = Responder(source, SignerClient(signer_socket) if signer_socket is not None else None)
    return OcspApp(
        responder,
        path=settings.path,
        repository_path=settings.repository_path,
        repository_dir=config.home / "pki",
        max_age=settings.max_age_seconds,
    )


def host_counter(config: Config) -> HostCounter | None:
    """The change counter this installation's responder processes share (``run/ocsp-counter``); None,
    with a warning, where it cannot be made (each process then follows the store on its own)."""
    path = config.home / "run" / "ocsp-counter"
    try:
        return HostCounter(path)
    except OSError as exc:
        log.warning(
            "OCSP responder: cannot share its change counter at %s (%s); its processes may disagree "
            "for up to a second after a revocation",
            path,
            exc.strerror or exc,
        )
        return None


def signer_socket_path(config: Config) -> Path:
    configured = config.ocsp.signer_socket
    return Path(configured) if configured else config.home / "run" / "ocsp-signer.sock"


def create_app() -> OcspApp:
    """Factory for granian/gunicorn workers: the installation comes from ``CHARGEPKI_HOME``.

    ``CHARGEPKI_OCSP_NO_SIGNER=1`` runs a responder that answers only from the store.
    """
    configure_from_environment()  # the service's multiprocess metrics directory, when it has one
    config = load_config(resolve_home(None, os.environ), os.environ)
    no_signer = os.environ.get("CHARGEPKI_OCSP_NO_SIGNER") == "1"
    return build_app(config, signer_socket=None if no_signer else signer_socket_path(config))
