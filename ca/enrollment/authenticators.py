"""The pipeline's first step: who is asking, proved by what (``Authenticator``s).

Each returns ``Authenticated`` or raises ``AuthenticationError`` (counted towards the caller's
lockout by the pipeline). Room for more: a manufacturer's device certificate would be one
more function here, returning the device its serial names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from ca.authorities.issuers import public_key_sha256
from ca.enrollment.policy import Attempt, Authenticated
from ca.errors import AuthenticationError, PolicyError
from ca.issuance.csr import CsrRequest
from ca.issuance.names import check_charger_identity
from ca.issuance.profiles import SECC_PROFILES
from ca.kinds import CertStatus
from ca.registry.secrets import REPEAT_WINDOW, device_of_valid_secret, repeated_enrollment
from ca.store.models import Authority, Certificate, Device
from ca.store.prepared import Prepared, as_object, as_objects
from ca.work import Work


class Presented(NamedTuple):
    """A presented client certificate as this installation recorded it."""

    certificate: Certificate
    environment: str  # its CA's: every caller checks it (``check_current``)
    device: Device | None


_CERTIFICATES = Certificate.__table__
_DEVICES = Device.__table__
_AUTHORITIES = Authority.__table__
# Every client certificate presented to enrollment is read by this one prepared statement: the
# certificate, its CA's environment and its device in one round trip (the ORM's query for the same
# cost a twelfth of a re-enrollment).
_PRESENTED = Prepared(
    select(_CERTIFICATES, _AUTHORITIES.c.environment, _DEVICES)
    .join(_AUTHORITIES, _AUTHORITIES.c.id == _CERTIFICATES.c.authority_id)
    .outerjoin(_DEVICES, _DEVICES.c.id == _CERTIFICATES.c.device_id)
    .where(_CERTIFICATES.c.fingerprint_sha256 == bindparam("fingerprint"))
)
_ENVIRONMENT_AT = len(_CERTIFICATES.c)  # the row: the certificate's columns, the environment, the device's


def presented_certificate(session: Session, der: bytes) -> Presented | None:
    """This installation's record of a presented certificate (by SHA-256 fingerprint), with its CA's
    environment and its device; None: not a certificate issued here."""
    row = _PRESENTED.run(session, {"fingerprint": hashlib.sha256(der).hexdigest()}).first()
    if row is None:
        return None
    certificate = as_object(session, Certificate, row[:_ENVIRONMENT_AT])
    device_values = row[_ENVIRONMENT_AT + 1 :]
    device = as_object(session, Device, device_values) if device_values[0] is not None else None
    return Presented(certificate, row[_ENVIRONMENT_AT], device)


# Every enrollment for a charger reads its device: a prepared statement, its row made the ORM object.
_DEVICE_BY_SERIAL = Prepared(select(Device.__table__).where(Device.__table__.c.serial == bindparam("serial")))


def registered_device(session: Session, serial: str) -> Device:
    found = as_objects(session, Device, _DEVICE_BY_SERIAL.run(session, {"serial": serial}))
    device = found[0] if found else None
    if device is None:
        raise PolicyError(f"device {serial!r} is not registered", code="device_not_registered")
    return device


def check_current(work: Work, certificate: Certificate, environment: str, authority: Authority, what: str) -> None:
    """A presented certificate authenticates only while current and of ``authority``'s environment
    (``environment``: its CA's, read with it)."""
    now = work.now()
    if certificate.status != CertStatus.VALID or (
        certificate.revoke_after is not None and certificate.revoke_after <= now
    ):
        raise AuthenticationError(f"the {what} is revoked")
    if certificate.not_after <= now:
        raise AuthenticationError(f"the {what} has expired")
    if environment != authority.environment:
        raise AuthenticationError(f"the {what} belongs to environment {environment}, not {authority.environment}")


def _plausible_serial(username: str) -> bool:
    """Whether a Basic user name can be a device serial at all (others never reach a query)."""
    try:
        check_charger_identity(username)
    except PolicyError:
        return False
    return True


def by_secret_or_ra(work: Work, attempt: Attempt, csr: CsrRequest) -> Authenticated:
    """EST simpleenroll: an RA's client certificate (any registered device), or HTTP Basic with
    the device serial and its one-time secret (that device only; the secret is spent with the
    serial reservation, and given back when signing fails)."""
    credentials = attempt.credentials
    if credentials.client_certificate is not None:
        presented = presented_certificate(work.session, credentials.client_certificate)
        if presented is not None and presented.certificate.profile == "ra":
            check_current(work, presented.certificate, presented.environment, attempt.authority, "RA certificate")
            return Authenticated("ra")
        if not credentials.username:
            raise AuthenticationError("this client certificate is not a registration authority certificate")
        # a device certificate plus Basic credentials: the secret decides
    if not credentials.username or credentials.password is None:
        raise AuthenticationError(
            "credentials required: HTTP Basic (device serial and one-time secret) or an RA client certificate"
        )
    if not _plausible_serial(credentials.username):
        raise AuthenticationError("unknown device or wrong, used or expired secret")
    mismatch = f"is not the authenticated device {credentials.username!r}"
    device = device_of_valid_secret(work.session, credentials.username, credentials.password, now=work.now)
    if device is None:
        key = public_key_sha256(csr.public_key)
        repeated = repeated_enrollment(
            work.session, credentials.username, credentials.password, key, attempt.authority.id, now=work.now
        )
        if repeated is None:
            raise AuthenticationError("unknown device or wrong, used or expired secret")
        return Authenticated("secret", expected_cn=credentials.username, mismatch=mismatch, repeated=repeated)
    secret = (credentials.username, credentials.password)
    return Authenticated("secret", device, expected_cn=credentials.username, mismatch=mismatch, secret=secret)


def by_current_certificate(work: Work, attempt: Attempt, csr: CsrRequest) -> Authenticated:
    """EST simplereenroll: the device's current charger certificate as TLS client certificate."""
    der = attempt.credentials.client_certificate
    if der is None:
        raise AuthenticationError("re-enrollment requires the device's current certificate as TLS client certificate")
    presented = presented_certificate(work.session, der)
    if presented is None or presented.certificate.profile != "charger" or presented.device is None:
        raise AuthenticationError("the client certificate is not a charger certificate issued here")
    current, device = presented.certificate, presented.device
    mismatch = "does not match the certificate being renewed"
    try:
        check_current(work, current, presented.environment, attempt.authority, "client certificate")
    except AuthenticationError:
        repeated = _repeated_renewal(work, current, csr, attempt.authority)
        if repeated is None:
            raise
        return Authenticated("certificate", None, current.common_name, mismatch, repeated=repeated)
    return Authenticated("certificate", device, current.common_name, mismatch)


def _repeated_renewal(work: Work, presented: Certificate, csr: CsrRequest, authority: Authority) -> int | None:
    """The certificate that renewed ``presented`` for the CSR's very key in the last ``REPEAT_WINDOW``,
    when ``presented`` stopped being current because of it (superseded), or None.

    A re-enrollment supersedes the old certificate in the transaction that issues the new one; a
    retry of it (its server died before answering) presents the old certificate again. Refusing it
    would strand the charger with a revoked certificate and a new one it never received. The caller
    proved the old key (TLS) and the new one (the CSR): it gets the certificate issued for it."""
    since = work.now() - REPEAT_WINDOW
    superseded = presented.revocation_reason == "superseded" or presented.revoke_after is not None
    if not superseded:
        return None
    return work.session.execute(
        _RENEWED,
        {
            "device_id": presented.device_id,
            "key": public_key_sha256(csr.public_key),
            "authority_id": authority.id,
            "since": since,
            "presented": presented.id,
        },
    ).scalar()


_RENEWED = (
    select(_CERTIFICATES.c.id)
    .where(
        _CERTIFICATES.c.device_id == bindparam("device_id"),
        _CERTIFICATES.c.public_key_sha256 == bindparam("key"),
        _CERTIFICATES.c.authority_id == bindparam("authority_id"),
        _CERTIFICATES.c.profile == "charger",
        _CERTIFICATES.c.status == CertStatus.VALID,
        _CERTIFICATES.c.id > bindparam("presented"),
        _CERTIFICATES.c.created_at > bindparam("since", type_=_CERTIFICATES.c.created_at.type),
    )
    .order_by(_CERTIFICATES.c.id.desc())
    .limit(1)
)


@dataclass(frozen=True)
class Relay:
    """The interface authenticated the caller (a CSMS relaying OCPP ``SignCertificate``, an
    operator at the CLI); the station it names, if any, must be registered. ``names_subject``:
    the station identity is also the certificate's CN (a charger certificate)."""

    names_subject: bool

    def __call__(self, work: Work, attempt: Attempt, csr: CsrRequest) -> Authenticated:
        station = attempt.station
        if station is None:
            return Authenticated("relay")
        if self.names_subject and csr.common_name != station:  # the CN first, before any query
            raise PolicyError(
                f"the CSR's CN {csr.common_name!r} is not the charging station {station!r}", code="cn_mismatch"
            )
        return Authenticated("relay", registered_device(work.session, station))


SECC_CLIENTS = ("ra", "charger", *SECC_PROFILES)


def by_secc_client_certificate(work: Work, attempt: Attempt, csr: CsrRequest) -> Authenticated:
    """EST under a V2G label: an RA's certificate (any SECC ID), the station's current charger
    certificate (its SECC IDs), or an SECC certificate of either ISO 15118 version (the same SECC ID)."""
    der = attempt.credentials.client_certificate
    if der is None:
        raise AuthenticationError(
            "an SECC certificate needs a TLS client certificate: a registration authority's, the charging "
            "station's, or the SECC certificate being renewed"
        )
    presented = presented_certificate(work.session, der)
    if presented is None or presented.certificate.profile not in SECC_CLIENTS:
        raise AuthenticationError("the client certificate is not an RA, charger or SECC certificate issued here")
    caller, device = presented.certificate, presented.device
    check_current(work, caller, presented.environment, attempt.authority, f"{caller.profile} client certificate")
    if caller.profile in SECC_PROFILES:  # either version's leaf renews (or starts) the same SECC ID's
        return Authenticated(
            "secc-client", device, caller.common_name, "does not match the SECC certificate being renewed"
        )
    return Authenticated("secc-client", device)
