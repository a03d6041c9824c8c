"""The seam between the core and revocation status: who is told when a certificate changes.

Issuance, revocation and release call a ``StatusSigner`` inside their own transaction, so the
pre-signed OCSP response commits (or is dropped) together with the change it describes; a new
certificate's responses may be signed just before its record's transaction (``prepare``), so the
signing is not done while other writers wait, and are stored in it. The core only defines the
seam and the change signal; ``ocsp.presign`` implements the signing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import text, update
from sqlalchemy.orm import Session

from ca.store.models import Certificate, StatusFeed
from ca.store.prepared import Prepared
from ca.store.transaction_state import transaction_state

NOTIFY_CHANNEL = "chargepki_status"
# The channel is per schema: PostgreSQL's NOTIFY reaches every session of the database, and two
# installations (or test runs) in schemas of one database must not empty each other's caches.
# Sender and listener compute it on their own connection, whose search_path names the schema.
CHANNEL_SQL = f"'{NOTIFY_CHANNEL}_' || substr(md5(current_schema()), 1, 16)"


class StatusSigner(Protocol):
    def prepare(self, session: Session, certificate: Certificate, now: datetime) -> Any:
        """Sign a just-issued certificate's responses ahead of its record's transaction; what it
        must read, it reads in ``session`` after ``ca.store.engine.begin_reads`` (the caller has no
        transaction open in it, or one begun for reads). What it returns goes to ``update``'s
        ``prepared``, or None.

        Never raises for a signing failure: ``update`` then signs in the transaction."""

    def update(
        self,
        session: Session,
        certificates: Sequence[Certificate],
        now: datetime,
        *,
        fresh: bool = False,
        prepared: Any = None,
    ) -> None:
        """Re-sign (or, failing that, drop) the stored responses of ``certificates`` and signal the change.

        ``fresh``: the certificates were recorded in this transaction, so no response is stored yet.
        ``prepared``: what ``prepare`` signed for the one fresh certificate, stored when still right.

        Runs inside the caller's transaction and never raises for a signing failure: a revocation
        must be recorded even when the token is away, and a dropped response is never served.
        """


_FEED = StatusFeed.__table__
# Prepared once: this runs in every issuance and revocation (building it cost more than running it).
_RAISE_COUNTER = update(_FEED).where(_FEED.c.id == 1).values(counter=_FEED.c.counter + 1)
# PostgreSQL: the counter and the NOTIFY in one round trip. A data-modifying WITH runs exactly once,
# to completion, whether or not the query reads it (PostgreSQL manual, "WITH Queries", 7.8.4).
_RAISE_COUNTER_AND_NOTIFY = text(
    f"WITH raised AS (UPDATE status_feed SET counter = counter + 1 WHERE id = 1 RETURNING counter) "
    f"SELECT pg_notify({CHANNEL_SQL}, '')"
)

_RAISE = Prepared({"postgresql": _RAISE_COUNTER_AND_NOTIFY, "": _RAISE_COUNTER})

_SIGNALLED = "status.signalled"


def signal_change(session: Session) -> None:
    """Raise the change counter and, on PostgreSQL, NOTIFY; both take effect at commit.

    Once per transaction: listeners react to the counter having moved and PostgreSQL delivers a
    transaction's identical notifications once, so a batch of issuances sharing a transaction
    signals once (``ca.store.transaction_state``)."""
    done = transaction_state(session)
    if done.get(_SIGNALLED):
        return
    _RAISE.run(session)
    transaction_state(session)[_SIGNALLED] = True
