"""The pipeline's subject policy per leaf profile (``SubjectRule``s): charger and SECC.

A rule checks, before anything is signed, what the certificate's CN may be and for which
device, and says what a new certificate supersedes in the issuing transaction: at most one
current charger certificate per device, and one current SECC certificate per SECC ID and ISO
15118 version (a station holds an ISO 15118-2 and an ISO 15118-20 leaf side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ca.enrollment.authenticators import registered_device
from ca.enrollment.policy import Attempt, Authenticated
from ca.errors import ConflictError, PolicyError
from ca.issuance.csr import CsrRequest
from ca.issuance.names import check_charger_identity, check_secc_id
from ca.issuance.profiles import ISO15118_2, V2G_VERSIONS, V2gVersion
from ca.kinds import CaStatus, CertStatus
from ca.status.revocation import apply_revocation
from ca.store.models import Authority, Certificate, Device
from ca.store.prepared import Prepared, as_objects
from ca.work import Work


def check_device(device: Device, authority: Authority) -> None:
    if not device.enabled:
        raise PolicyError(f"device {device.serial} is disabled", code="device_disabled")
    if device.environment != authority.environment:
        raise PolicyError(
            f"device {device.serial} belongs to environment {device.environment}, not {authority.environment}",
            code="other_environment",
        )


def _retire(work: Work, attempt: Attempt, olders: list[Certificate]) -> None:
    """Revoke superseded certificates now, or after the grace period (a certificate already
    counting down keeps its deadline: renewing twice buys no time)."""
    grace = attempt.settings.supersede_grace
    for older in olders:
        if grace > timedelta(0):
            if older.revoke_after is None:
                older.revoke_after = work.now() + grace
        else:
            apply_revocation(work.session, older, "superseded", actor=work.actor, status=work.signer(), now=work.now)


# Prepared once: these run on every enrollment, and building a statement costs more than running it.
# The rows themselves, in one statement: a re-enrollment has one to retire, a first enrollment none.
_CERTIFICATES = Certificate.__table__
_OLDER_CHARGER_CERTIFICATES = Prepared(
    select(_CERTIFICATES).where(
        _CERTIFICATES.c.device_id == bindparam("device_id"),
        _CERTIFICATES.c.profile == "charger",
        _CERTIFICATES.c.status == CertStatus.VALID,
        _CERTIFICATES.c.id != bindparam("new_id"),
    )
)
_DEVICES = Device.__table__
_CLOSE_ENROLLMENT = Prepared(
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("device_id"), _DEVICES.c.enrollment_open)
    .values(enrollment_open=False)
)


class ChargerRule:
    """Profile ``charger``: the CN is a registered, enabled device of the CA's environment."""

    profile = "charger"

    def check(self, work: Work, attempt: Attempt, csr: CsrRequest, who: Authenticated) -> Device:
        who.expect(csr.common_name)
        check_charger_identity(csr.common_name)  # before it reaches a query (a NUL fails on PostgreSQL)
        device = who.device or registered_device(work.session, csr.common_name)
        check_device(device, attempt.authority)
        return device

    def supersede(self, work: Work, attempt: Attempt, device: Device | None, new: Certificate) -> None:
        """At most one current charger certificate per device; a first certificate closes enrollment."""
        assert device is not None
        session = work.session
        found = _OLDER_CHARGER_CERTIFICATES.run(session, {"device_id": device.id, "new_id": new.id})
        olders = as_objects(session, Certificate, found)
        if olders:
            _retire(work, attempt, olders)
        if device.enrollment_open:  # a statement, not the ORM's flush of the loaded device
            _CLOSE_ENROLLMENT.run(session, {"device_id": device.id})
            set_committed_value(device, "enrollment_open", False)


@dataclass(frozen=True)
class SeccRule:
    """The SECC leaf profile of one ISO 15118 version (``v2g-secc``, ``v2g20-secc``): the CN is an
    SECC ID (ISO 15118 syntax), under that version's CPO Sub-CA 2; a station cannot take over
    another station's SECC ID (in either version); a new leaf supersedes the SECC ID's previous
    leaf of the same version only."""

    profile: str
    issuer_role: str  # the version's CPO Sub-CA 2

    @classmethod
    def of(cls, version: V2gVersion) -> SeccRule:
        return cls(version.secc, version.sub_ca_2)

    def check(self, work: Work, attempt: Attempt, csr: CsrRequest, who: Authenticated) -> Device | None:
        who.expect(csr.common_name)
        secc_id = check_secc_id(csr.common_name if attempt.secc_id is None else attempt.secc_id)
        if csr.common_name != secc_id:
            raise PolicyError(f"the CSR's CN {csr.common_name!r} is not the SECC ID {secc_id!r}", code="cn_mismatch")
        authority = attempt.authority
        if authority.role != self.issuer_role or authority.status != CaStatus.ACTIVE:
            raise PolicyError(f"CA {authority.name} does not issue {self.profile} SECC certificates")
        if who.device is not None:
            check_device(who.device, authority)
            for current in current_secc(work.session, authority, secc_id, versions=tuple(V2G_VERSIONS.values())):
                if current.device_id is not None and current.device_id != who.device.id:
                    raise ConflictError(
                        f"SECC ID {secc_id!r} is certified for another charging station", code="secc_id_taken"
                    )
        return who.device

    def supersede(self, work: Work, attempt: Attempt, device: Device | None, new: Certificate) -> None:
        olders = current_secc(work.session, attempt.authority, new.common_name or "", exclude_id=new.id)
        _retire(work, attempt, olders)


def current_secc(
    session: Session,
    authority: Authority,
    secc_id: str,
    exclude_id: int = 0,
    *,
    versions: tuple[V2gVersion, ...] | None = None,
) -> list[Certificate]:
    """Valid SECC certificates of ``secc_id`` under the Sub-CA 2s of ``authority``'s environment and
    ISO 15118 version (``versions``: of these versions instead).

    ``exclude_id`` leaves the certificate being issued out: it must not be loaded into the session
    before ``issue`` attaches it after the commit.
    """
    if versions is None:
        versions = tuple(v for v in V2G_VERSIONS.values() if v.sub_ca_2 == authority.role)
    sub_cas = select(Authority.id).where(
        Authority.environment == authority.environment, Authority.role.in_([v.sub_ca_2 for v in versions])
    )
    return list(
        session.scalars(
            select(Certificate).where(
                Certificate.profile.in_([v.secc for v in versions]),
                Certificate.common_name == secc_id,
                Certificate.status == CertStatus.VALID,
                Certificate.authority_id.in_(sub_cas),
                Certificate.id != exclude_id,
            )
        )
    )


CHARGER = ChargerRule()
SECC_RULES = {iso: SeccRule.of(version) for iso, version in V2G_VERSIONS.items()}
SECC = SECC_RULES[ISO15118_2]
