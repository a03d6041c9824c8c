"""A responder cut off from PostgreSQL by a silent partition, end to end on loopback: a real
`chargepki serve ocsp` reads PostgreSQL through a forwarder that stops forwarding without closing
anything (``SilentProxy``), and the answers are parsed with cryptography.

What must hold: no request hangs (every answer arrives before a generous deadline); cached answers
go on during a short outage; a cached ``good`` stops being served once the stale bound has passed
(``tryLater`` instead, even though the certificate was revoked meanwhile where the responder could not
see it), a cached permanent revocation is still served; the loss and the return are logged; once
the partition heals the responder sees the revocation by itself."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from sqlalchemy import select

from ca.store.engine import Store
from ca.store.models import StatusFeed
from tests.conftest import database
from tests.est_server import free_port, start_server
from tests.fault_helpers import (
    REPO,
    SilentProxy,
    chargepki,
    embedded_home,
    issuing_certificate,
    ocsp_answer,
    service_environment,
)
from tests.helpers import make_csr

DEADLINE = 30.0  # generous: only a hang guard, never a latency figure


def _until(condition: Callable[[], object], what: str, deadline: float = DEADLINE) -> object:
    end = time.monotonic() + deadline
    while not (result := condition()):
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline} s")
        time.sleep(0.2)
    return result


def _configure(home: Path, **tables: dict[str, object]) -> None:
    path = home / "chargepki.toml"
    config = tomllib.loads(path.read_text())
    for name, values in tables.items():
        config.setdefault(name, {}).update(values)
    path.write_text(tomli_w.dumps(config))


def _issue(home: Path, name: str, tmp: Path) -> x509.Certificate:
    csr = tmp / f"{name}.csr"
    csr.write_bytes(make_csr(name))
    result = chargepki(home, "issue", "--csr", str(csr), "--profile", "charger", "--out", str(tmp / f"{name}.pem"))
    assert result.returncode == 0, result.stdout + result.stderr
    return x509.load_pem_x509_certificate((tmp / f"{name}.pem").read_bytes())


def _revoke_directly(home: Path, url: str, certificate: x509.Certificate) -> None:
    """Revoke through the database's own address, not the partitioned one."""
    serial = format(certificate.serial_number, "X")
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "--home", str(home), "revoke", serial, "--reason", "keyCompromise"],
        capture_output=True,
        text=True,
        env=service_environment(CHARGEPKI_DATABASE_URL=url),
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _quiet(store: Store) -> None:
    """Until the status counter stood still for a second and a half (every change empties the cache)."""
    last, since = None, time.monotonic()
    end = since + DEADLINE
    while time.monotonic() - since < 1.5:
        assert time.monotonic() < end, "the status counter kept moving"
        time.sleep(0.2)
        with store.session() as session:
            counter = session.scalar(select(StatusFeed.counter))
            session.commit()
        if counter != last:
            last, since = counter, time.monotonic()


def test_a_partitioned_responder_never_hangs_serves_its_cache_within_the_stale_bound_and_heals(
    tmp_path: Path,
) -> None:
    with database("postgresql", tmp_path) as url:
        proxy = SilentProxy()
        store = Store(url)
        server = None
        try:
            home = embedded_home(tmp_path / "home", proxy.url(url))
            _configure(
                home,
                database={"connect_timeout_seconds": 2},
                ocsp={"stale_bound_seconds": 4, "store_timeout_ms": 1000},
            )
            issuer = issuing_certificate(store)
            good, revoked, uncached = (_issue(home, name, tmp_path) for name in ("CP-P-GOOD", "CP-P-REV", "CP-P-NEW"))
            _revoke_directly(home, url, revoked)
            server = start_server(home, free_port(), workers=1, service="ocsp")
            _quiet(store)
            time.sleep(1.0)  # the watcher's next confirmation has seen the last change
            assert ocsp_answer(server.port, good, issuer) == "GOOD"
            assert ocsp_answer(server.port, revoked, issuer) == "REVOKED"

            proxy.partition()
            # A short outage: cached answers go on; what is not cached is tryLater, and nothing hangs
            # (ocsp_answer's own timeout is 10 s, the read deadline here 1 s).
            assert ocsp_answer(server.port, good, issuer) == "GOOD"
            assert ocsp_answer(server.port, revoked, issuer) == "REVOKED"
            assert ocsp_answer(server.port, uncached, issuer) == "TRY_LATER"
            # The truth changes where the responder cannot see it.
            _revoke_directly(home, url, good)
            seen = set()

            def gave_up_on_good() -> bool:
                answer = ocsp_answer(server.port, good, issuer)
                seen.add(answer)
                return answer == "TRY_LATER"

            _until(gave_up_on_good, "tryLater for the cached good past the stale bound")
            assert seen <= {"GOOD", "TRY_LATER"}
            for _ in range(3):  # and it stays so while partitioned
                assert ocsp_answer(server.port, good, issuer) == "TRY_LATER"
                assert ocsp_answer(server.port, revoked, issuer) == "REVOKED"  # a revocation is final
                assert ocsp_answer(server.port, uncached, issuer) == "TRY_LATER"
            log = server.log.read_text(errors="replace")
            assert log.count("lost its store") == 1, log[-3000:]

            proxy.heal()
            _until(lambda: ocsp_answer(server.port, good, issuer) == "REVOKED", "the revocation after healing")
            _until(lambda: ocsp_answer(server.port, uncached, issuer) == "GOOD", "the uncached one after healing")
            log = server.log.read_text(errors="replace")
            assert "reached its store again" in log and "Traceback" not in log, log[-3000:]
            assert server.process.poll() is None
        finally:
            if server is not None:
                server.stop()
            proxy.close()
            store.dispose()
