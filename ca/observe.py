"""What the core tells an observer: enrollments and refusals, issuance and token signing times.

The core knows no metrics library. Services register an :class:`Observer` (``metrics.Recorder``
turns the events into Prometheus metrics) once per process; with none registered, which is the
case in the CLI and the tests, each event costs one empty-tuple check. An observer must be quick
and must not raise: a failing one is dropped from the event (logged), never the request.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Observer(Protocol):
    def enrollment(self, route: str, environment: str, profile: str, code: str | None) -> None:
        """An enrollment pipeline run ended: ``code`` None for a certificate, else the refusal's code."""

    def issued(self, profile: str, seconds: float) -> None:
        """``issue()`` recorded a certificate of ``profile`` after ``seconds`` (reservation to commit)."""

    def signed(self, mechanism: str, seconds: float) -> None:
        """The token made one signature with ``mechanism`` in ``seconds`` (waiting for the token included)."""


_observers: tuple[Observer, ...] = ()


def register(observer: Observer) -> None:
    """Add ``observer`` for this process (an observer already registered is not added twice)."""
    global _observers
    if observer not in _observers:
        _observers = (*_observers, observer)


def unregister(observer: Observer) -> None:
    global _observers
    _observers = tuple(o for o in _observers if o is not observer)


def enrollment(route: str, environment: str, profile: str, code: str | None) -> None:
    for observer in _observers:
        try:
            observer.enrollment(route, environment, profile, code)
        except Exception:
            log.exception("observer %r failed", observer)


def issued(profile: str, seconds: float) -> None:
    for observer in _observers:
        try:
            observer.issued(profile, seconds)
        except Exception:
            log.exception("observer %r failed", observer)


def signed(mechanism: str, seconds: float) -> None:
    for observer in _observers:
        try:
            observer.signed(mechanism, seconds)
        except Exception:
            log.exception("observer %r failed", observer)
