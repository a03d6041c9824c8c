"""The counters, histograms and gauges the serving processes record into, and the core's observer.

prometheus_client decides per value whether it lives in this process's memory or in a file of the
multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``), which a service's listener process sums over
every worker, alive or gone. ``configure`` makes that choice explicitly in each recording process,
before the first value exists: gunicorn forks its workers from a master that imported
prometheus_client before the directory was set, and a process may inherit a directory it must not
write to. The instruments are made at first use, after ``configure``.

Labels carry names from closed sets only (routes, environments, profiles, refusal codes, status
words, URL rules): never a serial, a subject, a secret or anything a client sent verbatim.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values

from ca import observe
from ca.errors import ChargepkiError
from ca.keys.pkcs11_token import Token

log = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series: the multiprocess files have none either

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: issuance is a few ms to a few hundred ms (two commits and a token signature, under load).
ISSUANCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds: one token signature is sub-millisecond (SoftHSM2, EC) to tens of ms (network HSM, RSA-4096);
# a CRL of a million entries is hashed by the token too.
SIGNING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
TOKEN_CHECK_SECONDS = 5.0  # how often a signing process checks its token for chargepki_token_up

_lock = threading.Lock()
_mode: str | None = None  # the directory values are written to, "" in memory; None: not configured yet


def configure(directory: str | os.PathLike[str] | None) -> None:
    """Record into ``directory`` (multiprocess mode; it must exist) or, with None, in this process's memory.

    Call it in every recording process before its first value; values made earlier keep their mode.
    ``PROMETHEUS_MULTIPROC_DIR`` is set (or removed) accordingly, so children started afterwards inherit
    the choice.
    """
    global _mode
    wanted = str(directory) if directory else ""
    with _lock:
        if wanted:
            os.environ[MULTIPROC_ENV] = wanted
            if not getattr(values.ValueClass, "_multiprocess", False):
                # (one class per process: two would map the same per-process file twice)
                values.ValueClass = values.MultiProcessValue()
        else:
            os.environ.pop(MULTIPROC_ENV, None)
            values.ValueClass = values.MutexValue
        if _mode is not None and _mode != wanted:
            instruments.cache_clear()
        _mode = wanted


def configure_from_environment() -> None:
    """``configure`` with what the process inherited (a service's worker, its signer)."""
    configure(os.environ.get(MULTIPROC_ENV) or None)


def multiprocess_directory() -> Path | None:
    return Path(_mode) if _mode else None


@dataclass(frozen=True)
class Instruments:
    enrollments: Counter
    refusals: Counter
    issuance: Histogram
    signing: Histogram
    http_requests: Counter
    in_flight: Gauge
    ocsp_requests: Counter
    token_up: Gauge

    def register(self, registry: CollectorRegistry) -> None:
        """Serve this process's own values from ``registry`` (single-process mode: the CRL publisher)."""
        for metric in self.__dict__.values():
            registry.register(metric)


@functools.cache
def instruments() -> Instruments:
    """This process's instruments, made once (after ``configure``); none is in a global registry."""
    if _mode is None:
        configure_from_environment()
    return Instruments(
        enrollments=Counter(
            "chargepki_enrollments",
            "Certificates issued by the enrollment pipeline (EST, CSMS API), by route, environment and profile.",
            ["route", "environment", "profile"],
            registry=None,
        ),
        refusals=Counter(
            "chargepki_enrollment_refusals",
            "Enrollment requests refused by the pipeline, by route, environment, profile and refusal code.",
            ["route", "environment", "profile", "code"],
            registry=None,
        ),
        issuance=Histogram(
            "chargepki_issuance_seconds",
            "Time to issue one certificate: reservation, token signature, record and commit.",
            ["profile"],
            buckets=ISSUANCE_BUCKETS,
            registry=None,
        ),
        signing=Histogram(
            "chargepki_token_sign_seconds",
            "Time of one signature by the PKCS#11 token, waiting for the process's token lock included.",
            ["mechanism"],
            buckets=SIGNING_BUCKETS,
            registry=None,
        ),
        http_requests=Counter(
            "chargepki_http_requests",
            "HTTP requests answered by the EST and CSMS API application, by URL rule, method and status.",
            ["route", "method", "status"],
            registry=None,
        ),
        in_flight=Gauge(
            "chargepki_http_requests_in_flight",
            "Requests being answered by the EST and CSMS API workers now.",
            ["service"],
            multiprocess_mode="livesum",
            registry=None,
        ),
        ocsp_requests=Counter(
            "chargepki_ocsp_requests",
            "OCSP requests answered by the responder, by OCSP response status and where the answer came from "
            "(cache: this worker's memory; store: the database; signer: signed on demand; none: an error status).",
            ["status", "source"],
            registry=None,
        ),
        token_up=Gauge(
            "chargepki_token_up",
            "1 when the PKCS#11 token answered the signing processes' session check (the least over them).",
            ["token"],
            multiprocess_mode="livemin",
            registry=None,
        ),
    )


class Recorder:
    """The ``ca.observe.Observer`` of a serving process: core events into this process's instruments."""

    def enrollment(self, route: str, environment: str, profile: str, code: str | None) -> None:
        parts = instruments()
        if code is None:
            parts.enrollments.labels(route, environment, profile).inc()
        else:
            parts.refusals.labels(route, environment, profile, code).inc()

    def issued(self, profile: str, seconds: float) -> None:
        instruments().issuance.labels(profile).observe(seconds)

    def signed(self, mechanism: str, seconds: float) -> None:
        instruments().signing.labels(mechanism).observe(seconds)


RECORDER = Recorder()


def watch_token(label: str, token: Callable[[], Token], every: float = TOKEN_CHECK_SECONDS) -> threading.Thread:
    """Check this process's token every ``every`` seconds (``Token.check``: a few random bytes on the
    logged-in session) into ``chargepki_token_up``, from a daemon thread. Only processes that sign
    run it, so no other process needs the PIN. ``token`` opens (or returns) the process's token."""
    gauge = instruments().token_up.labels(label)

    def check() -> None:
        up: int | None = None
        while True:
            try:
                token().check()
                now = 1
            except ChargepkiError as exc:
                if up != 0:  # once per change (the service audits token.unavailable with the reason)
                    log.warning("token %s does not answer: %s", label, exc)
                now = 0
            except Exception:
                log.exception("token check failed")
                now = 0
            gauge.set(now)
            up = now
            time.sleep(every)

    thread = threading.Thread(target=check, name="metrics-token-check", daemon=True)
    thread.start()
    return thread


def record_core_events() -> None:
    """Configure this process from its environment and observe the core's events (idempotent)."""
    configure_from_environment()
    observe.register(RECORDER)
