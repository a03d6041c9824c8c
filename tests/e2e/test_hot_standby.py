"""A responder reading a real hot-standby replica (private primary + streaming standby on loopback,
tests/pg_cluster.py): a standby refuses LISTEN, so the responder polls the replicated change counter
there, and a revocation committed on the primary still reaches it by itself."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ca.store.engine import Store
from ocsp.certid import CertId
from ocsp.requests import parse_request
from ocsp.source import CachedSource, StoreSource
from tests.e2e.test_store_partition import _issue, _until
from tests.est_server import free_port, start_server
from tests.fault_helpers import chargepki, embedded_home, issuing_certificate, ocsp_answer
from tests.pg_cluster import Cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.close()


def test_a_responder_on_a_hot_standby_sees_revocations_made_on_the_primary(cluster: Cluster, tmp_path: Path) -> None:
    with cluster.primary.connect() as admin:
        admin.execute("CREATE DATABASE chargepki")
    home = embedded_home(tmp_path / "home", cluster.primary.url("chargepki"))
    path = home / "chargepki.toml"
    config = tomllib.loads(path.read_text())
    config["ocsp"]["database_url"] = cluster.standby.url("chargepki")  # the responder reads the standby
    path.write_text(tomli_w.dumps(config))
    primary = Store(cluster.primary.url("chargepki"))
    server = None
    try:
        issuer = issuing_certificate(primary)
        leaf: x509.Certificate = _issue(home, "CP-STANDBY", tmp_path)
        server = start_server(home, free_port(), workers=1, service="ocsp")
        _until(lambda: ocsp_answer(server.port, leaf, issuer) == "GOOD", "good from the standby")
        revoked = chargepki(home, "revoke", format(leaf.serial_number, "X"), "--reason", "keyCompromise")
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        committed = time.monotonic()
        _until(lambda: ocsp_answer(server.port, leaf, issuer) == "REVOKED", "the revocation through the standby")
        print(f"revoked on the primary, seen through the standby after {time.monotonic() - committed:.2f} s")
        log = server.log.read_text(errors="replace")
        assert "lost its store" not in log and "Traceback" not in log, log[-3000:]
    finally:
        if server is not None:
            server.stop()
        primary.dispose()
    # How it got there: the watcher found a standby and polls, no LISTEN refused and retried.
    source = CachedSource(StoreSource(Store(cluster.standby.url("chargepki"), read_only=True)))
    try:
        assert source.authority_for(_cert_id(leaf, issuer)) is not None
        _until(lambda: source.standby, "the watcher notices the standby")
        assert source._down_since is None
    finally:
        source.close()
        source.source.store.dispose()


def _cert_id(leaf: x509.Certificate, issuer: x509.Certificate) -> CertId:
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    (cert_id,) = parse_request(request.public_bytes(serialization.Encoding.DER))
    return cert_id
