"""Where the keyless responder finds answers: the store, behind a per-process cache.

The cache never outlives a response's nextUpdate, holds an entry at most ``TTL`` seconds
(so a refreshed response is picked up), and is emptied whenever the status feed moves: a
watcher thread polls the one-row counter (SQLite; PostgreSQL hot standby, which refuses
``LISTEN``) or LISTENs for the NOTIFY sent at commit (PostgreSQL primary), so a revocation
reaches every responder process within a second. A read of the store that finds the counter
ahead of the cache (a miss read returns the counter with the response) empties it too.

The responder processes of one host agree on what they have seen (``ocsp.host_counter``): a
process publishes a counter before it serves anything read at it, and a process whose cache is
behind the published counter empties it before answering, so once any of them has said
``revoked``, none says ``good`` afterwards.

Losing the store (a stopped server, a silent partition, a standby gone) must neither hang a
request nor keep a revocation from being seen for long:

- every read on PostgreSQL runs under a deadline (``ReadDeadlines``): past it the connection's
  socket is shut down, so the read fails even when TCP alone would wait (a proxy in between keeps
  answering TCP while the server behind it is gone); the first failure opens a circuit and later
  requests do not try the store until the watcher reaches it again;
- the watcher confirms at least every second that nothing changed (a counter read); a cached
  ``good`` (or ``certificateHold``) is served only while the last confirmation is at most
  ``stale_bound`` seconds old, then ``tryLater``; a permanent revocation cannot be undone, so it is
  served until its own nextUpdate; what is not cached is ``tryLater`` at once;
- the loss and the return are logged once each; on return the cache is emptied, since changes
  may have been missed meanwhile.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from cryptography import x509
from cryptography.x509 import ocsp
from sqlalchemy.exc import SQLAlchemyError

from ca.issuance.serials import format_serial
from ca.kinds import CaStatus
from ca.status.signal import CHANNEL_SQL
from ca.store.engine import Store
from ocsp.certid import CertId, issuer_hashes
from ocsp.host_counter import HostCounter
from ocsp.signing import etag

log = logging.getLogger(__name__)

TTL = 60.0  # seconds an entry may be served from memory without a change signal
POLL_INTERVAL = 0.1  # seconds between counter reads on SQLite (a one-row primary-key read)
LISTEN_TIMEOUT = 1.0  # PostgreSQL: also read the counter this often, in case a NOTIFY was missed
STANDBY_POLL = 0.5  # PostgreSQL hot standby (no LISTEN there): seconds between counter reads
STALE_BOUND = 10.0  # seconds after the last confirmation that a cached good may still be served
READ_TIMEOUT = 2.0  # seconds a store read may take before its connection is shut down
RETRY = 1.0  # seconds between the watcher's attempts to reach a lost store


class SourceUnavailable(Exception):
    """The store cannot be read: answered with ``tryLater``."""


@dataclass(frozen=True)
class Stored:
    """A response ready to serve, with what its HTTP caching headers need: always a signed
    (``successful``) response, since only those carry the times the headers are made from."""

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


class ReadTimedOut(Exception):
    """A read ran past its deadline; its connection was shut down."""


class ReadDeadlines:
    """Bounds blocking reads on PostgreSQL connections by shutting their sockets down when late.

    TCP keepalives and ``tcp_user_timeout`` end a connection whose peer vanished, but not one whose
    peer keeps acknowledging while nothing answers (a proxy or pooler in front of a stopped or
    partitioned server), and a server-side ``statement_timeout`` needs the server. A helper thread
    per process looks at the reads in flight every quarter of the timeout and shuts the socket of a
    late one down: libpq then sees the connection end and the read fails. The thread stops after a
    few idle seconds and starts again with the next read (two dictionary operations per read).
    """

    _IDLE = 5.0

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._pid = 0

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._reads: dict[int, tuple[float, int]] = {}  # thread → (deadline, socket descriptor)
        self._tripped: set[int] = set()
        self._running = False

    @contextmanager
    def bounded(self, descriptor: int) -> Iterator[None]:
        """Run the block's read on the connection whose socket is ``descriptor`` under the deadline;
        ``ReadTimedOut`` when it was shut down (the caller discards the connection)."""
        if self._pid != os.getpid():
            self._reset()  # a forked worker: none of the parent's threads or reads are ours
        me = threading.get_ident()
        with self._lock:
            self._reads[me] = (time.monotonic() + self.timeout, descriptor)
            if not self._running:
                self._running = True
                threading.Thread(target=self._watch, name="ocsp-read-deadlines", daemon=True).start()
        try:
            yield
        finally:
            with self._lock:
                self._reads.pop(me, None)
                tripped = me in self._tripped
                self._tripped.discard(me)
            if tripped:
                raise ReadTimedOut(f"no answer from the database within {self.timeout:g} s")

    def _watch(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(max(0.05, self.timeout / 4))
            now = time.monotonic()
            with self._lock:
                if self._reads:
                    idle_since = now
                elif now - idle_since > self._IDLE:
                    self._running = False
                    return
                for thread, (deadline, descriptor) in list(self._reads.items()):
                    if now >= deadline:
                        _shut_down(descriptor)
                        self._tripped.add(thread)
                        del self._reads[thread]


def _shut_down(descriptor: int) -> None:
    """End the connection on ``descriptor`` for everyone using it (a copy of the descriptor is
    shut down and closed; the original stays open for libpq to close)."""
    with suppress(OSError):
        sock = socket.socket(fileno=os.dup(descriptor))
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class StoreSource:
    """Served issuers and pre-signed responses, read from the database (no key, no token).

    Every read goes through a DBAPI connection kept per thread; on PostgreSQL under ``ReadDeadlines``.
    """

    def __init__(self, store: Store, *, read_timeout: float = READ_TIMEOUT) -> None:
        self.store = store
        self._local = threading.local()
        marker = "?" if store.is_sqlite else "%s"
        # The change counter comes with the response, read in the same statement (one snapshot): a
        # response newer than what the cache reflects is known as such (CachedSource.lookup).
        self._lookup = (
            "SELECT r.der, r.this_update, r.next_update, f.counter FROM status_feed f "
            f"LEFT JOIN ocsp_responses r ON r.authority_id = {marker} AND r.serial = {marker} "
            f"AND r.hash_algorithm = {marker} WHERE f.id = 1"
        )
        self._issuers = f"SELECT id, certificate_der FROM authorities WHERE status != {marker}"
        self._counter = "SELECT counter FROM status_feed WHERE id = 1"
        self._dbapi_error: type[Exception] = store.engine.dialect.dbapi.Error  # type: ignore[union-attr]
        self.deadlines = None if store.is_sqlite else ReadDeadlines(read_timeout)

    def issuers(self) -> dict[IssuerKey, int]:
        """Every CA in the store under every CertID hash, to its id (retired CAs still answer;
        external ones, an imported V2G root, are answered by their own operator: unauthorized)."""
        served: dict[IssuerKey, int] = {}
        for authority_id, der in self.read(self._issuers, (CaStatus.EXTERNAL.value,), many=True):
            for hashes in issuer_hashes(x509.load_der_x509_certificate(bytes(der))):
                served[(hashes.hash_algorithm, hashes.name_hash, hashes.key_hash)] = authority_id
        return served

    def response(self, authority_id: int, serial: int, algorithm: str) -> Stored | None:
        return self.response_at(authority_id, serial, algorithm)[0]

    def response_at(self, authority_id: int, serial: int, algorithm: str) -> tuple[Stored | None, int]:
        """One indexed lookup, and the change counter as of that same read (-1: no counter row).

        Written against the DBAPI because SQLAlchemy's statement handling cost ~220 µs per miss
        against ~8 µs for the query itself (measured by the OCSP benchmark).
        """
        row = self.read(self._lookup, (authority_id, format_serial(serial), algorithm))
        if row is None:
            return None, -1
        if row[0] is None:
            return None, int(row[3])
        return stored(bytes(row[0]), _utc(row[1]), _utc(row[2])), int(row[3])

    def counter(self) -> int:
        return int(self.read(self._counter, ())[0])

    def read(self, statement: str, parameters: tuple[Any, ...], *, many: bool = False) -> Any:
        """The first row (or, ``many``, all rows) of ``statement`` on this thread's connection.

        A failure discards the connection and raises ``SourceUnavailable``; a connection that
        failed at once (the server restarted since its last use) is replaced and the read tried
        once more, but never after a deadline ran out (the store is away: do not wait twice).
        """
        for attempt in (1, 2):
            fresh = getattr(self._local, "connection", None) is None
            try:
                return self._read_once(statement, parameters, many)
            except ReadTimedOut as exc:
                raise SourceUnavailable(str(exc)) from None
            except (self._dbapi_error, SQLAlchemyError) as exc:
                if fresh or attempt == 2:
                    raise SourceUnavailable(
                        str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    ) from None
        raise AssertionError("unreachable")

    def _read_once(self, statement: str, parameters: tuple[Any, ...], many: bool) -> Any:
        connection = getattr(self._local, "connection", None)
        try:
            if connection is None:
                connection = self._local.connection = self.store.engine.raw_connection()
                if not self.store.is_sqlite:
                    connection.driver_connection.autocommit = True  # type: ignore[union-attr]
            cursor = connection.cursor()
            try:
                if self.deadlines is None:
                    cursor.execute(statement, parameters)
                    return cursor.fetchall() if many else cursor.fetchone()
                with self.deadlines.bounded(connection.driver_connection.fileno()):  # type: ignore[union-attr]
                    cursor.execute(statement, parameters)
                    return cursor.fetchall() if many else cursor.fetchone()
            finally:
                with suppress(Exception):
                    cursor.close()
        except BaseException:
            self._local.connection = None
            if connection is not None:
                with suppress(Exception):
                    connection.invalidate()  # type: ignore[union-attr]
            raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _utc(value: datetime | str) -> datetime:
    """Stored naive UTC (SQLite hands back text through the DBAPI) → aware UTC."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC)


