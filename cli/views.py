"""The objects of `--json` output, one builder per kind, so every command names a field the same way.

Field names are snake_case, timestamps ISO 8601 UTC (``2026-12-03T10:00:00Z``), serials upper-case hex;
docs/cli-json.md lists them and tests/cli/test_cli_json.py holds the commands to it. Never a secret:
no PIN, no one-time secret or API token, no private key (the stores hold only their hashes anyway).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.clock import iso_utc
from ca.status.certificates import display_status
from ca.store.models import AuditEvent, Authority, Certificate, Device


def authority(ca: Authority) -> dict[str, Any]:
    return {
        "name": ca.name,
        "role": ca.role,
        "environment": ca.environment,
        "status": ca.status,
        "subject": ca.subject,
        "serial": ca.serial,
        "key_type": ca.key_type,
        "rsa_padding": ca.rsa_padding,
        "parent": ca.parent.name if ca.parent is not None else None,
        "not_before": iso_utc(ca.not_before),
        "not_after": iso_utc(ca.not_after),
    }


def device_serials(session: Session, certificates: Iterable[Certificate]) -> dict[int, str]:
    """The device serial of each certificate's ``device_id``, in one query."""
    ids = {c.device_id for c in certificates if c.device_id is not None}
    if not ids:
        return {}
    return {row.id: row.serial for row in session.execute(select(Device.id, Device.serial).where(Device.id.in_(ids)))}


def certificate(c: Certificate, now: datetime, devices: dict[int, str]) -> dict[str, Any]:
    return {
        "serial": c.serial,
        "profile": c.profile,
        "status": display_status(c, now),
        "subject": c.subject,
        "common_name": c.common_name,
        "ca": c.authority.name,
        "environment": c.authority.environment,
        "device": devices.get(c.device_id) if c.device_id is not None else None,
        "not_before": iso_utc(c.not_before),
        "not_after": iso_utc(c.not_after),
        "revocation_reason": c.revocation_reason,
    }


def certificate_detail(c: Certificate, now: datetime, devices: dict[int, str]) -> dict[str, Any]:
    pem = None
    if c.der:
        pem = x509.load_der_x509_certificate(c.der).public_bytes(serialization.Encoding.PEM).decode()
    return {
        **certificate(c, now, devices),
        "sha256": c.fingerprint_sha256,
        "revoked_at": iso_utc(c.revoked_at),
        "invalidity_date": iso_utc(c.invalidity_date),
        "pem": pem,
    }


def device(d: Device) -> dict[str, Any]:
    return {
        "serial": d.serial,
        "model": d.model,
        "environment": d.environment,
        "enabled": d.enabled,
        "first_enrollment_open": d.enrollment_open,
        "registered_at": iso_utc(d.created_at),
    }


def audit_entry(e: AuditEvent) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "at": iso_utc(e.at),
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "details": json.loads(e.details or "{}"),
        "hash": e.hash,
    }
