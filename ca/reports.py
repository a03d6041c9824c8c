"""Operations reports: certificates expiring soon, the inventory, revocations per day, the progress of
re-enrollment campaigns.

A report is data first (``Report``: named tables of plain values and the parameters that chose
them) and bytes second (``render``: an aligned text table, RFC 4180 CSV or JSON), so the bytes a
command prints, writes and signs (``ca.audit.exports``) are one and the same. Field names and
formats are those of ``docs/cli-json.md``: snake_case, ISO 8601 UTC timestamps, serials in hex.

Queries: the expiry window is one range of ``ix_certificates_status_not_after``; a campaign's
progress is ``registry.campaigns.progress`` (aggregates and primary-key joins). The inventory counts
every row, which no index can spare: it is one grouped pass over the certificates and one over the
devices, joined to the few authorities and to devices by primary key, never a lookup per row
(``tests/ca/store/test_migrations.py`` asks the planners about all three).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from ca.clock import iso_utc
from ca.errors import InputError
from ca.kinds import CertStatus
from ca.registry.campaigns import STATES, get_campaign, list_campaigns, progress
from ca.store.models import Authority, Campaign, Certificate, Device

FORMATS = ("table", "csv", "json")


@dataclass(frozen=True)
class Table:
    """One list of rows: ``name`` is its key in the JSON document, ``columns`` its field names."""

    name: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    title: str = ""
    in_text: bool = True  # shown by the text format (JSON has every table)


@dataclass(frozen=True)
class Report:
    kind: str  # expiring | inventory | campaign
    generated_at: datetime
    parameters: dict[str, Any]
    tables: list[Table]
    csv: Table  # CSV holds one table: one of ``tables``, or their union (inventory)
    notes: list[str] = field(default_factory=list)  # lines above the text table
    total: int | None = None  # expiring with a limit: how many there are in all


# -- expiring ------------------------------------------------------------------------------------
EXPIRING_COLUMNS = (
    "serial", "profile", "common_name", "subject", "environment", "ca", "device", "device_model", "not_after",
    "days_left",
)  # fmt: skip


def expiring(
    session: Session,
    now: datetime,
    *,
    within: timedelta,
    environment: str | None = None,
    profile: str | None = None,
    limit: int | None = None,
) -> Report:
    """Valid certificates whose ``not_after`` falls in ``(now, now + within]``, soonest first.

    A certificate a re-enrollment already superseded (``revoke_after`` set: revoked when its grace
    period ends) is left out: its device has its successor, nothing needs renewing.
    ``limit``: only the soonest ``limit`` rows, and the count of all in the note and ``total`` (a
    page that shows the first few must not load a fleet's month of renewals, tens of thousands).
    """
    if within <= timedelta(0):
        raise InputError("--within must be longer than zero")
    until = now + within
    query = (
        select(
            Certificate.serial, Certificate.profile, Certificate.common_name, Certificate.subject,
            Authority.environment, Authority.name, Device.serial, Device.model, Certificate.not_after,
        )
        .join(Authority, Authority.id == Certificate.authority_id)
        .outerjoin(Device, Device.id == Certificate.device_id)
        .where(
            Certificate.status == CertStatus.VALID,
            Certificate.not_after > now,
            Certificate.not_after <= until,
            Certificate.revoke_after.is_(None),
        )
    )  # fmt: skip
    if environment is not None:
        query = query.where(Authority.environment == environment)
    if profile is not None:
        query = query.where(Certificate.profile == profile)
    total = None
    if limit is not None:
        total = session.scalar(select(func.count()).select_from(query.subquery()))
    ordered = query.order_by(Certificate.not_after, Certificate.id).limit(limit)
    rows = [(*row, (row[-1] - now) // timedelta(days=1)) for row in session.execute(ordered)]
    session.commit()  # end the read (SQLite keeps its lock until then)
    total = len(rows) if total is None else total
    table = Table("certificates", EXPIRING_COLUMNS, rows)
    filters = (("environment", environment), ("profile", profile))
    scope = ", ".join(f"{name} {value}" for name, value in filters if value)
    note = f"{total} valid certificate(s) expiring by {iso_utc(until)}" + (f" ({scope})" if scope else "")
    parameters = {
        "within_seconds": int(within.total_seconds()),
        "until": until,
        "environment": environment,
        "profile": profile,
    }
    return Report("expiring", now, parameters, [table], table, [note], total=total)


# -- inventory -----------------------------------------------------------------------------------
DEVICE_COLUMNS = ("environment", "model", "enabled", "count")
CERTIFICATE_COLUMNS = ("environment", "ca", "profile", "device_model", "status", "count")
INVENTORY_CSV_COLUMNS = ("kind", "environment", "ca", "profile", "model", "status", "count")


def _display_status(now: datetime) -> Any:
    """The status operators see (``status.certificates.display_status``) as SQL: expiry from the clock."""
    return case(
        (and_(Certificate.status == CertStatus.VALID, Certificate.not_after <= now), "expired"),
        (and_(Certificate.status == CertStatus.REVOKED, Certificate.revocation_reason == "certificateHold"), "hold"),
        else_=Certificate.status,
    )


def _device_counts(environment: str | None) -> Any:
    devices = select(Device.environment, Device.model, Device.enabled, func.count()).group_by(
        Device.environment, Device.model, Device.enabled
    )
    return devices if environment is None else devices.where(Device.environment == environment)


def certificates_by_status(session: Session, now: datetime, environment: str) -> dict[str, int]:
    """An environment's certificates per displayed status (the inventory's statuses), without the
    inventory's join to the devices: one grouped pass over the certificates of its CAs."""
    status = _display_status(now).label("status")
    per_certificate = (
        select(status)
        .join(Authority, Authority.id == Certificate.authority_id)
        .where(Authority.environment == environment)
    ).subquery()
    rows = session.execute(select(per_certificate.c.status, func.count()).group_by(per_certificate.c.status)).all()
    session.commit()
    return {str(name): int(count) for name, count in rows}