class CachedSource:
    """``StoreSource`` behind a bounded in-memory cache that a watcher thread empties on every change.

    ``stale_bound``: how long after the watcher's last confirmation a cached ``good`` may be served
    (the store lost); ``standby_poll``: seconds between counter reads on a hot standby; ``clock``:
    monotonic seconds (tests); ``host``: the counter shared with this host's other responder
    processes (None: this process answers alone).
    """

    def __init__(
        self,
        source: StoreSource,
        *,
        max_entries: int = 50_000,
        ttl: float = TTL,
        stale_bound: float = STALE_BOUND,
        standby_poll: float = STANDBY_POLL,
        clock: Callable[[], float] = time.monotonic,
        host: HostCounter | None = None,
    ) -> None:
        self.source = source
        self.host = host
        self.max_entries = max_entries
        self.ttl = ttl
        self.stale_bound = stale_bound
        self.standby_poll = standby_poll
        self.clock = clock
        self._entries: dict[tuple[int, int, str], tuple[Stored, float]] = {}
        # The same entries by the bytes of a request that was answered with them (``recall``): a
        # client asking again is answered without parsing its request. Emptied with ``_entries``.
        self._requests: dict[bytes, tuple[Stored, float]] = {}
        self._issuers: dict[IssuerKey, int] | None = None
        self._issuers_current = False  # False: read them again (kept meanwhile, for when the store is away)
        self._final: dict[str, bool] = {}  # etag → a permanent revocation (served past the stale bound)
        self._generation = 0  # raised by every emptying: a read begun before it is not cached
        self._counter = -1  # the change counter the cache reflects (everything cached was read at it or later)
        self._seen = -1  # the counter the watcher last read (a lower one later: the store's counter went back)
        self._raised_at = float("-inf")  # when a lookup last raised ``_counter`` (clock), not the watcher
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._watcher_pid = 0
        self._stop = threading.Event()
        self._contact = clock()  # when the watcher last confirmed the cache current
        self._down_since: float | None = None  # the store is lost (circuit open) since then
        self.standby = False  # the watcher found a hot standby (polls instead of LISTEN)
        self.last_change = 0.0

    # -- lookups (request threads) ---------------------------------------------------------------
    def authority_for(self, cert_id: CertId) -> int | None:
        self._ensure_watcher()
        issuers = self._issuers
        if issuers is None and self._down_since is not None:
            raise SourceUnavailable("the store is unreachable")
        if issuers is None or (not self._issuers_current and self._down_since is None):
            generation = self._generation
            try:
                issuers = self.source.issuers()
            except SourceUnavailable:
                self.lost("reading the CAs")
                if self._issuers is None:
                    raise
                issuers = self._issuers  # the CAs served change rarely: the last known set meanwhile
            else:
                with self._lock:
                    if generation == self._generation:
                        self._issuers, self._issuers_current = issuers, True
        return issuers.get((cert_id.hash_algorithm, cert_id.issuer_name_hash, cert_id.issuer_key_hash))

    def response(self, authority_id: int, cert_id: CertId) -> Stored | None:
        return self.lookup(authority_id, cert_id)[0]

    def recall(self, request: bytes) -> Stored | None:
        """The cached answer to exactly these request bytes (one CertID, remembered by ``lookup``),
        under the same rules as any cache hit; None: look the request up the long way.

        Why: a client re-asking for its certificate sends the same bytes, and parsing them was most
        of the Python work of an answer (bench/ocsp_paths.py)."""
        self._current()
        hit = self._requests.get(request)
        if hit is not None and time.time() < hit[1] and self._servable(hit[0]) and self._watcher_pid == os.getpid():
            return hit[0]
        return None

    def lookup(self, authority_id: int, cert_id: CertId, *, request: bytes | None = None) -> tuple[Stored | None, bool]:
        """The stored response, and whether it came from this process's memory (a cache hit).

        ``request``: the bytes of a one-CertID request for ``cert_id``; ``recall`` finds the answer
        by them afterwards, for as long as the entry stays cached."""
        self._current()
        key = (authority_id, cert_id.serial_number, cert_id.hash_algorithm)
        generation = self._generation  # read before the entry: see _remember
        now = time.time()
        hit = self._entries.get(key)
        if hit is not None and now < hit[1] and self._servable(hit[0]):
            if request is not None:
                self._remember(request, hit, generation)
            return hit[0], True
        if self._down_since is not None:  # circuit open: the watcher says when the store is back
            return self._fallback(hit, now, "the store is unreachable"), True
        try:
            found, counter = self.source.response_at(*key)
        except SourceUnavailable as exc:
            self.lost(str(exc))
            return self._fallback(hit, now, str(exc)), True
        usable = found is not None and now < found.next_update
        with self._lock:
            if counter > self._counter:
                # The store moved past what the cache reflects (the watcher has not seen it yet): what
                # was read here is current, what is cached may not be.
                self._advance(counter)
                self._raised_at = self.clock()
                generation = self._generation
            # A change signalled while we read may have made ``found`` stale: then do not keep it.
            if usable and generation == self._generation:
                assert found is not None
                entry = (found, min(found.next_update, now + self.ttl))
                self._keep(self._entries, key, entry)
                if request is not None:
                    self._keep(self._requests, request, entry)
        if not usable:
            return None, False  # past nextUpdate is never served: the on-demand signer answers instead
        return found, False

    def _remember(self, request: bytes, entry: tuple[Stored, float], generation: int) -> None:
        """Keep a cached ``entry`` under the request's bytes too, unless the cache was emptied since
        ``generation`` was read (the entry may be what a revocation replaced)."""
        with self._lock:
            if generation == self._generation:
                self._keep(self._requests, request, entry)

    def _keep(self, table: dict[Any, tuple[Stored, float]], key: Any, entry: tuple[Stored, float]) -> None:
        """Add to one of the cache's tables (the lock held), the oldest entry (insertion order) out when full."""
        if len(table) >= self.max_entries:
            table.pop(next(iter(table)))
        table[key] = entry

    def _servable(self, entry: Stored) -> bool:
        """Whether a cached entry may be served now: the cache was confirmed current within the
        stale bound, or the entry is a permanent revocation (nothing can make it good again)."""
        return self.clock() - self._contact <= self.stale_bound or self._is_final(entry)

    def _fallback(self, hit: tuple[Stored, float] | None, now: float, reason: str) -> Stored:
        """Stale-if-error: a cached entry within its own validity and the stale bound, else ``tryLater``."""
        if hit is not None and now < hit[0].next_update and self._servable(hit[0]):
            return hit[0]
        raise SourceUnavailable(reason)

    def _is_final(self, entry: Stored) -> bool:
        final = self._final.get(entry.etag)
        if final is None:
            try:
                response = ocsp.load_der_ocsp_response(entry.der)
                final = (
                    response.certificate_status == ocsp.OCSPCertStatus.REVOKED
                    and response.revocation_reason != x509.ReasonFlags.certificate_hold
                )
            except ValueError:
                final = False
            self._final[entry.etag] = final
        return final

    # -- the store's state -----------------------------------------------------------------------
    def lost(self, reason: str) -> None:
        """The store could not be read: open the circuit (logged once per outage)."""
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = self.clock()
        log.warning(
            "OCSP responder lost its store (%s): cached good answers for up to %g s after the last "
            "confirmation, cached revocations until their nextUpdate, tryLater for the rest",
            reason,
            self.stale_bound,
        )

    def _confirmed(self, since: float, counter: int, notified: bool = False) -> None:
        """The watcher read the change ``counter`` (begun at ``since``): empty the cache when it moved
        past what the cache reflects, when a NOTIFY said so, when it went back (a restored store) or
        when the store had been lost (changes may have been missed); close the circuit."""
        down_since = self._down_since
        with self._lock:
            # The store's counter went back (a restored database), or the cache was raised to a counter
            # that a read begun after the raise does not reach (a host value left in the file by another
            # database): the host's value is no guide, and left as it is it would hide every change
            # until the store caught up with it. Reset to what the store says. (A read begun before the
            # raise may be older than it: not a reason.)
            if counter < self._seen or (counter < self._counter and since > self._raised_at):
                if self.host is not None:
                    self.host.reset(counter)
                self._counter = -1
            if notified or counter > self._counter or down_since is not None:
                self._advance(max(counter, self._counter))
            self._seen = counter
        self._contact = since
        if down_since is not None:
            with self._lock:
                self._down_since = None
            log.warning("OCSP responder reached its store again after %.1f s; cache emptied", self.clock() - down_since)

    # -- invalidation ----------------------------------------------------------------------------
    def invalidate(self) -> None:
        with self._lock:
            self._empty()

    def _empty(self) -> None:
        """Empty the cache (the lock held)."""
        self._generation += 1
        self._entries, self._requests = {}, {}
        self._final = {}
        self._issuers_current = False
        self.last_change = time.time()

    def _advance(self, counter: int) -> None:
        """The cache is to reflect ``counter`` (the lock held): published to the host's other processes
        first (none of them may answer from before it once this one has answered from it), then emptied."""
        if self.host is not None:
            self.host.publish(counter)
        self._counter = counter
        self._empty()

    def _current(self) -> None:
        """Before answering: when another process of this host has acted on a change this cache has not
        seen, empty it first. One read of shared memory when nothing changed."""
        host = self.host
        if host is not None and host.read() > self._counter:
            with self._lock:
                published = host.read()
                if published > self._counter:
                    self._counter = published
                    self._raised_at = self.clock()
                    self._empty()

    def _ensure_watcher(self) -> None:
        if self._watcher is not None and self._watcher_pid == os.getpid():
            return
        with self._lock:
            if self._watcher is not None and self._watcher_pid == os.getpid():
                return
            self._entries, self._requests, self._issuers = {}, {}, None  # what a parent process cached is not ours
            self._watcher_pid = os.getpid()
            # The change counter as it is before anything is cached: the watcher's first read is
            # compared with it, so a change between this request's lookup and the watcher's start
            # (a slow start, a loaded machine) empties the cache instead of going unnoticed.
            try:
                baseline = self.source.counter()
            except Exception:  # the store is away: -1 is below every counter, so the first read empties the cache
                baseline = -1
            self._counter = self._seen = baseline
            self._watcher = threading.Thread(target=self._watch, name="ocsp-status-watcher", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        """Stop the watcher (at its next poll or NOTIFY timeout); the cache is not used afterwards."""
        self._stop.set()

    def _watch(self) -> None:
        store = self.source.store
        while not self._stop.is_set():
            try:
                if store.is_sqlite:
                    self._poll()
                    self._stop.wait(POLL_INTERVAL)
                else:
                    self._follow()
            except Exception as exc:
                detail = _first_line(exc)
                log.debug("status watcher: %s; retrying", detail)
                # Keep the cache (served within the stale bound, revocations until nextUpdate) and
                # empty it at the first successful read instead, since changes may have been missed.
                self.lost(detail)
                self._stop.wait(RETRY)

    def _poll(self) -> None:
        since = self.clock()
        self._confirmed(since, self.source.counter())

    def _follow(self) -> None:
        """LISTEN on a primary, poll the counter on a hot standby (which refuses LISTEN); either
        way a counter read at least every second confirms the cache (and notices a lost store)."""
        source = self.source
        raw = source.store.engine.raw_connection()
        try:
            connection: Any = raw.driver_connection
            connection.autocommit = True
            assert source.deadlines is not None
            with source.deadlines.bounded(connection.fileno()):
                standby, channel = connection.execute(f"SELECT pg_is_in_recovery(), {CHANNEL_SQL}").fetchone()
                if not standby:
                    connection.execute(f'LISTEN "{channel}"')
            if standby != self.standby:
                self.standby = standby
                log.info(
                    "OCSP responder reads a %s: %s",
                    *(("hot standby", "polling its change counter") if standby else ("primary", "LISTEN for changes")),
                )
            notified = False
            while not self._stop.is_set():
                since = self.clock()
                with source.deadlines.bounded(connection.fileno()):
                    counter = int(connection.execute(source._counter).fetchone()[0])
                self._confirmed(since, counter, notified)
                notified = False
                if standby:
                    self._stop.wait(self.standby_poll)
                else:
                    for _ in connection.notifies(timeout=LISTEN_TIMEOUT, stop_after=1):
                        notified = True
        finally:
            raw.invalidate()  # never hand a LISTENing connection back to the pool
