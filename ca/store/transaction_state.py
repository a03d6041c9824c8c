"""What one database transaction has already done, for work that is needed once per transaction.

A group-committed batch runs many issuances in one transaction; some of their statements only
need to run once in it: the audit head's lock is held after the first entry, and the change
counter that tells OCSP responders to look again needs raising once before the commit. The state
is kept per innermost transaction (a savepoint is one of its own), so it never outlives the
transaction it describes: after a commit or a rollback, including a savepoint's, the next
statement's transaction starts with nothing remembered.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

_KEY = "chargepki.transaction_state"


def transaction_state(session: Session) -> dict[str, Any]:
    """A dict that lives as long as the session's innermost transaction (empty outside one: nothing
    done before the transaction began can be relied on in it)."""
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        return {}
    held = session.info.get(_KEY)
    if held is None or held[0] is not transaction:  # the transaction object is held, so never reused
        held = (transaction, {})
        session.info[_KEY] = held
    return held[1]