def device_counts(session: Session, environment: str) -> list[tuple[str, str | None, bool, int]]:
    """An environment's devices per model and state, as the inventory counts them."""
    rows = [tuple(r) for r in session.execute(_device_counts(environment))]
    session.commit()
    return sorted(rows, key=lambda r: (r[0], r[1] or "", not r[2]))  # type: ignore[return-value]


def inventory(session: Session, now: datetime, *, environment: str | None = None) -> Report:
    """Devices per environment, model and state; certificates per environment, CA, profile, device model
    and status (valid, expired, revoked, hold, pending, aborted)."""
    devices = _device_counts(environment)
    # Per row first, then grouped: grouping by the CASE itself would bind ``now`` twice, which
    # PostgreSQL does not recognise as the same expression.
    per_certificate = (
        select(
            Authority.environment.label("environment"),
            Authority.name.label("ca"),
            Certificate.profile.label("profile"),
            Device.model.label("device_model"),
            _display_status(now).label("status"),
        )
        .join(Authority, Authority.id == Certificate.authority_id)
        .outerjoin(Device, Device.id == Certificate.device_id)
    )
    if environment is not None:
        per_certificate = per_certificate.where(Authority.environment == environment)
    rows = per_certificate.subquery()
    groups = (rows.c.environment, rows.c.ca, rows.c.profile, rows.c.device_model, rows.c.status)
    certificates = select(*groups, func.count()).group_by(*groups)
    device_rows = sorted((tuple(r) for r in session.execute(devices)), key=lambda r: (r[0], r[1] or "", not r[2]))
    certificate_rows = sorted(
        (tuple(r) for r in session.execute(certificates)), key=lambda r: tuple(v or "" for v in r[:5])
    )
    session.commit()
    device_table = Table("devices", DEVICE_COLUMNS, device_rows, "devices")
    certificate_table = Table("certificates", CERTIFICATE_COLUMNS, certificate_rows, "certificates")
    union = [
        ("device", env, None, None, model, "enabled" if enabled else "disabled", count)
        for env, model, enabled, count in device_rows
    ] + [
        ("certificate", env, ca, profile, model, status, count)
        for env, ca, profile, model, status, count in certificate_rows
    ]
    notes = [
        f"{sum(r[-1] for r in device_rows)} device(s), {sum(r[-1] for r in certificate_rows)} certificate(s)"
        + (f" in {environment}" if environment else "")
    ]
    return Report(
        "inventory",
        now,
        {"environment": environment},
        [device_table, certificate_table],
        Table("inventory", INVENTORY_CSV_COLUMNS, union),
        notes,
    )


