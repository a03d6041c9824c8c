"""SECC certificates (profile ``v2g-secc``) under a CPO Sub-CA 2, independent of the protocol.

``issue_secc`` is the core the CSMS API calls for ``SignCertificate`` with
``certificateType=V2GCertificate`` (the CSMS has authenticated itself and the charging station);
``enroll_secc`` is what EST calls under a V2G label, authenticating the caller by its TLS client
certificate first. Both run in ``ca.enrollment.pipeline``'s pipeline (``_audited``): every check runs
before the token signs, every refusal is rolled back and audited (``v2g.refused``) with its
reason and code, and failed authentications are counted and locked out as on the charger routes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import partial

from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.authorities.v2g import current_sub_ca_2
from ca.clock import Clock, utcnow
from ca.enrollment.pipeline import (  # the pipeline and checks enrollment uses, shared so both flows refuse alike
    Credentials,
    EnrollmentSettings,
    IssuerFactory,
    _actor,
    _audited,
    _check_binding,
    _check_current,
    _check_device,
    _registered_device,
    _stored_certificate,
)
from ca.errors import AuthenticationError, ConflictError, PolicyError
from ca.issuance.csr import CsrRequest
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.names import check_secc_id
from ca.issuance.profiles import get_profile
from ca.status.revocation import apply_revocation
from ca.status.signal import StatusSigner
from ca.store.models import Authority, Certificate, Device

REFUSED = "v2g.refused"
DEFAULTS = EnrollmentSettings()


def issue_secc(
    session: Session,
    issuers: IssuerFactory,
    environment: str | None,
    csr_data: bytes,
    secc_id: str | None,
    *,
    actor: str,
    status: StatusSigner,
    device_serial: str | None = None,
    validity: timedelta | None = None,
    settings: EnrollmentSettings = DEFAULTS,
    now: Clock = utcnow,
    before_commit: Callable[[Certificate], None] | None = None,
    address: str | None = None,
) -> Certificate:
    """Issue a ``v2g-secc`` certificate for ``secc_id`` (None: the CSR's CN) under ``environment``'s CPO Sub-CA 2.

    The caller has authenticated the requester (``actor``, from ``address``); ``device_serial``
    (the charging station the request came from, when known) must be registered, enabled and of
    this environment, and an SECC ID already certified for another station is refused. The CSR's
    CN must be ``secc_id``. Returns the committed row (``row.der``); an older certificate of the
    same SECC ID is superseded (revoked now, or after ``settings.supersede_grace``). Refusals go
    through ``enrollment._audited``, as a charger's do.
    """
    authority = current_sub_ca_2(session, environment)
    flow = partial(
        _issue_secc, secc_id=secc_id, device_serial=device_serial, validity=validity, before_commit=before_commit
    )
    credentials = Credentials(principal=actor, address=address)
    return _audited(REFUSED, flow, session, issuers, status, authority, csr_data, credentials, settings, now)


def _issue_secc(
    session: Session,
    issuers: IssuerFactory,
    status: StatusSigner,
    authority: Authority,
    csr: CsrRequest,
    credentials: Credentials,
    settings: EnrollmentSettings,
    now: Clock,
    *,
    secc_id: str | None,
    device_serial: str | None,
    validity: timedelta | None,
    before_commit: Callable[[Certificate], None] | None,
) -> Certificate:
    device = _registered_device(session, device_serial) if device_serial is not None else None
    return _issue(
        session,
        issuers,
        status,
        authority,
        csr,
        csr.common_name if secc_id is None else secc_id,
        device,
        _actor(credentials),
        validity,
        settings,
        now,
        before_commit,
    )


def enroll_secc(
    session: Session,
    issuers: IssuerFactory,
    authority: Authority,
    csr_data: bytes,
    credentials: Credentials,
    *,
    status: StatusSigner,
    settings: EnrollmentSettings = DEFAULTS,
    now: Clock = utcnow,
) -> Certificate:
    """EST under a V2G label: the TLS client certificate is a registration authority's (the CSMS,
    any SECC ID), the charging station's current charger certificate (an SECC ID not held by
    another station), or the SECC certificate being renewed (the same SECC ID). Lockouts,
    failure counts and refusal audit are the charger routes' (``enrollment._audited``)."""
    return _audited(REFUSED, _enroll_secc, session, issuers, status, authority, csr_data, credentials, settings, now)


