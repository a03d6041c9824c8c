"""Values read at a scrape: from the store (indexed queries) and from the publication directory.

Computed by the listener (never a request worker), at most every ``[metrics] cache_seconds``; the
scrapes in between get the values of the last computation, and concurrent scrapes wait for one
computation instead of each running the queries. What each service's listener reads:

- ``est``: certificates expiring within 7, 30 and 90 days per environment and profile, active
  lockouts per key kind, the progress of open re-enrollment campaigns;
- ``ocsp``: the least remaining validity of the stored responses the refresher keeps current;
- ``crl``: number, age, remaining validity and size of each active CA's published CRL.

The token's health is not read here: the processes that sign check their own token
(``metrics.instruments.watch_token``), so no listener needs the PIN.

Costs at 1,000,000 certificate rows: ``bench/metrics_cost.py`` (docs/performance.md).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, exists, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ca.enrollment.auth_limits import ADDRESS, API_CERTIFICATE, API_TOKEN, CERTIFICATE, DEVICE
from ca.errors import ChargepkiError
from ca.kinds import CaStatus, CertStatus
from ca.registry.campaigns import STATES, progress
from ca.store.engine import Store
from ca.store.models import AuthFailure, Authority, Campaign, Certificate, OcspResponse

log = logging.getLogger(__name__)

EXPIRY_WINDOWS = (7, 30, 90)  # days
LOCKOUT_KINDS = (DEVICE, CERTIFICATE, ADDRESS, API_TOKEN, API_CERTIFICATE)
# Responses whose nextUpdate passed longer ago than this are not looked at one by one (below).
OCSP_LOOKBACK = timedelta(days=1)
# Campaign progress reads every member's certificates (bench/metrics_cost.py: seconds for 100,000 devices);
# campaigns run for weeks, so it is recomputed in the background at most this often, whatever
# cache_seconds says, and a scrape never waits for it (it serves the last result).
CAMPAIGN_SECONDS = 300.0

_CERTIFICATES = Certificate.__table__
_RESPONSES = OcspResponse.__table__


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- the queries -------------------------------------------------------------------------------------
def environments(session: Session) -> dict[int, tuple[str, str, str]]:
    """Every CA: id → (name, environment, status). A small table."""
    rows = session.execute(select(Authority.id, Authority.name, Authority.environment, Authority.status))
    return {row.id: (row.name, row.environment, row.status) for row in rows}


def expiring_certificates(
    session: Session, now: datetime, cas: dict[int, tuple[str, str, str]]
) -> dict[tuple[str, str], list[int]]:
    """(environment, profile) → certificates expiring within each of ``EXPIRY_WINDOWS`` days.

    Valid certificates not superseded by a renewal (``revoke_after`` is set when one was): what
    needs renewing. One range of ``ix_certificates_status_not_after`` (status, not_after, and since
    migration 0012 the grouped columns, so the index alone answers), grouped: the cost grows with
    the certificates expiring within 90 days, not with the table.
    """
    c = _CERTIFICATES.c
    horizon = now + timedelta(days=EXPIRY_WINDOWS[-1])
    within = [func.sum(case((c.not_after <= now + timedelta(days=days), 1), else_=0)) for days in EXPIRY_WINDOWS[:-1]]
    query = (
        select(c.authority_id, c.profile, *within, func.count())
        .where(c.status == CertStatus.VALID, c.not_after > now, c.not_after <= horizon, c.revoke_after.is_(None))
        .group_by(c.authority_id, c.profile)
    )
    counts: dict[tuple[str, str], list[int]] = {}
    for authority_id, profile, *numbers in session.execute(query):
        environment = cas.get(authority_id, ("", "unknown", ""))[1]
        totals = counts.setdefault((environment, profile), [0] * len(EXPIRY_WINDOWS))
        for i, number in enumerate(numbers):
            totals[i] += int(number or 0)
    return counts


def active_lockouts(session: Session, now: datetime) -> dict[str, int]:
    """Keys locked out now, per kind (``auth_failures``: rows of the current failure window only)."""
    counts = dict.fromkeys(LOCKOUT_KINDS, 0)
    rows = session.execute(
        select(AuthFailure.kind, func.count()).where(AuthFailure.locked_until > now).group_by(AuthFailure.kind)
    )
    for kind, number in rows:
        counts[kind] = int(number)
    return counts


def open_campaigns(session: Session, now: datetime) -> list[tuple[Campaign, dict[str, int]]]:
    """Campaigns whose old CA still stands (a retired one has nothing left to move), with their devices
    per state, read without enlisting anyone (``campaigns.progress(enlist=False)``)."""
    campaigns = session.scalars(
        select(Campaign)
        .join(Authority, Authority.id == Campaign.from_authority_id)
        .where(Authority.status == CaStatus.ACTIVE)
        .order_by(Campaign.id)
    ).all()
    found = []
    for campaign in campaigns:
        states = dict.fromkeys(STATES, 0)
        for device in progress(session, campaign, lambda: now, enlist=False).devices:
            states[device.state] += 1
        found.append((campaign, states))
    return found


def ocsp_least_remaining(session: Session, now: datetime) -> float | None:
    """Seconds until the earliest nextUpdate among the stored responses of unexpired certificates.

    The refresher re-signs a response at half its life, so this stays above half the validity
    while it works. Responses of expired certificates are no longer refreshed (and never deleted),
    so a plain ``min(next_update)`` would be stuck in the past after the first certificate expires:
    the responses are walked in ``ix_ocsp_responses_next_update`` order from ``now - OCSP_LOOKBACK``,
    each probing its certificate by the unique serial, until the first one whose certificate is
    unexpired. The walk passes only the responses of certificates that expired recently. When it
    finds none, every current response is older than the lookback (or there are none): then the
    plain minimum is reported, which is at least that old.
    """
    walk = (
        select(_RESPONSES.c.next_update)
        .where(
            _RESPONSES.c.next_update >= now - OCSP_LOOKBACK,
            exists().where(_CERTIFICATES.c.serial == _RESPONSES.c.serial, _CERTIFICATES.c.not_after > now),
        )
        .order_by(_RESPONSES.c.next_update)
        .limit(1)
    )
    earliest = session.execute(walk).scalar()
    if earliest is None:
        earliest = session.execute(select(func.min(_RESPONSES.c.next_update))).scalar()
    if earliest is None:
        return None
    return (_aware(earliest) - now).total_seconds()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class CrlFacts:
    ca: str
    environment: str
    number: int | None
    this_update: datetime | None
    next_update: datetime | None
    size: int | None  # bytes; None: no readable CRL file


class CrlFiles:
    """The published CRLs of a directory, parsed once per file version (size and modification time)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._parsed: dict[str, tuple[tuple[int, int], CrlFacts]] = {}

    def facts(self, ca: str, environment: str) -> CrlFacts:
        path = self.directory / f"{ca}.crl"
        try:
            info = path.stat()
            version = (info.st_size, info.st_mtime_ns)
            known = self._parsed.get(ca)
            if known is not None and known[0] == version:
                return known[1]
            crl = x509.load_der_x509_crl(path.read_bytes())
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except (OSError, ValueError, x509.ExtensionNotFound):
            return CrlFacts(ca, environment, None, None, None, None)
        facts = CrlFacts(ca, environment, number, crl.last_update_utc, crl.next_update_utc, info.st_size)
        self._parsed[ca] = (version, facts)
        return facts