# -- revocations per day -------------------------------------------------------------------------
def revocations_per_day(
    session: Session, now: datetime, *, days: int = 30, environment: str | None = None
) -> list[tuple[date, int]]:
    """Certificates revoked (holds included) on each of the last ``days`` UTC days, today last, zeros too.

    One grouped statement over the revoked rows of the window (``status`` leads the certificates'
    (status, not_after) index), never a row per certificate in Python.
    """
    if not 1 <= days <= 366:
        raise InputError("days must be between 1 and 366")
    first = (now - timedelta(days=days - 1)).date()
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    day = func.date(Certificate.revoked_at)
    query = (
        select(day, func.count())
        .where(Certificate.status == CertStatus.REVOKED, Certificate.revoked_at >= start)
        .group_by(day)
    )
    if environment is not None:
        query = query.join(Authority, Authority.id == Certificate.authority_id).where(
            Authority.environment == environment
        )
    # SQLite's date() is text, PostgreSQL's a date: one key either way
    counts = {str(value): count for value, count in session.execute(query)}
    session.commit()
    return [(first + timedelta(days=i), counts.get(str(first + timedelta(days=i)), 0)) for i in range(days)]


# -- campaigns -----------------------------------------------------------------------------------
CAMPAIGN_COLUMNS = (
    "id", "environment", "from_ca", "to_ca", "started_at", "devices", *STATES, "reenrolled_percent",
)  # fmt: skip
CAMPAIGN_DEVICE_COLUMNS = ("campaign_id", "device", "state", "detail")


def _find(session: Session, name: str) -> Campaign:
    """A campaign by its number or by the CA it moves devices off."""
    if name.isdigit():
        return get_campaign(session, int(name))
    return get_campaign(session, from_ca=name)


def campaigns(session: Session, now: datetime, *, name: str | None = None) -> Report:
    """Every campaign's progress (newest first); with ``name``, that one and each of its devices."""
    chosen = [_find(session, name)] if name is not None else [c for c, _ in list_campaigns(session)]
    summary, devices = [], []
    for campaign in chosen:
        result = progress(session, campaign, lambda: now)
        counts = [result.count(state) for state in STATES]
        done = round(100 * counts[0] / result.total, 1) if result.total else None
        summary.append(
            (
                campaign.id, campaign.environment, campaign.from_authority.name, campaign.to_authority.name,
                campaign.started_at, result.total, *counts, done,
            )
        )  # fmt: skip
        if name is not None:
            devices += [(campaign.id, d.serial, d.state, d.detail) for d in result.devices]
    session.commit()
    table = Table("campaigns", CAMPAIGN_COLUMNS, summary, "campaigns")
    # Always in the JSON document (empty without a name), so its keys do not depend on the arguments.
    device_table = Table("devices", CAMPAIGN_DEVICE_COLUMNS, devices, "devices", in_text=name is not None)
    note = f"{len(summary)} campaign(s)" if name is None else f"campaign {summary[0][0]}: {summary[0][5]} device(s)"
    csv_table = device_table if name is not None else table
    return Report("campaign", now, {"campaign": name}, [table, device_table], csv_table, [note])


# -- rendering -----------------------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    return iso_utc(value) if isinstance(value, datetime) else value


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return iso_utc(value) or ""
    return str(value)


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def _text_table(columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> list[str]:
    if not rows:
        return ["(none)"]
    cells = [[column.upper() for column in columns], *[[_text_value(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]


def document(report: Report) -> dict[str, Any]:
    """The JSON export: report, generated_at, parameters, then one list of objects per table."""
    doc: dict[str, Any] = {
        "report": report.kind,
        "generated_at": iso_utc(report.generated_at),
        "parameters": {key: _json_value(value) for key, value in report.parameters.items()},
    }
    for table in report.tables:
        doc[table.name] = [
            {column: _json_value(value) for column, value in zip(table.columns, row, strict=True)} for row in table.rows
        ]
    return doc


def render(report: Report, fmt: str) -> bytes:
    """The exact bytes of an export in ``fmt`` (table, csv or json), UTF-8, ending with a newline."""
    if fmt == "json":
        return (json.dumps(document(report), indent=2, ensure_ascii=False) + "\n").encode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180
        writer.writerow(report.csv.columns)
        writer.writerows([_csv_value(value) for value in row] for row in report.csv.rows)
        return out.getvalue().encode()
    if fmt != "table":
        raise InputError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    lines = [f"{report.kind} report, {_text_value(report.generated_at)}", *report.notes]
    shown = [table for table in report.tables if table.in_text]
    for table in shown:
        lines.append("")
        if table.title and len(shown) > 1:
            lines.append(f"{table.title}:")
        lines += _text_table(table.columns, table.rows)
    return ("\n".join(lines) + "\n").encode()
