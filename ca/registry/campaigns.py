"""Fleet re-enrollment campaigns: moving the chargers of a superseded issuing CA onto its successor.

A campaign records which devices held a current certificate from the old CA (devices that get
one later, from an EST worker that had not noticed the rotation yet, join at the next look).
Its progress is read from the store, never counted by hooks: a device is re-enrolled once it
holds a newer charger certificate from another CA, whichever path issued it (EST
``simplereenroll``, the CSMS API's sign, a re-enrollment after ``device reset``). So the
campaign is driven by the chargers' normal renewal traffic, and the counts cannot drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, exists, func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from ca import audit
from ca.authorities.issuers import default_issuing_ca, get_authority
from ca.clock import Clock, utcnow
from ca.errors import ConflictError, InputError, NotFoundError, PolicyError
from ca.kinds import CaRole, CaStatus, CertStatus
from ca.store.models import AuditEvent, Campaign, CampaignDevice, Certificate, Device
from ca.work import Work

STATES = ("reenrolled", "pending", "failed")
# Audit actions of refused renewals, and where each names the station (a charger's CN is its device
# serial): EST simplereenroll records the client certificate's CN as actor "tls:<CN>"; the CSMS API's
# sign (OCPP SignCertificate) records the CSR's CN as subject, the CSMS being the actor.
REFUSAL_ACTIONS = {"reenrollment.refused": "actor", "csms.sign.refused": "subject"}


@dataclass(frozen=True)
class DeviceProgress:
    serial: str
    state: str  # reenrolled | pending | failed
    detail: str


@dataclass(frozen=True)
class Progress:
    campaign: Campaign
    devices: list[DeviceProgress]

    def count(self, state: str) -> int:
        return sum(1 for device in self.devices if device.state == state)

    @property
    def total(self) -> int:
        return len(self.devices)


_CERTIFICATES = Certificate.__table__
_MEMBERS = CampaignDevice.__table__


def _enlist(session: Session, campaign: Campaign, now: datetime) -> int:
    """Add every device whose current charger certificate comes from the old CA and is not in yet."""
    current = (
        select(
            literal(campaign.id),
            _CERTIFICATES.c.device_id,
            func.max(_CERTIFICATES.c.id),
            literal(now, type_=_MEMBERS.c.joined_at.type),
        )
        .where(
            _CERTIFICATES.c.authority_id == campaign.from_authority_id,
            _CERTIFICATES.c.profile == "charger",
            _CERTIFICATES.c.status == CertStatus.VALID,
            _CERTIFICATES.c.not_after > now,
            _CERTIFICATES.c.revoke_after.is_(None),
            _CERTIFICATES.c.device_id.is_not(None),
            ~exists().where(_MEMBERS.c.campaign_id == campaign.id, _MEMBERS.c.device_id == _CERTIFICATES.c.device_id),
        )
        .group_by(_CERTIFICATES.c.device_id)
    )
    members = select(func.count()).select_from(_MEMBERS).where(_MEMBERS.c.campaign_id == campaign.id)
    before = session.execute(members).scalar_one()
    # (counted, not taken from rowcount: psycopg reports none for INSERT … SELECT here)
    session.execute(insert(_MEMBERS).from_select(["campaign_id", "device_id", "certificate_id", "joined_at"], current))
    return int(session.execute(members).scalar_one() - before)


def start_campaign(work: Work, *, from_ca: str) -> tuple[Campaign, int]:
    """Open a campaign from ``from_ca`` to the environment's newest issuing CA; returns it and its size."""
    try:
        with work.transaction() as session:
            old = get_authority(session, from_ca)
            if old.role != CaRole.ISSUING:
                raise InputError(f"CA {old.name} is a {old.role} CA; campaigns move devices off an issuing CA")
            if old.status != CaStatus.ACTIVE:
                raise PolicyError(f"CA {old.name} is retired: none of its certificates is valid any more")
            target = default_issuing_ca(session, old.environment)
            if target.id == old.id:
                raise PolicyError(
                    f"CA {old.name} is the newest issuing CA of {old.environment}: run `chargepki ca rotate` first"
                )
            existing = session.scalar(select(Campaign).where(Campaign.from_authority_id == old.id))
            if existing is not None:
                raise ConflictError(
                    f"campaign {existing.id} already moves the devices of {old.name}: see `chargepki campaign status`"
                )
            started = work.now()
            campaign = Campaign(
                environment=old.environment,
                from_authority_id=old.id,
                to_authority_id=target.id,
                actor=work.actor,
                started_at=started,
            )
            session.add(campaign)
            session.flush()
            size = _enlist(session, campaign, started)
            audit.record(
                session,
                "campaign.started",
                actor=work.actor,
                subject=old.name,
                now=work.now,
                details={"campaign": campaign.id, "environment": old.environment, "to": target.name, "devices": size},
            )
    except IntegrityError:
        raise ConflictError(f"a campaign from {from_ca} was started concurrently") from None
    return campaign, size