def published_crls(session: Session, files: CrlFiles, cas: dict[int, tuple[str, str, str]]) -> list[CrlFacts]:
    """Each active CA's CRL as published (what relying parties download), in the CAs' order."""
    return [
        files.facts(name, environment)
        for _, (name, environment, status) in sorted(cas.items())
        if status == CaStatus.ACTIVE
    ]


# -- the collector ------------------------------------------------------------------------------------
def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


class StoreCollector(Collector):
    """The store-derived metrics of one service, computed at a scrape at most every ``cache_seconds``."""

    def __init__(
        self,
        service: str,
        store: Store,
        *,
        cache_seconds: float,
        publication_dir: Path | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.service = service
        self.store = store
        self.cache_seconds = cache_seconds
        self.crl_files = CrlFiles(publication_dir) if publication_dir is not None else None
        self.now = now
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._at = -math.inf
        self._campaigns: list[tuple[int, str, int, int, dict[str, int]]] = []
        self._campaigns_at = -math.inf
        self._campaigns_running = False

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # one computation at a time; the scrapes waiting for it get its result
            if time.monotonic() - self._at >= self.cache_seconds:
                self._cached = self._compute()
                self._at = time.monotonic()
            families = list(self._cached)
        yield from families

    def _compute(self) -> list[Metric]:
        started = time.perf_counter()
        now = self.now()
        up = _gauge("chargepki_store_up", "1 when the last scrape-time queries of the store succeeded.", [])
        try:
            with self.store.session() as session:
                families = list(self._families(session, now))
        except (SQLAlchemyError, ChargepkiError) as exc:
            log.warning("metrics: cannot read the store: %s", str(exc).splitlines()[0] if str(exc) else exc)
            families = []
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        took = _gauge(
            "chargepki_metrics_collect_seconds", "How long the last computation of the store-derived values took.", []
        )
        took.add_metric([], time.perf_counter() - started)
        return [*families, up, took]

    def _families(self, session: Session, now: datetime) -> Iterable[Metric]:
        cas = environments(session)
        if self.service == "est":
            yield from self._est(session, now, cas)
        elif self.service == "ocsp":
            remaining = ocsp_least_remaining(session, now)
            if remaining is not None:
                family = _gauge(
                    "chargepki_ocsp_response_min_remaining_seconds",
                    "Seconds until the earliest nextUpdate of the stored OCSP responses of unexpired certificates "
                    "(negative: past it).",
                    [],
                )
                family.add_metric([], remaining)
                yield family
        elif self.service == "crl" and self.crl_files is not None:
            yield from self._crl(session, now, cas)

    def _est(self, session: Session, now: datetime, cas: dict[int, tuple[str, str, str]]) -> Iterable[Metric]:
        expiring = _gauge(
            "chargepki_certificates_expiring",
            "Valid certificates not yet superseded by a renewal that expire within the given number of days.",
            ["environment", "profile", "days"],
        )
        for (environment, profile), counts in sorted(expiring_certificates(session, now, cas).items()):
            for days, count in zip(EXPIRY_WINDOWS, counts, strict=True):
                expiring.add_metric([environment, profile, str(days)], count)
        yield expiring
        lockouts = _gauge(
            "chargepki_auth_lockouts",
            "Keys locked out now for failed authentications, per kind (device, cert, address, token, csmscert).",
            ["kind"],
        )
        for kind, count in active_lockouts(session, now).items():
            lockouts.add_metric([kind], count)
        yield lockouts
        devices = _gauge(
            "chargepki_campaign_devices",
            "Devices of each open re-enrollment campaign by state (reenrolled, pending, failed).",
            ["campaign", "environment", "from_ca", "to_ca", "state"],
        )
        if time.monotonic() - self._campaigns_at >= CAMPAIGN_SECONDS and not self._campaigns_running:
            self._campaigns_running = True
            threading.Thread(target=self._count_campaigns, name="metrics-campaigns", daemon=True).start()
        for campaign, environment, from_id, to_id, states in self._campaigns:
            names = (cas.get(from_id, ("?",))[0], cas.get(to_id, ("?",))[0])
            for state, count in states.items():
                devices.add_metric([str(campaign), environment, *names, state], count)
        yield devices

    def _count_campaigns(self) -> None:
        """The open campaigns' devices by state, in a thread of its own (its own session)."""
        try:
            with self.store.session() as session:
                self._campaigns = [
                    (c.id, c.environment, c.from_authority_id, c.to_authority_id, states)
                    for c, states in open_campaigns(session, self.now())
                ]
        except (SQLAlchemyError, ChargepkiError) as exc:
            log.warning("metrics: cannot read the campaigns: %s", str(exc).splitlines()[0] if str(exc) else exc)
        finally:
            self._campaigns_at = time.monotonic()
            self._campaigns_running = False

    def _crl(self, session: Session, now: datetime, cas: dict[int, tuple[str, str, str]]) -> Iterable[Metric]:
        assert self.crl_files is not None
        labels = ["ca", "environment"]
        number = _gauge("chargepki_crl_number", "CRL number of each active CA's published CRL.", labels)
        age = _gauge(
            "chargepki_crl_age_seconds",
            "Seconds since thisUpdate of each active CA's published CRL (+Inf: no readable CRL published).",
            labels,
        )
        remaining = _gauge(
            "chargepki_crl_remaining_seconds", "Seconds until nextUpdate of each active CA's published CRL.", labels
        )
        size = _gauge("chargepki_crl_size_bytes", "Size of each active CA's published CRL (DER).", labels)
        for facts in published_crls(session, self.crl_files, cas):
            key = [facts.ca, facts.environment]
            if facts.this_update is None:
                age.add_metric(key, math.inf)
                continue
            age.add_metric(key, (now - facts.this_update).total_seconds())
            if facts.number is not None:
                number.add_metric(key, facts.number)
            if facts.next_update is not None:
                remaining.add_metric(key, (facts.next_update - now).total_seconds())
            if facts.size is not None:
                size.add_metric(key, facts.size)
        yield from (number, age, remaining, size)
