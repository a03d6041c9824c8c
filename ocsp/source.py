"""Where the keyless responder finds answers: the store, behind a per-process cache.

The cache never outlives a response's nextUpdate, holds an entry at most ``TTL`` seconds
(so a refreshed response is picked up), and is emptied whenever the status feed moves: a
watcher thread polls the one-row counter (SQLite) or LISTENs for the NOTIFY sent at commit
(PostgreSQL), so a revocation reaches every responder process within a second.

While the store is unreachable, an entry past its TTL is still served until its nextUpdate
(stale-if-error: the same signed bytes a client may itself cache that long, better than
``tryLater``); the cache is emptied once the store is back, since changes may have been missed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ca.issuance.serials import format_serial
from ca.kinds import CaStatus
from ca.status.signal import CHANNEL_SQL
from ca.store.engine import Store
from ca.store.models import Authority, StatusFeed
from ocsp.certid import CertId, issuer_hashes
from ocsp.signing import etag

log = logging.getLogger(__name__)

TTL = 60.0  # seconds an entry may be served from memory without a change signal
POLL_INTERVAL = 0.1  # seconds between counter reads on SQLite (a one-row primary-key read)
LISTEN_TIMEOUT = 1.0  # PostgreSQL: also read the counter this often, in case a NOTIFY was missed


class SourceUnavailable(Exception):
    """The store cannot be read: answered with ``tryLater``."""


@dataclass(frozen=True)
class Stored:
    """A response ready to serve, with what its HTTP caching headers need."""

    der: bytes
    etag: str
    this_update: float  # Unix seconds
    next_update: float
    last_modified: str  # HTTP-date
    expires: str


def stored(der: bytes, this_update: datetime, next_update: datetime) -> Stored:
    return Stored(
        der,
        etag(der),
        this_update.timestamp(),
        next_update.timestamp(),
        format_datetime(this_update, usegmt=True),
        format_datetime(next_update, usegmt=True),
    )


IssuerKey = tuple[str, bytes, bytes]  # (hash algorithm, issuerNameHash, issuerKeyHash)


class StoreSource:
    """Served issuers and pre-signed responses, read from the database (no key, no token)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._local = threading.local()
        marker = "?" if store.is_sqlite else "%s"
        self._lookup = (
            "SELECT der, this_update, next_update FROM ocsp_responses "
            f"WHERE authority_id = {marker} AND serial = {marker} AND hash_algorithm = {marker}"
        )
        self._dbapi_error: type[Exception] = store.engine.dialect.dbapi.Error  # type: ignore[union-attr]

    def issuers(self) -> dict[IssuerKey, int]:
        """Every CA in the store under every CertID hash, to its id (retired CAs still answer;
        external ones, an imported V2G root, are answered by their own operator: unauthorized)."""
        query = select(Authority.id, Authority.certificate_der).where(Authority.status != CaStatus.EXTERNAL)
        with self.store.engine.connect() as connection:
            rows = connection.execute(query).all()
        served: dict[IssuerKey, int] = {}
        for authority_id, der in rows:
            for hashes in issuer_hashes(x509.load_der_x509_certificate(der)):
                served[(hashes.hash_algorithm, hashes.name_hash, hashes.key_hash)] = authority_id
        return served

    def response(self, authority_id: int, serial: int, algorithm: str) -> Stored | None:
        """One indexed lookup on a DBAPI connection kept per thread.

        Written against the DBAPI because SQLAlchemy's statement handling cost ~220 µs per miss
        against ~8 µs for the query itself (measured by the OCSP benchmark).
        """
        connection = getattr(self._local, "connection", None)
        try:
            if connection is None:
                connection = self._local.connection = self.store.engine.raw_connection()
                if not self.store.is_sqlite:
                    connection.driver_connection.autocommit = True  # type: ignore[union-attr]
            cursor = connection.cursor()
            try:
                cursor.execute(self._lookup, (authority_id, format_serial(serial), algorithm))
                row = cursor.fetchone()
            finally:
                cursor.close()
        except self._dbapi_error as exc:
            self._local.connection = None
            with suppress(Exception):
                connection.invalidate()  # type: ignore[union-attr]
            raise SourceUnavailable(str(exc)) from None
        if row is None:
            return None
        return stored(bytes(row[0]), _utc(row[1]), _utc(row[2]))

    def counter(self) -> int:
        with self.store.engine.connect() as connection:
            return int(connection.execute(select(StatusFeed.counter).where(StatusFeed.id == 1)).scalar_one())


