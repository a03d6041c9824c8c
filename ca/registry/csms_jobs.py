"""Asynchronous signing for the CSMS API: durable jobs, claimed atomically, signed at most once.

OCPP makes the CSMS answer ``SignCertificate`` with Accepted before the CA has decided, so a CSMS
may hand us the CSR and poll. A job is a row: any worker of any process claims it with one
conditional ``UPDATE`` (so two workers never both take it), and marks it signed in the very
transaction that records the certificate, conditionally on still holding the claim. A worker that
dies leaves its job ``running``; once the claim is older than the lease, another worker takes it
over, and should the first one wake up after all, its completion finds the claim gone and its
certificate is abandoned (``aborted``) instead of handed out: one job, at most one certificate.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ca.clock import Clock, utcnow
from ca.enrollment.policy import EnrollmentSettings
from ca.errors import ChargepkiError, ConfigError, ConflictError, NotFoundError, StoreError, TokenError, one_line
from ca.issuance.csr import load_csr
from ca.kinds import JobState
from ca.registry.csms import Caller, caller_for, check_certificate_type, check_root, sign
from ca.store.models import Authority, Certificate, CsmsSignJob
from ca.work import Work

_DEFAULT_SETTINGS = EnrollmentSettings()
LEASE = timedelta(minutes=2)  # a claim older than this belongs to a worker presumed dead
RETRY_DELAY = timedelta(seconds=15)  # after the token or the database failed: try again, not at once
MAX_ATTEMPTS = 5
_JOBS = CsmsSignJob.__table__


def enqueue(
    session: Session,
    caller: Caller,
    charging_station_id: str,
    certificate_type: str,
    csr: str,
    *,
    request_id: int | None = None,
    root: Authority | None = None,
    now: Clock = utcnow,
) -> CsmsSignJob:
    """Store a request to be signed; what can be refused at once (type, a root of the wrong kind, an
    unreadable CSR) is refused now. ``request_id`` (OCPP 2.1) is kept to be echoed when the job is read;
    ``root`` (OCPP 2.1 ``hashRootCertificate``) is checked again when the job is signed."""
    check_certificate_type(session, caller, certificate_type)
    if root is not None:
        check_root(session, caller, certificate_type, root)
    load_csr(csr.encode("utf-8"))
    job = CsmsSignJob(
        public_id=secrets.token_hex(16),
        client_id=caller.client_id,
        charging_station_id=charging_station_id,
        certificate_type=certificate_type,
        csr=csr,
        request_id=request_id,
        root_id=root.id if root is not None else None,
        state=JobState.QUEUED,
        attempts=0,
        created_at=now(),
    )
    session.add(job)
    session.commit()
    return job


def get_job(session: Session, caller: Caller, public_id: str) -> CsmsSignJob:
    """A job of this CSMS (another CSMS's job is as unknown as a job that never existed)."""
    job = session.scalar(
        select(CsmsSignJob)
        .where(CsmsSignJob.public_id == public_id, CsmsSignJob.client_id == caller.client_id)
        .execution_options(populate_existing=True)
    )
    if job is None:
        raise NotFoundError(f"no signing job {public_id[:40]!r}", code="unknown_job")
    return job


def job_certificate(session: Session, job: CsmsSignJob) -> Certificate:
    certificate = session.get(Certificate, job.certificate_id) if job.certificate_id is not None else None
    if certificate is None:
        raise NotFoundError("the job's certificate is missing")
    return certificate


def _claimable(now: Clock, lease: timedelta, retry_delay: timedelta):  # type: ignore[no-untyped-def]
    at = now()
    return or_(
        and_(
            _JOBS.c.state == JobState.QUEUED, or_(_JOBS.c.claimed_at.is_(None), _JOBS.c.claimed_at <= at - retry_delay)
        ),
        and_(_JOBS.c.state == JobState.RUNNING, _JOBS.c.claimed_at <= at - lease),
    )


def claim_next(
    session: Session,
    *,
    now: Clock = utcnow,
    lease: timedelta = LEASE,
    retry_delay: timedelta = RETRY_DELAY,
) -> CsmsSignJob | None:
    """Take the oldest job nobody holds (or whose holder's lease ran out); None when there is none.

    The claim is a conditional UPDATE: of several workers racing for a job exactly one sees
    ``rowcount == 1`` (PostgreSQL re-checks the condition on the row it waited for; SQLite
    serialises writers), the others move on to the next candidate.
    """
    candidates = session.scalars(
        select(_JOBS.c.id).where(_claimable(now, lease, retry_delay)).order_by(_JOBS.c.id).limit(8)
    ).all()
    session.commit()
    for job_id in candidates:
        claim = secrets.token_hex(16)
        taken = session.execute(
            update(_JOBS)
            .where(_JOBS.c.id == job_id, _claimable(now, lease, retry_delay))
            .values(state=JobState.RUNNING, claim=claim, claimed_at=now(), attempts=_JOBS.c.attempts + 1)
        )
        session.commit()
        if taken.rowcount == 1:
            job = session.scalar(
                select(CsmsSignJob).where(CsmsSignJob.id == job_id).execution_options(populate_existing=True)
            )
            session.commit()  # end the read: on SQLite every transaction holds the write lock
            return job
    return None


def process(
    work: Work,
    *,
    job: CsmsSignJob,
    settings: EnrollmentSettings = _DEFAULT_SETTINGS,
    max_attempts: int = MAX_ATTEMPTS,
) -> str:
    """Decide a claimed job: ``signed``, ``refused`` (with the reason), ``retry`` (CA unavailable) or
    ``lost`` (another worker took it over meanwhile).

    Signing runs the enrollment pipeline (``csms.sign``), which owns the issuing transactions and
    marks the job signed in the last of them; the job's own bookkeeping after a failure (requeue,
    refusal) is a transaction of this function's."""
    session, now = work.session, work.now
    claim = job.claim

    def mark_signed(tx: Session, row: Certificate) -> None:
        done = tx.execute(
            update(_JOBS)
            .where(_JOBS.c.id == job.id, _JOBS.c.claim == claim, _JOBS.c.state == JobState.RUNNING)
            .values(state=JobState.SIGNED, certificate_id=row.id, finished_at=now(), claim=None)
        )
        if done.rowcount != 1:
            raise ConflictError("another worker took this signing job over", code="job_reclaimed")

    try:
        caller = caller_for(session, job.client_id)
        root = session.get(Authority, job.root_id) if job.root_id is not None else None
        sign(
            work,
            caller=caller,
            charging_station_id=job.charging_station_id,
            certificate_type=job.certificate_type,
            csr=job.csr.encode("utf-8"),
            settings=settings,
            before_commit=mark_signed,
            root=root,
        )
    except (TokenError, StoreError, ConfigError, SQLAlchemyError) as exc:
        session.rollback()
        if job.attempts >= max_attempts:
            _finish(session, job.id, claim, now, reason="ca_unavailable", error=one_line(exc))
            return "refused"
        session.execute(
            update(_JOBS).where(_JOBS.c.id == job.id, _JOBS.c.claim == claim).values(state=JobState.QUEUED, claim=None)
        )
        session.commit()
        return "retry"
    except ChargepkiError as exc:
        session.rollback()
        if exc.code == "job_reclaimed":
            return "lost"
        _finish(session, job.id, claim, now, reason=exc.code, error=str(exc))
        return "refused"
    return "signed"


def _finish(session: Session, job_id: int, claim: str | None, now: Clock, *, reason: str, error: str) -> None:
    session.execute(
        update(_JOBS)
        .where(_JOBS.c.id == job_id, _JOBS.c.claim == claim, _JOBS.c.state == JobState.RUNNING)
        .values(state=JobState.REFUSED, reason=reason[:64], error=error[:512], finished_at=now(), claim=None)
    )
    session.commit()
