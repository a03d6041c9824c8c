"""gunicorn's gthread worker with a time limit on every socket operation of a request.

gthread waits a few seconds for a connection's first byte and then parks it, but once a
request has started (TLS handshake, request line, headers, body, the response) it works in
blocking mode without any timeout: a client that sends a few bytes and stalls, or stops
reading, holds one of the worker's threads for as long as it likes (slowloris). gunicorn has
no setting for this.

So accepted sockets get a class whose ``setblocking(True)`` — which gunicorn calls before
every request — means "blocking with a timeout of ``CHARGEPKI_REQUEST_TIMEOUT`` seconds"
(default 10), and TLS sockets are made with such a class from the start (``ssl_context``
below sets ``SSLContext.sslsocket_class``). A stalled operation is logged in one line and
ends the connection the way gunicorn already handles quietly: a read as end of stream, a
write or handshake as a reset connection. (The kernel's ``SO_RCVTIMEO`` was tried first: it
leaves Python's TLS layer in a bad state.)
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

TIMEOUT_ENV = "CHARGEPKI_REQUEST_TIMEOUT"
DEFAULT_TIMEOUT = 10
log = logging.getLogger("gunicorn.error")


def request_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        return float(DEFAULT_TIMEOUT)


def _stalled(sock: Any, what: str) -> None:
    try:
        peer = sock.getpeername()
    except OSError:
        peer = "?"
    log.info("closing a connection from %s: %s stalled for %ss", peer, what, request_timeout())


class _TimedIO:
    """The time limit, for plain and TLS sockets alike (mixed in before the socket class)."""

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(request_timeout())  # type: ignore[attr-defined]
        else:
            super().setblocking(False)  # type: ignore[misc]

    def recv(self, *args: Any) -> bytes:
        try:
            return super().recv(*args)  # type: ignore[misc,no-any-return]
        except TimeoutError:
            _stalled(self, "the request")
            return b""

    def sendall(self, *args: Any) -> None:
        try:
            super().sendall(*args)  # type: ignore[misc]
        except TimeoutError:
            _stalled(self, "reading the response")
            raise BrokenPipeError(errno.EPIPE, "the client stopped reading") from None


class _TimedSocket(_TimedIO, socket.socket):
    __slots__ = ()


class _TimedSSLSocket(_TimedIO, ssl.SSLSocket):
    def do_handshake(self, *args: Any) -> None:
        if self.gettimeout() is None:
            self.settimeout(request_timeout())
        try:
            super().do_handshake(*args)
        except TimeoutError:
            _stalled(self, "the TLS handshake")
            raise ConnectionResetError(errno.ECONNRESET, "the TLS handshake stalled") from None


def ssl_context(_config: Any, default_ssl_context_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """gunicorn's ``ssl_context`` hook: its own context, making TLS sockets with the time limit."""
    context = default_ssl_context_factory()
    context.sslsocket_class = _TimedSSLSocket
    return context


class TimedThreadWorker(ThreadWorker):  # type: ignore[misc]
    def handle(self, conn: Any) -> Any:
        if type(conn.sock) is socket.socket:
            conn.sock.__class__ = _TimedSocket  # same object and descriptor: only the methods change
        return super().handle(conn)
