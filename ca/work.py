"""The context every core flow takes first: its dependencies, apart from its domain arguments.

A flow needs a session (and decides where its transaction begins and ends), the keys it may
sign with, the status signer that pre-signs OCSP responses in the same transaction, who is
acting (for the audit log) and a clock. Passing them as one object keeps signatures short and
the same everywhere: ``flow(work, *, domain=...)``, domain arguments keyword-only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.orm import Session

from ca.clock import Clock, utcnow
from ca.errors import ConfigError

if TYPE_CHECKING:
    from ca.authorities.issuers import Issuer
    from ca.keys.pkcs11_token import Token
    from ca.status.signal import StatusSigner
    from ca.store.group_commit import GroupCommit
    from ca.store.models import Authority

T = TypeVar("T")
IssuerFactory = Callable[["Authority"], "Issuer"]


@dataclass(frozen=True)
class Work:
    """What a core flow works with. Build one per request or command; it is cheap and immutable.

    ``issuers`` binds a stored CA to its token key (services pass a cached factory; the CLI one
    over ``token``). ``status`` is told of every certificate change inside its transaction.
    ``commits`` (services) lets ``write`` share transactions with concurrent requests.
    """

    session: Session
    actor: str
    status: StatusSigner | None = None
    token: Token | None = None
    issuers: IssuerFactory | None = None
    now: Clock = utcnow
    commits: GroupCommit | None = None

    def as_actor(self, actor: str) -> Work:
        """The same dependencies acting for someone else (e.g. the device a CSMS relays for)."""
        return replace(self, actor=actor)

    def keys(self) -> Token:
        """The token, for flows that generate or destroy keys; a clear error when none was given."""
        if self.token is None:
            raise ConfigError("this operation needs the PKCS#11 token, and none was opened")
        return self.token

    def issuer(self, authority: Authority) -> Issuer:
        """The CA ``authority`` bound to its token key (refused when it no longer signs)."""
        if self.issuers is not None:
            return self.issuers(authority)
        from ca.authorities.issuers import issuer_for  # the authorities package issues through this module

        return issuer_for(authority, self.keys())

    def signer(self) -> StatusSigner:
        if self.status is None:
            raise ConfigError("this operation changes certificate status and needs a status signer")
        return self.status

    def write(self, unit: Callable[[Session], T]) -> T:
        """One durable write step: ``unit`` runs with a session and its work is committed on return.

        With ``commits``, when this session has begun nothing or only reads (``begin_reads``), the
        unit joins the next group commit (``ca.store.group_commit``): its reads end here, then it
        runs in a transaction shared with concurrent writers. Otherwise it runs in this session's
        own transaction, which it commits. Either way a unit that raises leaves nothing behind.
        """
        from ca.store.engine import in_reads  # the store package imports this module

        if in_reads(self.session):
            self.session.commit()  # the reads: nothing to write, and no connection held while waiting
            if self.commits is not None:
                return self.commits.run(unit)
        elif self.commits is not None and not self.session.in_transaction():
            # Nothing begun: nothing to end (a commit here would begin and end an empty transaction,
            # about 50 Python calls per enrollment; sessions do not expire on commit).
            return self.commits.run(unit)
        with self.transaction() as session:
            return unit(session)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """The flow's unit of work: commits when the block ends, rolls back on any exception.

        A flow opens exactly one of these per durable step; nothing inside commits or rolls
        back on its own, so no function ends work it did not start.
        """
        try:
            yield self.session
            self.session.commit()  # a failed commit (constraint, lost connection) rolls back too
        except BaseException:
            self.session.rollback()
            raise