def _enroll_secc(
    session: Session,
    issuers: IssuerFactory,
    status: StatusSigner,
    authority: Authority,
    csr: CsrRequest,
    credentials: Credentials,
    settings: EnrollmentSettings,
    now: Clock,
) -> Certificate:
    if credentials.client_certificate is None:
        raise AuthenticationError(
            "an SECC certificate needs a TLS client certificate: a registration authority's, the charging "
            "station's, or the SECC certificate being renewed"
        )
    caller = _stored_certificate(session, credentials.client_certificate)
    if caller is None or caller.profile not in ("ra", "charger", "v2g-secc"):
        raise AuthenticationError("the client certificate is not an RA, charger or SECC certificate issued here")
    _check_current(caller, authority, now, f"{caller.profile} client certificate")
    if caller.profile == "v2g-secc" and caller.common_name != csr.common_name:
        raise PolicyError(
            f"the CSR's CN {csr.common_name!r} does not match the SECC certificate being renewed", code="cn_mismatch"
        )
    device = session.get(Device, caller.device_id) if caller.device_id is not None else None
    _check_binding(csr.csr, credentials, settings)
    return _issue(
        session, issuers, status, authority, csr, csr.common_name, device, _actor(credentials), None, settings, now
    )


def _issue(
    session: Session,
    issuers: IssuerFactory,
    status: StatusSigner,
    authority: Authority,
    csr: CsrRequest,
    secc_id: str,
    device: Device | None,
    actor: str,
    validity: timedelta | None,
    settings: EnrollmentSettings,
    now: Clock,
    before_commit: Callable[[Certificate], None] | None = None,
) -> Certificate:
    secc_id = check_secc_id(secc_id)
    if csr.common_name != secc_id:
        raise PolicyError(f"the CSR's CN {csr.common_name!r} is not the SECC ID {secc_id!r}", code="cn_mismatch")
    if authority.role != "v2g-sub-ca-2" or authority.status != "active":
        raise PolicyError(f"CA {authority.name} does not issue SECC certificates")
    if device is not None:
        _check_device(device, authority)
    _check_secc_id_owner(session, authority, secc_id, device)
    issuer = issuers(authority)
    request = request_from_csr(
        get_profile("v2g-secc"), csr, issuer, validity, device_id=device.id if device is not None else None
    )

    def last_checks(row: Certificate) -> None:
        _supersede(session, authority, row, settings, actor, status, now)
        if before_commit is not None:
            before_commit(row)

    return issue(
        session,
        issuer,
        request,
        actor=actor,
        status=status,
        now=now,
        before_commit=last_checks,
    )


def _current_secc(session: Session, authority: Authority, secc_id: str, exclude_id: int = 0) -> list[Certificate]:
    """Valid SECC certificates of ``secc_id`` under the environment's Sub-CA 2s.

    ``exclude_id`` leaves the certificate being issued out: it must not be loaded into the session
    before ``issue`` attaches it after the commit.
    """
    sub_cas = select(Authority.id).where(
        Authority.environment == authority.environment, Authority.role == "v2g-sub-ca-2"
    )
    return list(
        session.scalars(
            select(Certificate).where(
                Certificate.profile == "v2g-secc",
                Certificate.common_name == secc_id,
                Certificate.status == "valid",
                Certificate.authority_id.in_(sub_cas),
                Certificate.id != exclude_id,
            )
        )
    )


def _check_secc_id_owner(session: Session, authority: Authority, secc_id: str, device: Device | None) -> None:
    """One SECC ID, one station: a station cannot take over another station's SECC ID."""
    if device is None:
        return
    for current in _current_secc(session, authority, secc_id):
        if current.device_id is not None and current.device_id != device.id:
            raise ConflictError(f"SECC ID {secc_id!r} is certified for another charging station", code="secc_id_taken")


def _supersede(
    session: Session,
    authority: Authority,
    new: Certificate,
    settings: EnrollmentSettings,
    actor: str,
    status: StatusSigner,
    now: Clock,
) -> None:
    for older in _current_secc(session, authority, new.common_name or "", exclude_id=new.id):
        if settings.supersede_grace > timedelta(0):
            if older.revoke_after is None:
                older.revoke_after = now() + settings.supersede_grace
        else:
            apply_revocation(session, older, "superseded", actor=actor, status=status, now=now)
