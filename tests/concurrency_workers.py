"""What the concurrency tests run in separate processes (spawned, so each has its own PKCS#11
module, database connections and writer gate, as separate services would)."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ca import audit
from ca.authorities.issuers import issuer_for
from ca.keys.pkcs11_token import Token
from ca.status.revocation import revoke
from ca.store.engine import Store
from ca.store.models import Authority
from ca.work import Work
from crl.publisher import publish_crl
from ocsp.presign import Presigner, refresh

TokenArgs = tuple[str, str, str, str | None]  # module, label, PIN, softhsm.conf


def spawn() -> Any:
    return multiprocessing.get_context("spawn")


def _token(args: TokenArgs) -> Token:
    module, label, pin, conf = args
    return Token(module, label, pin, softhsm_conf=Path(conf) if conf else None)


def publish_crls(url: str, token_args: TokenArgs, authority_id: int, directory: str, count: int, results: Any) -> None:
    """Publish ``count`` CRLs of one CA; report (number, replaced) of each."""
    store, token = Store(url), _token(token_args)
    numbers = []
    with store.session() as session:
        for _ in range(count):
            authority = session.get(Authority, authority_id)
            assert authority is not None
            published = publish_crl(
                session, issuer_for(authority, token), authority, Path(directory), now=datetime.now(UTC)
            )
            numbers.append((published.number, published.replaced))
    store.dispose()
    results.put(numbers)


def refresh_until(url: str, token_args: TokenArgs, hours_ahead: float, done: Any, results: Any) -> None:
    """Run refresher passes (``hours_ahead`` makes every response due) until ``done`` is set."""
    store, token = Store(url), _token(token_args)
    presigner = Presigner(token)
    passes = signed = 0
    while not done.is_set() or passes == 0:
        with store.session() as session:
            signed += refresh(session, presigner, datetime.now(UTC) + timedelta(hours=hours_ahead))
        passes += 1
    store.dispose()
    results.put((passes, signed))


def revoke_serials(url: str, token_args: TokenArgs, serials: list[str], results: Any) -> None:
    store, token = Store(url), _token(token_args)
    status = Presigner(token)
    for serial in serials:
        with store.session() as session:
            revoke(Work(session, "test:revoker", status=status), serial=serial, reason="keyCompromise")
    store.dispose()
    results.put(len(serials))


def write_audit(url: str, count: int, tag: str, results: Any) -> None:
    store = Store(url)
    for n in range(count):
        with store.session() as session:
            audit.record(session, "test.concurrent", actor=tag, subject=f"{tag}-{n}")
            session.commit()
    store.dispose()
    results.put(count)
