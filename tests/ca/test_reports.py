"""Operations reports (ca/reports.py) on SQLite and PostgreSQL: what each one counts and leaves out,
and the three renderings of the same rows (text table, RFC 4180 CSV, JSON)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import get_authority, issuer_for
from ca.authorities.rotation import rotate_issuing_ca
from ca.errors import InputError, NotFoundError
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.campaigns import start_campaign
from ca.registry.devices import add_device, get_device
from ca.reports import campaigns as campaign_report
from ca.reports import certificates_by_status, device_counts, expiring, inventory, render
from ca.status.revocation import revoke
from ca.store.models import Certificate
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_key


def _charger(session: Session, token: Token, status: Presigner, serial: str, days: int, ca: str | None = None):  # type: ignore[no-untyped-def]
    device = get_device(session, serial)
    issuer = issuer_for(get_authority(session, ca or "production-issuing-1"), token)
    request = IssueRequest(
        get_profile("charger"), make_key().public_key(), serial, validity=timedelta(days=days), device_id=device.id
    )
    return issue(Work(session, "test", status=status), issuer=issuer, request=request)


@pytest.fixture
def fleet(session: Session, hierarchy: Hierarchy, token: Token, status: Presigner) -> dict[str, str]:
    """Chargers in every state an expiry report must sort out; returns name -> serial."""
    for serial, model in (("CP-SOON", "Wallbox 22"), ("CP-LATER", "Wallbox 22"), ("CP-OLD", None),
                          ("CP-GONE", "Pole 11"), ("CP-NEXT", "Pole 11")):  # fmt: skip
        add_device(Work(session, "test"), serial=serial, model=model)
    made = {
        "soon": _charger(session, token, status, "CP-SOON", 10).serial,
        "later": _charger(session, token, status, "CP-LATER", 200).serial,
        "expired": _charger(session, token, status, "CP-OLD", 10).serial,
        "revoked": _charger(session, token, status, "CP-GONE", 5).serial,
        "superseded": _charger(session, token, status, "CP-NEXT", 6).serial,
    }
    revoke(Work(session, "test", status=status), serial=made["revoked"], reason="keyCompromise")
    now = datetime.now(UTC)
    session.execute(
        update(Certificate).where(Certificate.serial == made["expired"]).values(not_after=now - timedelta(days=1))
    )
    session.execute(
        update(Certificate).where(Certificate.serial == made["superseded"]).values(revoke_after=now + timedelta(days=1))
    )
    session.commit()
    return made


def test_expiring_lists_valid_certificates_in_the_window_soonest_first(session: Session, fleet: dict[str, str]) -> None:
    now = datetime.now(UTC)
    report = expiring(session, now, within=timedelta(days=30), profile="charger")
    rows = [dict(zip(report.tables[0].columns, row, strict=True)) for row in report.tables[0].rows]
    assert [r["serial"] for r in rows] == [fleet["soon"]], "not later, expired, revoked or superseded ones"
    assert rows[0]["device"] == "CP-SOON" and rows[0]["device_model"] == "Wallbox 22"
    assert rows[0]["ca"] == "production-issuing-1" and rows[0]["environment"] == "production"
    assert rows[0]["days_left"] in (9, 10)

    everything = expiring(session, now, within=timedelta(days=400))
    serials = [row[0] for row in everything.tables[0].rows]
    assert fleet["later"] in serials and fleet["soon"] in serials
    assert serials.index(fleet["soon"]) < serials.index(fleet["later"])
    assert "ocsp-signer" in {row[1] for row in everything.tables[0].rows}, "every profile unless --profile"
    assert expiring(session, now, within=timedelta(days=400), environment="staging").tables[0].rows == []
    with pytest.raises(InputError):
        expiring(session, now, within=timedelta(0))

    first = expiring(session, now, within=timedelta(days=400), limit=1)  # a page's few, and the count of all
    assert [row[0] for row in first.tables[0].rows] == serials[:1]
    assert first.total == len(serials) > 1 and first.notes[0].startswith(f"{len(serials)} valid certificate(s)")


def test_inventory_counts_devices_and_certificates_by_status(session: Session, fleet: dict[str, str]) -> None:
    report = inventory(session, datetime.now(UTC))
    by_status: dict[str, int] = {}  # the console's lighter counts agree with the inventory's
    for *_, status, count in inventory(session, datetime.now(UTC), environment="production").tables[1].rows:
        by_status[status] = by_status.get(status, 0) + count
    assert certificates_by_status(session, datetime.now(UTC), "production") == by_status
    assert device_counts(session, "production") == inventory(session, datetime.now(UTC)).tables[0].rows
    devices = {(r[0], r[1], r[2]): r[3] for r in report.tables[0].rows}
    assert devices == {("production", "Wallbox 22", True): 2, ("production", "Pole 11", True): 2,
                       ("production", None, True): 1}  # fmt: skip
    certificates = {(r[1], r[2], r[3], r[4]): r[5] for r in report.tables[1].rows}
    issuing = "production-issuing-1"
    assert certificates[(issuing, "charger", "Wallbox 22", "valid")] == 2
    assert certificates[(issuing, "charger", None, "expired")] == 1
    assert certificates[(issuing, "charger", "Pole 11", "revoked")] == 1
    assert certificates[(issuing, "charger", "Pole 11", "valid")] == 1  # superseded, not yet revoked
    assert certificates[("production-root-1", "issuing-ca", None, "valid")] == 1
    assert inventory(session, datetime.now(UTC), environment="staging").tables[1].rows == []

    rendered = list(csv.reader(io.StringIO(render(report, "csv").decode(), newline="")))
    assert rendered[0] == ["kind", "environment", "ca", "profile", "model", "status", "count"]
    assert ["device", "production", "", "", "Wallbox 22", "enabled", "2"] in rendered
    assert ["certificate", "production", issuing, "charger", "", "expired", "1"] in rendered
    assert render(report, "csv").endswith(b"\r\n")


def test_campaign_progress_per_campaign_and_per_device(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, fleet: dict[str, str]
) -> None:
    rotate_issuing_ca(Work(session, "test", status=status, token=token), ca_name="production-issuing-1")
    started, size = start_campaign(Work(session, "test"), from_ca="production-issuing-1")
    assert size == 2  # CP-SOON and CP-LATER hold current certificates from the old CA (CP-NEXT's is superseded)
    _charger(session, token, status, "CP-SOON", 365, ca="production-issuing-2")  # re-enrolled onto the new CA

    summary = campaign_report(session, datetime.now(UTC))
    (row,) = [dict(zip(summary.tables[0].columns, r, strict=True)) for r in summary.tables[0].rows]
    assert row == {
        "id": started.id, "environment": "production", "from_ca": "production-issuing-1",
        "to_ca": "production-issuing-2", "started_at": row["started_at"], "devices": 2, "reenrolled": 1,
        "pending": 1, "failed": 0, "reenrolled_percent": 50.0,
    }  # fmt: skip
    assert summary.tables[1].rows == [] and summary.csv is summary.tables[0]

    for name in (str(started.id), "production-issuing-1"):
        detail = campaign_report(session, datetime.now(UTC), name=name)
        assert {(r[1], r[2]) for r in detail.tables[1].rows} == {("CP-SOON", "reenrolled"), ("CP-LATER", "pending")}
        assert detail.csv is detail.tables[1]
    with pytest.raises(NotFoundError):
        campaign_report(session, datetime.now(UTC), name="99")


def test_the_three_formats_carry_the_same_rows(session: Session, fleet: dict[str, str]) -> None:
    report = expiring(session, datetime.now(UTC), within=timedelta(days=30), profile="charger")
    document = json.loads(render(report, "json"))
    assert document["report"] == "expiring" and document["generated_at"].endswith("Z")
    assert document["parameters"] == {
        "within_seconds": 30 * 86400, "until": document["parameters"]["until"], "environment": None,
        "profile": "charger",
    }  # fmt: skip
    (certificate,) = document["certificates"]
    assert certificate["serial"] == fleet["soon"] and certificate["not_after"].endswith("Z")
    assert list(certificate) == list(report.tables[0].columns)
    rows = list(csv.DictReader(io.StringIO(render(report, "csv").decode(), newline="")))
    assert rows == [{key: "" if value is None else str(value) for key, value in certificate.items()}]
    text = render(report, "table").decode()
    assert "SERIAL" in text and fleet["soon"] in text and "CP-SOON" in text
    with pytest.raises(InputError):
        render(report, "xml")