def _utc(value: datetime | str) -> datetime:
    """Stored naive UTC (SQLite hands back text through the DBAPI) → aware UTC."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC)


class CachedSource:
    """``StoreSource`` behind a bounded in-memory cache that a watcher thread empties on every change."""

    def __init__(self, source: StoreSource, *, max_entries: int = 50_000, ttl: float = TTL) -> None:
        self.source = source
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: dict[tuple[int, int, str], tuple[Stored, float]] = {}
        self._issuers: dict[IssuerKey, int] | None = None
        self._generation = 0
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._watcher_pid = 0
        self._stop = threading.Event()
        self._lost = False  # the watcher lost the store: empty the cache when it is back
        self.last_change = 0.0

    # -- lookups (request threads) ---------------------------------------------------------------
    def authority_for(self, cert_id: CertId) -> int | None:
        self._ensure_watcher()
        issuers = self._issuers
        if issuers is None:
            generation = self._generation
            try:
                issuers = self.source.issuers()
            except SQLAlchemyError as exc:
                raise SourceUnavailable(str(exc)) from None
            if generation == self._generation:
                self._issuers = issuers
        return issuers.get((cert_id.hash_algorithm, cert_id.issuer_name_hash, cert_id.issuer_key_hash))

    def response(self, authority_id: int, cert_id: CertId) -> Stored | None:
        return self.lookup(authority_id, cert_id)[0]

    def lookup(self, authority_id: int, cert_id: CertId) -> tuple[Stored | None, bool]:
        """The stored response, and whether it came from this process's memory (a cache hit)."""
        key = (authority_id, cert_id.serial_number, cert_id.hash_algorithm)
        now = time.time()
        hit = self._entries.get(key)
        if hit is not None and now < hit[1]:
            return hit[0], True
        generation = self._generation
        try:
            found = self.source.response(*key)
        except (SourceUnavailable, SQLAlchemyError) as exc:
            if hit is not None and now < hit[0].next_update:
                return hit[0], True  # stale-if-error: still within its own validity
            raise SourceUnavailable(str(exc)) from None
        if found is None or found.next_update <= now:
            return None, False  # past nextUpdate is never served: the on-demand signer answers instead
        with self._lock:
            # A change signalled while we read may have made ``found`` stale: then do not keep it.
            if generation == self._generation:
                if len(self._entries) >= self.max_entries:
                    self._entries.pop(next(iter(self._entries)))  # oldest first (insertion order)
                self._entries[key] = (found, min(found.next_update, now + self.ttl))
        return found, False

    # -- invalidation (watcher thread) -----------------------------------------------------------
    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries = {}
            self._issuers = None
        self.last_change = time.time()

    def _ensure_watcher(self) -> None:
        if self._watcher is not None and self._watcher_pid == os.getpid():
            return
        with self._lock:
            if self._watcher is not None and self._watcher_pid == os.getpid():
                return
            self._entries, self._issuers = {}, None  # whatever a parent process cached is not ours
            self._watcher_pid = os.getpid()
            self._watcher = threading.Thread(target=self._watch, name="ocsp-status-watcher", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        """Stop the watcher (at its next poll or NOTIFY timeout); the cache is not used afterwards."""
        self._stop.set()

    def _watch(self) -> None:
        store = self.source.store
        last: int | None = None
        while not self._stop.is_set():
            try:
                if store.is_sqlite:
                    last = self._poll(last)
                    self._stop.wait(POLL_INTERVAL)
                else:
                    last = self._listen(store.engine, last)
            except Exception as exc:
                log.warning("status watcher: %s; retrying", str(exc).splitlines()[0] if str(exc) else exc)
                # Keep the cache (served until nextUpdate while the store is away) and empty it at
                # the first successful read instead, since changes may have been missed meanwhile.
                self._lost = True
                self._stop.wait(1.0)

    def _poll(self, last: int | None) -> int:
        counter = self.source.counter()
        if (last is not None and counter != last) or self._lost:
            self._lost = False
            self.invalidate()
        return counter

    def _listen(self, engine: Engine, last: int | None) -> int | None:
        raw = engine.raw_connection()
        try:
            connection = raw.driver_connection
            connection.autocommit = True  # type: ignore[union-attr]
            channel = connection.execute(f"SELECT {CHANNEL_SQL}").fetchone()[0]  # type: ignore[union-attr]
            connection.execute(f'LISTEN "{channel}"')  # type: ignore[union-attr]
            last = self._poll(last)
            while not self._stop.is_set():
                notified = False
                for _ in connection.notifies(timeout=LISTEN_TIMEOUT, stop_after=1):  # type: ignore[union-attr]
                    notified = True
                if notified:
                    self.invalidate()
                last = self._poll(last)
            return last
        finally:
            raw.invalidate()  # never hand a LISTENing connection back to the pool
