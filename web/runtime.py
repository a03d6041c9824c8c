"""What one web worker holds between requests: one typed object, made by the app factory.

A gunicorn worker serves requests in several threads and runs the CSMS API's job runner in one
more; all of them share the worker's :class:`WorkerRuntime`: the opened installation, the EST
settings and the enrollment settings derived from them, the OCSP pre-signer, the CAs bound to
their token keys, the cache of EST labels, the sweep timer and the job runner. Parts that need
the token (the pre-signer, bound CAs) are made at first use, because a worker must boot and
answer 503 while the token is away; each is made once, under the runtime's lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, cast

from flask import Flask, current_app
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ca.authorities.issuers import Issuer, issuer_for
from ca.config import EstSettings
from ca.context import Pki
from ca.enrollment.auth_limits import AuthLimits
from ca.enrollment.pipeline import EnrollmentSettings
from ca.issuance.flow import abandon_stale_pending
from ca.registry.csms import Caller, record_call
from ca.status.revocation import revoke_due
from ca.store.group_commit import GroupCommit
from ca.store.models import Authority
from ca.work import Work
from ocsp.chain_status import ChainStatus
from ocsp.ocpp import OcppOcsp
from ocsp.presign import Presigner, policy_from

if TYPE_CHECKING:
    from web.api import JobRunner

log = logging.getLogger("chargepki.web")
AUTHORITY_TTL = 10.0  # seconds a worker keeps a label's CA: a CA added or retired is seen within this time
SWEEP_INTERVAL = 30.0  # seconds between a worker's sweeps (superseded certificates, stale reservations)
SWEEP_ACTOR = "system:est"


def enrollment_settings(settings: EstSettings) -> EnrollmentSettings:
    """The enrollment rules (re-enrollment grace, tls-unique, lockouts) of the EST settings."""
    return EnrollmentSettings(
        supersede_grace=timedelta(seconds=settings.supersede_grace_seconds),
        require_tls_unique=settings.require_tls_unique,
        limits=AuthLimits(
            max_failures_per_device=settings.auth_max_failures_per_device,
            max_failures_per_address=settings.auth_max_failures_per_address,
            window=timedelta(seconds=settings.auth_failure_window_seconds),
            lockout=timedelta(seconds=settings.auth_lockout_seconds),
        ),
    )


@dataclass(eq=False)
class WorkerRuntime:
    """The per-worker state of the EST + CSMS API application (thread-safe)."""

    pki: Pki
    settings: EstSettings
    enrollment: EnrollmentSettings
    jobs: JobRunner | None = None  # the asynchronous signer of the serving processes
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _status: Presigner | None = field(default=None, repr=False)
    _ocpp_ocsp: OcppOcsp | None = field(default=None, repr=False)
    _chain_status: ChainStatus | None = field(default=None, repr=False)
    _issuers: dict[tuple[int, str], Issuer] = field(default_factory=dict, repr=False)
    _authorities: dict[str | None, tuple[float, Authority]] = field(default_factory=dict, repr=False)
    _last_sweep: float = field(default=0.0, repr=False)
    _commits: GroupCommit | None = field(default=None, repr=False)

    @classmethod
    def create(cls, pki: Pki, settings: EstSettings) -> WorkerRuntime:
        return cls(pki=pki, settings=settings, enrollment=enrollment_settings(settings))

    # -- signing -------------------------------------------------------------------------------------
    def status(self) -> Presigner:
        """Pre-signs the OCSP responses of what this worker issues and revokes (one per worker)."""
        if self._status is None:
            with self._lock:
                if self._status is None:
                    self._status = Presigner(self.pki.token(), policy_from(self.pki.config.ocsp))
        return self._status

    def issuer(self, authority: Authority) -> Issuer:
        """The CA bound to its token key, kept per worker: binding costs token lookups and a parse."""
        key = (authority.id, authority.key_label)
        found = self._issuers.get(key)
        if found is None:
            with self._lock:
                found = self._issuers.get(key)
                if found is None:
                    found = self._issuers[key] = issuer_for(authority, self.pki.token())
        return found

    def ocpp_ocsp(self) -> OcppOcsp:
        """OCPP's GetCertificateStatus through the CSMS API: stored responses, else signed now."""
        if self._ocpp_ocsp is None:
            with self._lock:
                if self._ocpp_ocsp is None:
                    self._ocpp_ocsp = OcppOcsp(
                        self.pki.store, self.status(), rate=self.pki.config.ocsp.unknown_per_second
                    )
        return self._ocpp_ocsp

    def chain_status(self) -> ChainStatus:
        """OCPP 2.1's GetCertificateChainStatus: OCSP as ``ocpp_ocsp``, CRLs as published in ``<home>/pki``."""
        if self._chain_status is None:
            ocsp = self.ocpp_ocsp()
            with self._lock:
                if self._chain_status is None:
                    self._chain_status = ChainStatus(ocsp, self.pki.config.home / "pki")
        return self._chain_status

    def commits(self) -> GroupCommit:
        """This worker's group commit: its request threads' issuing transactions, shared (one per worker)."""
        if self._commits is None:
            with self._lock:
                if self._commits is None:
                    self._commits = GroupCommit(self.pki.store.session)
        return self._commits

    def work(self, session: Session, actor: str) -> Work:
        """The context of a core flow run by this worker: its session, the pre-signer, the bound CAs and
        the group commit its writes share with the worker's other requests."""
        return Work(session=session, actor=actor, status=self.status(), issuers=self.issuer, commits=self.commits())

    def audit_call(
        self,
        session: Session,
        caller: Caller | None,
        operation: str,
        *,
        address: str | None,
        subject: str | None,
        outcome: dict[str, object],
        interface: str,
    ) -> None:
        """A CSMS interface call's audit entry (``csms.record_call``), once the view's answer is made.

        Whatever the view read ends first (on SQLite a read transaction holds the writer lock); the
        entry joins the group commit and needs no token, so a call that needed no key is audited
        while the token cannot be opened. A database failure is logged: the answer stands (a
        database that caused it is already a 503)."""
        try:
            session.commit()
            work = Work(session=session, actor=caller.actor if caller else "anonymous", commits=self.commits())
            record_call(work, caller, operation, address=address, subject=subject, outcome=outcome, interface=interface)
        except SQLAlchemyError as exc:
            session.rollback()
            log.warning("could not audit a CSMS %s call: %s", interface, type(exc).__name__)

    # -- EST labels ----------------------------------------------------------------------------------
    def authority(
        self, session: Session, label: str | None, find: Callable[[Session, str | None], Authority]
    ) -> Authority:
        """The CA ``find`` resolves ``label`` to, remembered for AUTHORITY_TTL (failed lookups are not)."""
        cached = self._authorities.get(label)
        if cached is not None and time.monotonic() - cached[0] < AUTHORITY_TTL:
            return cached[1]
        authority = find(session, label)
        # Out of the session at once, with its loaded columns: a rollback of this request (a refusal)
        # would otherwise expire the cached object, and every later request of the worker would fail
        # reading it (DetachedInstanceError, seen as 503s after a burst of refused enrollments).
        session.expunge(authority)
        with self._lock:
            self._authorities[label] = (time.monotonic(), authority)
        return authority

    def forget_authorities(self) -> None:
        """Look every label up again (a CA was revoked or retired since it was cached)."""
        with self._lock:
            self._authorities.clear()

    # -- housekeeping --------------------------------------------------------------------------------
    def sweep(self, session: Session) -> None:
        """At most every SWEEP_INTERVAL per worker: revoke certificates past their re-enrollment grace
        (enrollment already treats them as revoked; the store then says so too), and mark serials
        reserved by a process that died as aborted."""
        with self._lock:
            due = time.monotonic() - self._last_sweep >= SWEEP_INTERVAL
            if due:
                self._last_sweep = time.monotonic()
        if due:
            abandon_stale_pending(session, actor=SWEEP_ACTOR)
            revoke_due(Work(session, "system:supersede", status=self.status()))

    def close(self) -> None:
        """Stop the job runner, then close the installation (gunicorn's worker_exit hook)."""
        if self.jobs is not None:
            self.jobs.close()
        if self._commits is not None:
            self._commits.close()
        self.pki.close()


class WorkerApp(Flask):
    """The Flask application of ``serve est``, carrying its worker's runtime."""

    runtime: WorkerRuntime


def runtime_of(app: Flask) -> WorkerRuntime:
    return cast(WorkerApp, app).runtime


def runtime() -> WorkerRuntime:
    """The runtime of the worker serving the current request (or of the app context pushed)."""
    return runtime_of(current_app)