def get_campaign(session: Session, campaign_id: int | None = None, from_ca: str | None = None) -> Campaign:
    """A campaign by id, by its old CA, or the newest one."""
    query = select(Campaign).order_by(Campaign.id.desc()).limit(1)
    if campaign_id is not None:
        query = query.where(Campaign.id == campaign_id)
    if from_ca is not None:
        query = query.where(Campaign.from_authority_id == get_authority(session, from_ca).id)
    campaign = session.scalar(query)
    if campaign is None:
        if campaign_id is None and from_ca is None:
            raise NotFoundError("no campaign yet: start one with `chargepki campaign start --from-ca OLD`")
        raise NotFoundError(f"no campaign {campaign_id if campaign_id is not None else 'from ' + str(from_ca)}")
    return campaign


def list_campaigns(session: Session) -> list[tuple[Campaign, int]]:
    """Every campaign with its number of devices, newest first."""
    sizes = (
        select(CampaignDevice.campaign_id, func.count().label("size")).group_by(CampaignDevice.campaign_id).subquery()
    )
    rows = session.execute(
        select(Campaign, func.coalesce(sizes.c.size, 0))
        .outerjoin(sizes, sizes.c.campaign_id == Campaign.id)
        .order_by(Campaign.id.desc())
    ).all()
    return [(campaign, int(size)) for campaign, size in rows]


def _refusals(session: Session, since: datetime) -> dict[str, str]:
    """The latest refused renewal's reason per client identity since ``since``."""
    reasons: dict[str, str] = {}
    # Sorted here, not by the database: asked to ORDER BY seq, SQLite walks the whole log in seq order
    # instead of looking the few refusals up by the action's index.
    rows = session.execute(
        select(AuditEvent.seq, AuditEvent.action, AuditEvent.actor, AuditEvent.subject, AuditEvent.details).where(
            AuditEvent.action.in_(list(REFUSAL_ACTIONS)), AuditEvent.at >= since
        )
    ).all()
    for _seq, action, actor, subject, details in sorted(rows, key=lambda row: row[0]):
        if REFUSAL_ACTIONS[action] == "subject":
            station = subject
        elif actor.startswith("tls:"):
            station = actor[4:]
        else:
            continue  # no client certificate: nothing says which station it was
        if station:
            reasons[station] = str(json.loads(details).get("reason", "refused"))
    return reasons


def progress(session: Session, campaign: Campaign, now: Clock = utcnow, *, enlist: bool = True) -> Progress:
    """Where every device of the campaign stands now (late joiners are enlisted first, unless
    ``enlist`` is false: a read-only look, as the metrics take it)."""
    moment = now()
    if enlist:
        _enlist(session, campaign, moment)
        session.commit()
    # Per device: the newest charger certificate from the old CA (an EST worker that had not seen
    # the rotation yet may have renewed it there once more) and the newest from any other CA.
    # Aggregates and primary-key joins only, so no plan goes quadratic on a large fleet, even
    # before PostgreSQL has statistics for freshly loaded tables.
    from_ca = campaign.from_authority_id
    newest = (
        select(
            Certificate.device_id,
            func.max(case((Certificate.authority_id == from_ca, Certificate.id))).label("old_id"),
            func.max(case((Certificate.authority_id != from_ca, Certificate.id))).label("other_id"),
        )
        .join(
            CampaignDevice,
            (CampaignDevice.device_id == Certificate.device_id) & (CampaignDevice.campaign_id == campaign.id),
        )
        .where(Certificate.profile == "charger", Certificate.status.in_(("valid", "revoked")))
        .group_by(Certificate.device_id)
        .subquery()
    )
    old = aliased(Certificate)
    rows = session.execute(
        select(
            Device.serial,
            Device.enabled,
            func.coalesce(newest.c.other_id > newest.c.old_id, False),
            old.status,
            old.not_after,
            old.revoke_after,
            old.revocation_reason,
        )
        .select_from(newest)
        .join(Device, Device.id == newest.c.device_id)
        .join(old, old.id == newest.c.old_id)
        .order_by(Device.serial)
    ).all()
    refusals = _refusals(session, campaign.started_at)
    session.commit()  # end the read (SQLite holds its write lock until then)
    devices = []
    for serial, enabled, has_moved, status, not_after, revoke_after, reason in rows:
        if has_moved:
            devices.append(DeviceProgress(serial, "reenrolled", "holds a certificate from a newer CA"))
        elif not enabled:
            devices.append(DeviceProgress(serial, "failed", "device disabled"))
        elif status == "revoked" or (revoke_after is not None and revoke_after <= moment):
            devices.append(DeviceProgress(serial, "failed", f"old certificate revoked ({reason or 'superseded'})"))
        elif not_after <= moment:
            devices.append(DeviceProgress(serial, "failed", "old certificate expired before re-enrollment"))
        elif serial in refusals:
            devices.append(DeviceProgress(serial, "failed", f"re-enrollment refused: {refusals[serial]}"))
        else:
            devices.append(DeviceProgress(serial, "pending", f"certificate valid until {not_after:%Y-%m-%d}"))
    return Progress(campaign, devices)
