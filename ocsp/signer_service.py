"""The on-demand signer: answers what no stored response covers, in the process that holds the token.

Responders send it the request's DER over a Unix socket (4-octet length, then the bytes) and
get the response's DER back. It reads every status from the database itself, so a
compromised responder can have it sign only the truth. It signs a bounded number of
responses per second (unknown serials are cheap to ask about and cost a token signature),
answering ``tryLater`` beyond that, and stores what it signed for an issued certificate so
the next request for it is served from the store.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ca.errors import ChargepkiError
from ca.issuance.serials import format_serial
from ca.kinds import CaStatus
from ca.store.engine import Store
from ca.store.models import Authority, Certificate
from ocsp.certid import CertId
from ocsp.presign import Presigner, answerable, certificate_status, upsert_response
from ocsp.requests import MAX_REQUEST_BYTES, MalformedRequest, parse_request
from ocsp.signing import INTERNAL_ERROR, MALFORMED_REQUEST, TRY_LATER, UNAUTHORIZED, SingleStatus

log = logging.getLogger(__name__)

UNKNOWN_VALIDITY = timedelta(hours=1)  # an unknown serial may be issued later (it never is: 159 random bits)
_LENGTH = struct.Struct("!I")


class SignerUnavailable(Exception):
    """No on-demand signer answered: the responder says ``tryLater``."""


class RateLimit:
    """A token bucket: ``rate`` signatures per second, bursts up to one second's worth."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class OnDemandSigner:
    def __init__(
        self,
        store: Store,
        presigner: Presigner,
        *,
        rate: int = 100,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.presigner = presigner
        self.limit = RateLimit(rate)
        self.now = now

    def respond(self, der: bytes) -> bytes:
        try:
            cert_ids = parse_request(der)
        except MalformedRequest:
            return MALFORMED_REQUEST
        if not self.limit.take():
            return TRY_LATER
        try:
            return self._sign(cert_ids)
        except SQLAlchemyError as exc:
            log.warning("on-demand OCSP signing: store unavailable: %s", str(exc).splitlines()[0])
            return TRY_LATER
        except ChargepkiError as exc:  # token away, signer missing: the responders keep serving the store
            log.warning("on-demand OCSP signing failed: %s", exc)
            return TRY_LATER

    def _sign(self, cert_ids: list[CertId]) -> bytes:
        now = self.now()
        with self.store.session() as session:
            served = {}
            for authority_id in session.scalars(select(Authority.id).where(Authority.status != CaStatus.EXTERNAL)):
                for algorithm, hashes in self.presigner.issuer_hashes(session, authority_id).items():
                    served[(algorithm, hashes.name_hash, hashes.key_hash)] = authority_id
            authorities = {served.get((c.hash_algorithm, c.issuer_name_hash, c.issuer_key_hash)) for c in cert_ids}
            if None in authorities or len(authorities) != 1:
                # Unknown issuer, or several CAs at once (one delegated signer cannot speak for two CAs).
                return UNAUTHORIZED
            (authority_id,) = authorities
            signer = self.presigner.signer_for(session, authority_id, now)
            if signer is None:
                return TRY_LATER
            query = select(Certificate).where(
                Certificate.authority_id == authority_id,
                Certificate.serial.in_([format_serial(c.serial_number) for c in cert_ids]),
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update()  # a revocation committing meanwhile writes after us
            by_serial = {int(c.serial, 16): c for c in session.scalars(query)}
            statuses = []
            for cert_id in cert_ids:
                certificate = by_serial.get(cert_id.serial_number)
                if certificate is not None and answerable(certificate):
                    statuses.append(certificate_status(certificate, cert_id))
                else:
                    statuses.append(SingleStatus(cert_id, "unknown"))
            known = all(status.status != "unknown" for status in statuses)
            validity = self.presigner.validity_for(session, authority_id) if known else UNKNOWN_VALIDITY
            der = signer.sign(statuses, this_update=now, next_update=now + validity)
            if known and len(cert_ids) == 1:
                certificate = by_serial[cert_ids[0].serial_number]
                upsert_response(
                    session,
                    certificate,
                    cert_ids[0].hash_algorithm,
                    statuses[0].status,
                    der,
                    signer,
                    now,
                    self.presigner.policy,
                    validity=validity,
                )
            session.commit()
            return der


# -- transport -------------------------------------------------------------------------------------
def _read_exactly(connection: socket.socket, count: int) -> bytes | None:
    chunks = []
    while count:
        chunk = connection.recv(count)
        if not chunk:
            return None
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _read_frame(connection: socket.socket) -> bytes | None:
    header = _read_exactly(connection, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_REQUEST_BYTES * 4:
        raise ValueError("frame too large")
    return _read_exactly(connection, length)


def _write_frame(connection: socket.socket, payload: bytes) -> None:
    connection.sendall(_LENGTH.pack(len(payload)) + payload)


class SignerServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, signer: OnDemandSigner) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)
        self.signer = signer
        super().__init__(str(path), _Handler)
        path.chmod(0o600)  # only this user's responders may ask for signatures


class _Handler(socketserver.BaseRequestHandler):
    server: SignerServer

    def handle(self) -> None:
        connection: socket.socket = self.request
        try:
            while (request := _read_frame(connection)) is not None:
                try:
                    answer = self.server.signer.respond(request)
                except Exception:
                    log.exception("on-demand OCSP signer failed")
                    answer = INTERNAL_ERROR
                _write_frame(connection, answer)
        except (OSError, ValueError):
            return


class SignerClient:
    """A responder's connection to the on-demand signer, one socket per thread."""

    def __init__(self, path: Path, *, timeout: float = 2.0) -> None:
        self.path = path
        self.timeout = timeout
        self._local = threading.local()

    def _connect(self) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(self.timeout)
        connection.connect(str(self.path))
        return connection

    def sign(self, request: bytes) -> bytes:
        for attempt in range(2):  # a socket left from before a signer restart fails once
            connection = getattr(self._local, "connection", None)
            try:
                if connection is None:
                    connection = self._local.connection = self._connect()
                _write_frame(connection, request)
                answer = _read_frame(connection)
                if answer is None:
                    raise OSError("the signer closed the connection")
                return answer
            except (OSError, ValueError) as exc:
                if connection is not None:
                    connection.close()
                self._local.connection = None
                if attempt:
                    raise SignerUnavailable(str(exc)) from None
        raise SignerUnavailable("unreachable")  # pragma: no cover
