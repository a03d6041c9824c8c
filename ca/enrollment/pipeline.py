"""Enrollment and re-enrollment of chargers, independent of the protocol that carries them.

EST (``web/est.py``) and the CSMS API (``web/api.py``) call these with what the transport
authenticated: HTTP Basic credentials, a TLS client certificate, the ``tls-unique`` value, or
(CSMS API) the CSMS that relays a charger's CSR.
Every check happens before anything is signed; every refusal is audited with its reason.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from cryptography import x509
from cryptography.x509.oid import AttributeOID, NameOID
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ca import audit
from ca.authorities.issuers import Issuer
from ca.clock import Clock, utcnow
from ca.enrollment import auth_limits
from ca.enrollment.auth_limits import AuthLimits
from ca.errors import AuthenticationError, ChargepkiError, ConflictError, PolicyError, RateLimitedError
from ca.issuance.csr import CsrRequest, read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.names import check_charger_identity
from ca.issuance.profiles import get_profile
from ca.keys.keyspec import KeySpec, key_spec
from ca.ocpp_limits import CERTIFICATE_CHAIN_CHARS
from ca.registry.devices import current_certificate
from ca.registry.secrets import consume_secret, restore_secret, secret_is_valid
from ca.status.certificates import intermediates_pem, pem_certificate
from ca.status.revocation import apply_revocation
from ca.status.signal import StatusSigner
from ca.store.models import Authority, Certificate, Device

# Binds a CA to its token key (``lambda a: issuer_for(a, token)``); called only once every check passed,
# so a refused request never touches the token.
IssuerFactory = Callable[[Authority], Issuer]


@dataclass(frozen=True)
class Credentials:
    """What the transport established about the caller."""

    username: str | None = None
    password: str | None = None
    client_certificate: bytes | None = None  # DER, verified by TLS or by a trusted proxy
    address: str | None = None
    tls_unique: bytes | None = None  # TLS 1.2 channel binding, when available
    principal: str | None = None  # who the interface authenticated, when it is not one of the above (csms:NAME)


@dataclass(frozen=True)
class EnrollmentSettings:
    supersede_grace: timedelta = timedelta(0)
    require_tls_unique: bool = False
    limits: AuthLimits = field(default_factory=AuthLimits)


def requested_key(authority: Authority) -> KeySpec:
    """The EC key type to ask clients of ``authority`` for (EST ``csrattrs``): the CA's own curve
    when its leaves may use it, else the first EC type the leaf profile allows."""
    profile = get_profile("v2g-secc" if authority.role == "v2g-sub-ca-2" else "charger")
    if authority.key_type in profile.key_types and key_spec(authority.key_type).curve_name is not None:
        return key_spec(authority.key_type)
    return key_spec(next(name for name in profile.key_types if key_spec(name).curve_name is not None))


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _stored_certificate(session: Session, der: bytes) -> Certificate | None:
    return session.scalar(select(Certificate).where(Certificate.fingerprint_sha256 == _fingerprint(der)))


def _check_binding(csr: x509.CertificateSigningRequest, credentials: Credentials, settings: EnrollmentSettings) -> None:
    """RFC 7030 §3.5: challengePassword = base64(tls-unique) proves the CSR came over this TLS session."""
    try:
        value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        if settings.require_tls_unique:
            raise PolicyError(
                "this server requires the tls-unique value in the CSR's challengePassword", code="binding_mismatch"
            ) from None
        return
    if credentials.tls_unique is None:
        raise PolicyError(
            "the CSR carries a challengePassword but this connection has no tls-unique value "
            "(TLS 1.3 or a terminating proxy)",
            code="binding_mismatch",
        )
    expected = base64.b64encode(credentials.tls_unique)
    if bytes(value).strip() != expected:
        raise PolicyError(
            "the CSR's challengePassword does not match this TLS session's tls-unique value", code="binding_mismatch"
        )


def _check_device(device: Device, authority: Authority) -> None:
    if not device.enabled:
        raise PolicyError(f"device {device.serial} is disabled", code="device_disabled")
    if device.environment != authority.environment:
        raise PolicyError(
            f"device {device.serial} belongs to environment {device.environment}, not {authority.environment}",
            code="other_environment",
        )


# Prepared once: these run on every enrollment, and building a statement costs more than running it.
_CERTIFICATES = Certificate.__table__
_OLDER_CHARGER_CERTIFICATES = select(_CERTIFICATES.c.id).where(
    _CERTIFICATES.c.device_id == bindparam("device_id"),
    _CERTIFICATES.c.profile == "charger",
    _CERTIFICATES.c.status == "valid",
    _CERTIFICATES.c.id != bindparam("new_id"),
)
_DEVICES = Device.__table__
_CLOSE_ENROLLMENT = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("device_id"), _DEVICES.c.enrollment_open)
    .values(enrollment_open=False)
)


def _supersede(
    session: Session,
    device: Device,
    new: Certificate,
    settings: EnrollmentSettings,
    actor: str,
    status: StatusSigner,
    now: Clock,
) -> None:
    """At most one current charger certificate per device: the older ones go (after the grace period)."""
    older_ids = session.execute(_OLDER_CHARGER_CERTIFICATES, {"device_id": device.id, "new_id": new.id}).scalars().all()
    olders = session.scalars(select(Certificate).where(Certificate.id.in_(older_ids))).all() if older_ids else []
    for older in olders:
        if settings.supersede_grace > timedelta(0):
            # A certificate already counting down keeps its deadline: renewing twice buys no time.
            if older.revoke_after is None:
                older.revoke_after = now() + settings.supersede_grace
        else:
            apply_revocation(session, older, "superseded", actor=actor, status=status, now=now)
    if device.enrollment_open:  # a statement, not the ORM's flush of the loaded device
        session.execute(_CLOSE_ENROLLMENT, {"device_id": device.id})
        set_committed_value(device, "enrollment_open", False)


def _refused(
    session: Session,
    action: str,
    exc: ChargepkiError,
    credentials: Credentials,
    subject: str | None,
    authority: Authority,
    now: Clock,
    *,
    failed: tuple[list[auth_limits.Key], AuthLimits] | None = None,
    anonymous: bool = False,
) -> None:
    """Record a refusal in its own transaction (the refused work was rolled back).

    ``failed`` = (the caller's keys, limits): the refusal was a failed authentication, counted
    against those keys in the same transaction (which may start a lockout). ``anonymous``: the
    caller established no identity, so the refusal is counted into the per-address summary
    (``audit.count_noise``) instead of an entry of its own.
    """
    session.rollback()
    try:
        if anonymous:
            audit.count_noise(session, address=credentials.address, action=action, code=exc.code, now=now)
            session.commit()
            return
        if failed is not None:
            auth_limits.record_failure(
                session,
                failed[1],
                failed[0],
                actor=_actor(credentials),
                now=now(),
                address=credentials.address,
                shown_device=_printable(_claimed_device(credentials), 64),
            )
        audit.record(
            session,
            action,
            actor=_actor(credentials),
            subject=_printable(subject, 256),
            now=now,
            details={
                "reason": str(exc),
                "error": type(exc).__name__,
                "code": exc.code,
                "address": credentials.address,
                "ca": authority.name,
            },
        )
        session.commit()
    except SQLAlchemyError:
        session.rollback()


def _plausible_serial(username: str) -> bool:
    """Whether a Basic user name can be a device serial at all (others never reach a query)."""
    try:
        check_charger_identity(username)
    except PolicyError:
        return False
    return True


def _printable(value: str | None, limit: int) -> str | None:
    """A caller-supplied string made safe for an audit column: no control characters, bounded length."""
    if value is None:
        return None
    cleaned = "".join(ch if ch.isprintable() else "\ufffd" for ch in value)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def _actor(credentials: Credentials) -> str:
    if credentials.principal is not None:
        return credentials.principal
    if credentials.client_certificate is not None:
        try:
            cert = x509.load_der_x509_certificate(credentials.client_certificate)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            return f"tls:{_printable(str(names[0].value), 64) if names else cert.serial_number}"
        except ValueError:
            return "tls:unparseable"
    if credentials.username:
        return f"basic:{_printable(credentials.username, 64)}"
    return f"anonymous@{credentials.address or '?'}"


def enroll(
    session: Session,
    issuers: IssuerFactory,
    authority: Authority,
    csr_data: bytes,
    credentials: Credentials,
    *,
    status: StatusSigner,
    settings: EnrollmentSettings = EnrollmentSettings(),
    now: Clock = utcnow,
) -> Certificate:
    """First enrollment (EST simpleenroll): a one-time secret, or an RA enrolling on a device's behalf."""
    return _audited(
        "enrollment.refused", _enroll, session, issuers, status, authority, csr_data, credentials, settings, now
    )


def _audited(
    action: str,
    flow: Callable[..., Certificate],
    session: Session,
    issuers: IssuerFactory,
    status: StatusSigner,
    authority: Authority,
    csr_data: bytes,
    credentials: Credentials,
    settings: EnrollmentSettings,
    now: Clock,
) -> Certificate:
    """Run an enrollment flow; a refusal is rolled back, audited under ``action`` and re-raised.

    A caller locked out for failed authentications is refused first (429), before any other
    work; a failed authentication is counted with the refusal's audit entry. Both use only the
    keys of the methods the caller presents (``auth_limits.request_keys``), so guesses made with
    one method never lock out another. A caller that established no identity is only counted
    into its address's per-minute summary (``audit.count_noise``), never an entry of its own.
    """
    keys = _limit_keys(credentials)
    at = now()
    standing = auth_limits.standing(session, settings.limits, keys, at)
    if standing.retry_after is not None:
        session.rollback()
        raise RateLimitedError(
            f"too many failed authentications from this device or address: retry in {standing.retry_after} s",
            standing.retry_after,
        )
    subject = credentials.username
    parsed = False
    try:
        csr = read_csr(csr_data)
        subject, parsed = csr.common_name, True
        certificate = flow(session, issuers, status, authority, csr, credentials, settings, now)
    except ChargepkiError as exc:
        presented = _presented(credentials)
        failed = isinstance(exc, AuthenticationError) and presented
        # No identity established: nothing presented, or refused before the credentials were checked.
        anonymous = credentials.principal is None and (
            not parsed or (isinstance(exc, AuthenticationError) and not presented)
        )
        _refused(
            session,
            action,
            exc,
            credentials,
            subject,
            authority,
            now,
            failed=(keys, settings.limits) if failed else None,
            anonymous=anonymous,
        )
        raise
    if standing.has_own_failures:
        try:
            auth_limits.forget(session, keys)
            session.commit()
        except SQLAlchemyError:
            session.rollback()  # the certificate is committed; a stale count only costs the device a retry
    return certificate


def _claimed_device(credentials: Credentials) -> str | None:
    """Who the caller says it is: the Basic user name, else the client certificate's CN."""
    if credentials.username:
        return credentials.username
    if credentials.client_certificate is not None:
        try:
            names = x509.load_der_x509_certificate(credentials.client_certificate).subject.get_attributes_for_oid(
                NameOID.COMMON_NAME
            )
            return str(names[0].value) if names else None
        except ValueError:
            return None
    return None


def _limit_keys(credentials: Credentials) -> list[auth_limits.Key]:
    basic = bool(credentials.username) or credentials.password is not None
    return auth_limits.request_keys(credentials.username, basic, credentials.client_certificate, credentials.address)


def _presented(credentials: Credentials) -> bool:
    return bool(credentials.username) or credentials.password is not None or credentials.client_certificate is not None


def _enroll(
    session: Session,
    issuers: IssuerFactory,
    status: StatusSigner,
    authority: Authority,
    csr: CsrRequest,
    credentials: Credentials,
    settings: EnrollmentSettings,
    now: Clock,
) -> Certificate:
    ra = _registration_authority(session, authority, credentials, now)
    if ra is None:
        if not credentials.username or credentials.password is None:
            raise AuthenticationError(
                "credentials required: HTTP Basic (device serial and one-time secret) or an RA client certificate"
            )
        if not _plausible_serial(credentials.username) or not secret_is_valid(
            session, credentials.username, credentials.password, now=now
        ):
            raise AuthenticationError("unknown device or wrong, used or expired secret")
        if csr.common_name != credentials.username:
            raise PolicyError(
                f"the CSR's CN {csr.common_name!r} is not the authenticated device {credentials.username!r}",
                code="cn_mismatch",
            )
    check_charger_identity(csr.common_name)  # before it reaches a query (a NUL fails on PostgreSQL)
    device = _registered_device(session, csr.common_name)
    _check_device(device, authority)
    _check_binding(csr.csr, credentials, settings)
    if not device.enrollment_open and current_certificate(session, device, now) is not None:
        raise ConflictError(
            f"device {device.serial} is already enrolled: renew with simplereenroll, or an "
            "admin re-opens it with `chargepki device reset`",
            code="already_enrolled",
        )

    issuer = issuers(authority)
    request = request_from_csr(get_profile("charger"), csr, issuer, device_id=device.id)
    actor = _actor(credentials)
    secret_spent = False
    if ra is None:
        assert credentials.username is not None and credentials.password is not None
        if not consume_secret(session, credentials.username, credentials.password, now=now, commit=False):
            raise AuthenticationError("unknown device or wrong, used or expired secret")
        secret_spent = True
    try:
        return issue(
            session,
            issuer,
            request,
            actor=actor,
            status=status,
            now=now,
            before_commit=lambda row: _supersede(session, device, row, settings, actor, status, now),
        )
    except ChargepkiError:
        if secret_spent:
            session.rollback()
            restore_secret(session, credentials.username or "", credentials.password or "")
        raise


def _registered_device(session: Session, serial: str) -> Device:
    device = session.scalar(select(Device).where(Device.serial == serial))
    if device is None:
        raise PolicyError(f"device {serial!r} is not registered", code="device_not_registered")
    return device


def _registration_authority(
    session: Session, authority: Authority, credentials: Credentials, now: Clock
) -> Certificate | None:
    """The caller's RA certificate, if any; refused unless it is a current RA of this environment."""
    if credentials.client_certificate is None:
        return None
    stored = _stored_certificate(session, credentials.client_certificate)
    if stored is None or stored.profile != "ra":
        if credentials.username:
            return None  # a device certificate plus Basic credentials: the secret decides
        raise AuthenticationError("this client certificate is not a registration authority certificate")
    _check_current(stored, authority, now, "RA certificate")
    return stored


def _check_current(certificate: Certificate, authority: Authority, now: Clock, what: str) -> None:
    if certificate.status != "valid" or (certificate.revoke_after is not None and certificate.revoke_after <= now()):
        raise AuthenticationError(f"the {what} is revoked")
    if certificate.not_after <= now():
        raise AuthenticationError(f"the {what} has expired")
    if certificate.authority.environment != authority.environment:
        raise AuthenticationError(
            f"the {what} belongs to environment {certificate.authority.environment}, not {authority.environment}"
        )


def reenroll(
    session: Session,
    issuers: IssuerFactory,
    authority: Authority,
    csr_data: bytes,
    credentials: Credentials,
    *,
    status: StatusSigner,
    settings: EnrollmentSettings = EnrollmentSettings(),
    now: Clock = utcnow,
) -> Certificate:
    """Renewal or re-key (EST simplereenroll), authenticated by the device's current certificate."""
    return _audited(
        "reenrollment.refused", _reenroll, session, issuers, status, authority, csr_data, credentials, settings, now
    )


def _reenroll(
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
        raise AuthenticationError("re-enrollment requires the device's current certificate as TLS client certificate")
    current = _stored_certificate(session, credentials.client_certificate)
    if current is None or current.profile != "charger" or current.device_id is None:
        raise AuthenticationError("the client certificate is not a charger certificate issued here")
    _check_current(current, authority, now, "client certificate")
    device = session.get(Device, current.device_id)
    assert device is not None
    _check_device(device, authority)
    if csr.common_name != current.common_name:
        raise PolicyError(
            f"the CSR's CN {csr.common_name!r} does not match the certificate being renewed", code="cn_mismatch"
        )
    _check_binding(csr.csr, credentials, settings)
    issuer = issuers(authority)
    request = request_from_csr(get_profile("charger"), csr, issuer, device_id=device.id)
    actor = _actor(credentials)
    return issue(
        session,
        issuer,
        request,
        actor=actor,
        status=status,
        now=now,
        before_commit=lambda row: _supersede(session, device, row, settings, actor, status, now),
    )


def sign_relayed(
    session: Session,
    issuers: IssuerFactory,
    authority: Authority,
    csr_data: bytes,
    charging_station_id: str,
    credentials: Credentials,
    *,
    status: StatusSigner,
    settings: EnrollmentSettings = EnrollmentSettings(),
    now: Clock = utcnow,
    max_chain_chars: int = CERTIFICATE_CHAIN_CHARS,
    before_commit: Callable[[Certificate], None] | None = None,
) -> Certificate:
    """A charger's CSR relayed by a CSMS (OCPP ``SignCertificate``), for the station it names.

    The CSMS stands where an RA stands in EST: it authenticated the station (security profile 2 or
    3), so it may ask for a first certificate or a renewal. The checks are the enrollment ones:
    registered and enabled device of this environment, CN = the station identity, O = the CA's,
    the profile's key policy, one key one identity; the new certificate supersedes the old one.
    The certificate must also fit, with its sub-CAs, in OCPP's chain limit: checked on the signed
    bytes before the commit (``chain_too_long``; the certificate is then abandoned, never handed out).
    ``before_commit`` runs last in the issuing transaction (an asynchronous job marks itself done there).
    """
    flow = partial(
        _sign_relayed,
        charging_station_id=charging_station_id,
        max_chain_chars=max_chain_chars,
        before_commit=before_commit,
    )
    return _audited(
        "csms.sign.refused", flow, session, issuers, status, authority, csr_data, credentials, settings, now
    )


def ocpp_chain_check(session: Session, authority: Authority, max_chars: int) -> Callable[[Certificate], None]:
    """A check of the signed leaf against OCPP's chain limit (leaf + ``authority``'s sub-CAs, root
    left out), for ``before_commit``: a chain too long refuses, and the certificate is abandoned."""
    sub_cas = len(intermediates_pem(session, authority))

    def check(row: Certificate) -> None:
        length = len(pem_certificate(row.der or b"")) + sub_cas
        if length > max_chars:
            raise PolicyError(
                f"the certificate chain would be {length} characters, more than OCPP's {max_chars}",
                code="chain_too_long",
            )

    return check


def _sign_relayed(
    session: Session,
    issuers: IssuerFactory,
    status: StatusSigner,
    authority: Authority,
    csr: CsrRequest,
    credentials: Credentials,
    settings: EnrollmentSettings,
    now: Clock,
    *,
    charging_station_id: str,
    max_chain_chars: int,
    before_commit: Callable[[Certificate], None] | None,
) -> Certificate:
    if csr.common_name != charging_station_id:
        raise PolicyError(
            f"the CSR's CN {csr.common_name!r} is not the charging station {charging_station_id!r}",
            code="cn_mismatch",
        )
    device = _registered_device(session, charging_station_id)
    _check_device(device, authority)
    issuer = issuers(authority)
    request = request_from_csr(get_profile("charger"), csr, issuer, device_id=device.id)
    actor = _actor(credentials)
    fits_ocpp_chain = ocpp_chain_check(session, authority, max_chain_chars)

    def last_checks(row: Certificate) -> None:
        fits_ocpp_chain(row)
        _supersede(session, device, row, settings, actor, status, now)
        if before_commit is not None:
            before_commit(row)

    return issue(session, issuer, request, actor=actor, status=status, now=now, before_commit=last_checks)
