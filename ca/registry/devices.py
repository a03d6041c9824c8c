"""The device registry: only registered, enabled chargers of the right environment enroll."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from ca import audit
from ca.clock import Clock, utcnow
from ca.errors import ChargepkiError, ConflictError, InputError, NotFoundError
from ca.issuance.names import check_charger_identity, check_environment
from ca.kinds import CertStatus
from ca.status.revocation import apply_revocation
from ca.store.models import Certificate, Device
from ca.work import Work

MAX_MODEL = 64


def _check_model(model: str | None) -> str | None:
    if model is None or not model.strip():
        return None
    model = model.strip()
    if len(model) > MAX_MODEL or any(ord(ch) < 0x20 for ch in model):
        raise InputError(f"model {model[:20]!r}… must be at most {MAX_MODEL} printable characters")
    return model


def add_device(work: Work, *, serial: str, model: str | None = None, environment: str = "production") -> Device:
    with work.transaction() as session:
        device = _new_device(session, serial, model, environment, work.now)
        audit.record(
            session,
            "device.added",
            actor=work.actor,
            subject=device.serial,
            now=work.now,
            details={"model": device.model, "environment": device.environment},
        )
    return device


def _new_device(session: Session, serial: str, model: str | None, environment: str, now: Clock) -> Device:
    serial = check_charger_identity(serial.strip())
    environment = check_environment(environment)
    if session.scalar(select(Device.id).where(Device.serial == serial)) is not None:
        raise ConflictError(f"device {serial} is already registered")
    device = Device(
        serial=serial,
        model=_check_model(model),
        environment=environment,
        enabled=True,
        enrollment_open=True,
        created_at=now(),
    )
    session.add(device)
    session.flush()
    return device


@dataclass
class ImportResult:
    accepted: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def import_devices(
    work: Work,
    *,
    stream: TextIO,
    default_environment: str = "production",
    batch: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Register devices from CSV (header ``serial[,model][,environment]``), in batches.

    Every row is judged on its own: a bad row is refused with its line number and reason and
    the rest go in. One audit entry per batch keeps the chain short for large factory files;
    each batch is one transaction, so an interrupted import keeps the batches before it.
    """
    session, actor, now = work.session, work.actor, work.now
    reader = csv.DictReader(stream)
    if reader.fieldnames is None or "serial" not in [name.strip().lower() for name in reader.fieldnames]:
        raise InputError("the CSV needs a header row with a 'serial' column (optional: model, environment)")
    result = ImportResult()
    pending: list[str] = []
    seen: set[str] = set()

    def flush() -> None:
        if pending:
            audit.record(
                session,
                "device.imported",
                actor=actor,
                now=now,
                details={"count": len(pending), "first": pending[0], "last": pending[-1]},
            )
            session.commit()
            pending.clear()

    try:
        for row in _rows(reader, result):
            line, values = row
            serial = (values.get("serial") or "").strip()
            try:
                if serial in seen:
                    raise ConflictError(f"device {serial} appears twice in this file")
                device = _new_device(
                    session,
                    serial,
                    values.get("model"),
                    (values.get("environment") or "").strip() or default_environment,
                    now,
                )
            except ChargepkiError as exc:
                result.refused.append((line, str(exc)))
            else:
                seen.add(device.serial)
                pending.append(device.serial)
                result.accepted += 1
                if len(pending) >= batch:
                    flush()
            if progress is not None:
                progress(1)
        flush()
    except BaseException:
        session.rollback()  # the batch in progress; committed batches stay
        raise
    return result


def _rows(reader: csv.DictReader[str], result: ImportResult) -> Iterable[tuple[int, dict[str, str]]]:
    try:
        for values in reader:
            normalised = {(key or "").strip().lower(): (value or "") for key, value in values.items() if key}
            if None in values:  # more cells than headers
                result.refused.append((reader.line_num, "too many columns"))
                continue
            yield reader.line_num, normalised
    except csv.Error as exc:
        result.refused.append((reader.line_num, f"unreadable CSV: {exc}"))


def get_device(session: Session, serial: str) -> Device:
    device = session.scalar(select(Device).where(Device.serial == serial.strip()))
    if device is None:
        raise NotFoundError(f"device {serial.strip()} is not registered")
    return device


def list_devices(session: Session, *, environment: str | None = None, limit: int | None = None) -> list[Device]:
    query = select(Device).order_by(Device.serial)
    if environment:
        query = query.where(Device.environment == environment)
    if limit:
        query = query.limit(limit)
    return list(session.scalars(query))


DEVICE_STATES = ("enabled", "disabled")


def search_devices(
    session: Session,
    *,
    serial: str | None = None,
    model: str | None = None,
    state: str | None = None,
    environment: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Device], bool]:
    """Devices whose serial starts with ``serial`` (the unique index's range), of ``model``, ``state``
    (enabled or disabled) and ``environment``, by serial; and whether more follow this page."""
    query = select(Device).order_by(Device.serial)
    if serial:
        query = query.where(Device.serial.startswith(serial.strip(), autoescape=True))
    if model:
        query = query.where(Device.model == model)
    if state is not None:
        if state not in DEVICE_STATES:
            raise InputError(f"unknown device state {state!r} (known: {', '.join(DEVICE_STATES)})")
        query = query.where(Device.enabled.is_(state == "enabled"))
    if environment:
        query = query.where(Device.environment == environment)
    found = list(session.scalars(query.offset(offset).limit(limit + 1)))
    return found[:limit], len(found) > limit


def device_certificates(session: Session, device: Device) -> list[Certificate]:
    return list(
        session.scalars(select(Certificate).where(Certificate.device_id == device.id).order_by(Certificate.created_at))
    )


def current_certificate(session: Session, device: Device, now: Clock = utcnow) -> Certificate | None:
    """The device's valid, unexpired charger certificate (at most one, by the anti-cloning rule)."""
    return session.scalar(
        select(Certificate)
        .where(
            Certificate.device_id == device.id,
            Certificate.profile == "charger",
            Certificate.status == CertStatus.VALID,
            Certificate.not_after > now(),
            Certificate.revoke_after.is_(None),
        )
        .order_by(Certificate.created_at.desc())
        .limit(1)
    )


def disable_device(
    work: Work, *, serial: str, revoke: bool = False, reason: str = "cessationOfOperation"
) -> tuple[Device, list[Certificate]]:
    """Refuse further enrollment; with ``revoke`` also revoke every certificate still valid."""
    with work.transaction() as session:
        device = get_device(session, serial)
        device.enabled = False
        revoked = []
        if revoke:
            for certificate in device_certificates(session, device):
                if certificate.status == CertStatus.VALID:
                    apply_revocation(session, certificate, reason, actor=work.actor, status=work.signer(), now=work.now)
                    revoked.append(certificate)
        audit.record(
            session,
            "device.disabled",
            actor=work.actor,
            subject=device.serial,
            now=work.now,
            details={"revoked": [c.serial for c in revoked]},
        )
    return device, revoked


def enable_device(work: Work, *, serial: str) -> Device:
    return _change(work, serial, "device.enabled", enabled=True)


def reset_device(work: Work, *, serial: str) -> Device:
    """Re-open first-time enrollment (a replaced main board, a wiped secure element)."""
    return _change(work, serial, "device.reset", enrollment_open=True)


def _change(work: Work, serial: str, action: str, **values: bool) -> Device:
    with work.transaction() as session:
        device = get_device(session, serial)
        for name, value in values.items():
            setattr(device, name, value)
        audit.record(session, action, actor=work.actor, subject=device.serial, now=work.now)
    return device
