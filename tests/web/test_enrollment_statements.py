"""The enrollment hot path's statement budget: what one EST enrollment sends to the database.

Counted with SQLAlchemy's ``before_cursor_execute`` over one request of a warm worker (its CA
and ``Issuer`` cached, the sweep done), per route. The budget is what the pipeline sent when
it was unified; a change that makes enrollment chattier fails here first.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from sqlalchemy import event

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.context import Pki
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device
from ca.registry.secrets import issue_secret
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr
from web.app import create_app

HEADER = "X-SSL-Client-Cert"
# Statements per request on the warm path, as measured before the pipeline was unified (2026-12-03):
# the secret route 18 on SQLite (its BEGIN IMMEDIATEs count) and 17 on PostgreSQL, re-enrollment 26.
BUDGET = {
    "secret": {"sqlite": 18, "postgresql": 17},
    "reenroll": {"sqlite": 26, "postgresql": 26},
}


def _body(csr_pem: bytes) -> bytes:
    return base64.encodebytes(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))


def _cert_header(der: bytes) -> str:
    return quote(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode())


@pytest.fixture
def site(
    tmp_path: Path, migrated_db_url: str, token: Token, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Any]:
    home = tmp_path / "home"
    settings = EstSettings(client_cert_header=HEADER, trusted_proxies=("127.0.0.1",))
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0], est=settings))
    pki = Pki.open(home, {}, create=True)
    with pki.store.session() as session:
        init_hierarchy(
            Work(session, "test", status=Presigner(token), token=token),
            request=HierarchyRequest(organization="Acme Charging", country="DE"),
        )
        secrets = {
            f"CP-{n}": issue_secret(Work(session, "test"), device=add_device(Work(session, "test"), serial=f"CP-{n}"))
            for n in range(3)
        }
    client = create_app(pki, settings).test_client()
    yield pki, client, secrets
    pki.close()


def _count(pki: Pki, send: Any) -> tuple[Any, int]:
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        sent.append(statement)
        if os.environ.get("SHOW_SQL"):  # SHOW_SQL=1 pytest -s: the statements themselves
            print("   SQL:", " ".join(statement.split())[:150])

    event.listen(pki.store.engine, "before_cursor_execute", record)
    try:
        response = send()
    finally:
        event.remove(pki.store.engine, "before_cursor_execute", record)
    return response, len(sent)


def test_one_est_enrollment_stays_within_its_statement_budget(site: Any, db_url: str) -> None:
    pki, client, secrets = site
    kind = "sqlite" if db_url.startswith("sqlite") else "postgresql"

    def enroll(serial: str) -> Any:
        auth = base64.b64encode(f"{serial}:{secrets[serial]}".encode()).decode()
        headers = {"Content-Type": "application/pkcs10", "Authorization": f"Basic {auth}"}
        return client.post("/.well-known/est/simpleenroll", data=_body(make_csr(serial)), headers=headers)

    assert enroll("CP-0").status_code == 200  # warms the worker: CA, Issuer, sweep
    response, secret_count = _count(pki, lambda: enroll("CP-1"))
    assert response.status_code == 200
    current = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.data))[0]
    headers = {
        "Content-Type": "application/pkcs10",
        HEADER: _cert_header(current.public_bytes(serialization.Encoding.DER)),
    }
    response, renew_count = _count(
        pki, lambda: client.post("/.well-known/est/simplereenroll", data=_body(make_csr("CP-1")), headers=headers)
    )
    assert response.status_code == 200, response.data
    print(f"\nstatements per enrollment ({kind}): secret {secret_count}, reenroll {renew_count}")
    assert secret_count <= BUDGET["secret"][kind]
    assert renew_count <= BUDGET["reenroll"][kind]
