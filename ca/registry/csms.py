"""CSMS clients of the CSMS API: registration, API tokens, authentication, and signing on their behalf.

A CSMS is bound to one environment: it signs with that environment's issuing CA, and looks up and
checks only that environment's certificates. It authenticates with a ``csms-client`` certificate
whose CN is its name (``chargepki csms add``) or with an API token (``chargepki csms token``),
of which only the SHA-256 is stored: a token is 256 random bits, so a slow hash buys nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.issuers import chain, default_issuing_ca
from ca.authorities.v2g import iso_option, v2g_environments
from ca.clock import Clock, utcnow
from ca.enrollment import auth_limits
from ca.enrollment.auth_limits import AuthLimits
from ca.enrollment.pipeline import sign_relayed
from ca.enrollment.policy import Credentials, EnrollmentSettings
from ca.enrollment.secc import issue_secc
from ca.errors import AuthenticationError, ConflictError, InputError, NotFoundError, RateLimitedError
from ca.issuance.names import check_environment
from ca.issuance.profiles import ISO15118_2, ISO15118_20, V2G_VERSIONS, v2g_version
from ca.kinds import CaRole, CaStatus, CertStatus
from ca.ocpp_limits import CERTIFICATE_CHAIN_CHARS
from ca.status.certificates import standing
from ca.status.revocation import apply_revocation
from ca.store.models import Authority, Certificate, CsmsClient, CsmsToken
from ca.store.prepared import Prepared, as_object
from ca.work import Work

_DEFAULT_SETTINGS = EnrollmentSettings()
TOKEN_PREFIX = "cpk_"  # lets secret scanners and operators recognise a chargepki API token
# OCPP 2.1 CertificateSigningUseEnumType (2.0.1 knows the first two): what each signs, and under which root role.
CERTIFICATE_TYPES = ("ChargingStationCertificate", "V2GCertificate", "V2G20Certificate")
SECC_VERSIONS = {"V2GCertificate": ISO15118_2, "V2G20Certificate": ISO15118_20}  # the ISO 15118 version of each
ROOT_ROLES = {
    "ChargingStationCertificate": CaRole.ROOT,
    "V2GCertificate": V2G_VERSIONS[ISO15118_2].root,
    "V2G20Certificate": V2G_VERSIONS[ISO15118_20].root,
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")


@dataclass(frozen=True)
class Caller:
    """An authenticated CSMS, as the API sees it for the length of one call."""

    client_id: int
    name: str
    environment: str
    method: str  # certificate | token
    address: str | None = None

    @property
    def actor(self) -> str:
        return f"csms:{self.name}"


def check_name(name: str) -> str:
    name = name.strip()
    if not _NAME.match(name):
        raise InputError(f"CSMS name {name!r} must be 1-64 characters: letters, digits, space, '.', '_', '-'")
    return name


def add_client(work: Work, *, name: str, environment: str) -> CsmsClient:
    name = check_name(name)
    environment = check_environment(environment)
    with work.transaction() as session:
        if session.scalar(select(CsmsClient.id).where(CsmsClient.name == name)) is not None:
            raise ConflictError(f"CSMS {name} is already registered")
        client = CsmsClient(name=name, environment=environment, enabled=True, created_at=work.now())
        session.add(client)
        details = {"environment": environment}
        audit.record(session, "csms.added", actor=work.actor, subject=name, now=work.now, details=details)
    return client


def get_client(session: Session, name: str) -> CsmsClient:
    client = session.scalar(select(CsmsClient).where(CsmsClient.name == name.strip()))
    if client is None:
        raise NotFoundError(f"no CSMS named {name.strip()!r}")
    return client


@dataclass(frozen=True)
class ClientSummary:
    client: CsmsClient
    tokens: int  # usable tokens
    certificates: int  # current csms-client certificates


def list_clients(session: Session, now: datetime) -> list[ClientSummary]:
    result = []
    for client in session.scalars(select(CsmsClient).order_by(CsmsClient.name)):
        tokens = session.scalar(
            select(func.count()).where(CsmsToken.client_id == client.id, CsmsToken.revoked_at.is_(None))
        )
        current = [c for c in client_certificates(session, client) if standing(c, now).status == "good"]
        result.append(ClientSummary(client, tokens or 0, len(current)))
    return result


def client_certificates(session: Session, client: CsmsClient) -> list[Certificate]:
    return list(
        session.scalars(
            select(Certificate)
            .where(Certificate.profile == "csms-client", Certificate.common_name == client.name)
            .where(Certificate.status.in_(("valid", "revoked")))
            .order_by(Certificate.created_at)
        )
    )


def set_enabled(work: Work, *, name: str, enabled: bool, revoke: bool = False) -> tuple[CsmsClient, list[Certificate]]:
    """Enable or disable a CSMS (a disabled one is refused at once); optionally revoke its certificates."""
    with work.transaction() as session:
        client = get_client(session, name)
        client.enabled = enabled
        revoked = []
        if revoke:
            for certificate in client_certificates(session, client):
                if certificate.status == CertStatus.VALID:
                    apply_revocation(
                        session,
                        certificate,
                        "cessationOfOperation",
                        actor=work.actor,
                        status=work.signer(),
                        now=work.now,
                    )
                    revoked.append(certificate)
            session.execute(update(CsmsToken).where(CsmsToken.client_id == client.id).values(revoked_at=work.now()))
        audit.record(
            session,
            "csms.enabled" if enabled else "csms.disabled",
            actor=work.actor,
            subject=client.name,
            now=work.now,
            details={"revoked": [c.serial for c in revoked]} if revoke else None,
        )
    return client, revoked


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token(work: Work, *, client: CsmsClient, replace: bool = False) -> str:
    """A new API token, returned once. ``replace`` revokes the client's other tokens in the same commit;
    without it the old ones keep working, so a CSMS can be switched over without a gap."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    at = work.now()
    with work.transaction() as session:
        revoked = 0
        if replace:
            revoked = session.execute(
                update(CsmsToken)
                .where(CsmsToken.client_id == client.id, CsmsToken.revoked_at.is_(None))
                .values(revoked_at=at)
            ).rowcount
        session.add(CsmsToken(client_id=client.id, token_hash=_token_hash(token), created_at=at))
        audit.record(
            session,
            "csms.token.issued",
            actor=work.actor,
            subject=client.name,
            now=work.now,
            details={"revoked_others": revoked},
        )
    return token


def authenticate(
    session: Session,
    *,
    token: str | None,
    certificate_der: bytes | None,
    address: str | None = None,
    now: Clock = utcnow,
) -> Caller:
    """The CSMS behind a token or a TLS client certificate; one message for every refusal (nothing leaks).

    A token, when present, decides alone: a CSMS behind a proxy that adds its own client
    certificate is still told apart by its token.
    """
    refused = AuthenticationError("unknown, revoked or disabled CSMS credentials")
    if token:
        client = _CLIENT_BY_TOKEN.run(session, {"token_hash": _token_hash(token)}).first()
        if client is None or not client.enabled:
            raise refused
        return Caller(client.id, client.name, client.environment, "token", address)
    if certificate_der:
        fingerprint = hashlib.sha256(certificate_der).hexdigest()
        found = _CLIENT_BY_CERTIFICATE.run(session, {"fingerprint": fingerprint}).first()
        if found is None:
            raise refused
        certificate = as_object(session, Certificate, found[:_CERTIFICATE_COLUMNS])
        ca_environment, client_id, name, environment, enabled = found[_CERTIFICATE_COLUMNS:]
        if certificate.profile != "csms-client" or standing(certificate, now()).status != "good":
            raise refused
        if client_id is None or not enabled or ca_environment != environment:
            raise refused
        return Caller(client_id, name, environment, "certificate", address)
    raise AuthenticationError(
        "credentials required: a CSMS client certificate or an API token (Authorization: Bearer …)"
    )


_CLIENTS = CsmsClient.__table__
_TOKENS = CsmsToken.__table__
_CERTIFICATES = Certificate.__table__
_AUTHORITIES = Authority.__table__
# Prepared once: every CSMS API call authenticates first (the ORM's query cost a twelfth of a relayed signature).
_CLIENT_BY_TOKEN = Prepared(
    select(_CLIENTS.c.id, _CLIENTS.c.name, _CLIENTS.c.environment, _CLIENTS.c.enabled)
    .join(_TOKENS, _TOKENS.c.client_id == _CLIENTS.c.id)
    .where(_TOKENS.c.token_hash == bindparam("token_hash"), _TOKENS.c.revoked_at.is_(None))
)
# The presented certificate, its CA's environment and the CSMS its CN names, in one round trip.
_CLIENT_BY_CERTIFICATE = Prepared(
    select(
        _CERTIFICATES,
        _AUTHORITIES.c.environment,
        _CLIENTS.c.id,
        _CLIENTS.c.name,
        _CLIENTS.c.environment,
        _CLIENTS.c.enabled,
    )
    .join(_AUTHORITIES, _AUTHORITIES.c.id == _CERTIFICATES.c.authority_id)
    .outerjoin(_CLIENTS, _CLIENTS.c.name == _CERTIFICATES.c.common_name)
    .where(_CERTIFICATES.c.fingerprint_sha256 == bindparam("fingerprint"))
)
_CERTIFICATE_COLUMNS = len(_CERTIFICATES.c)


def authenticate_limited(
    session: Session,
    *,
    token: str | None,
    certificate_der: bytes | None,
    address: str | None,
    limits: AuthLimits = _DEFAULT_SETTINGS.limits,
    now: Clock = utcnow,
) -> Caller:
    """``authenticate``, with failed authentications counted and locked out as on the EST routes.

    A caller locked out is refused (``RateLimitedError``, 429) before its credentials are looked
    at, the right ones included; presented credentials that fail are counted in their own
    transaction (``auth_limits.record_failure``, which audits the start of a lockout) against the
    keys of ``auth_limits.api_request_keys``: a wrong token against the address it came from, a
    refused certificate against its SHA-256. Never against the CSMS a guess names, so nobody's
    guesses lock out a valid CSMS elsewhere. The refusal itself is the caller's to count as noise.
    """
    keys = auth_limits.api_request_keys(bool(token), certificate_der, address)
    at = now()
    standing = auth_limits.standing(session, limits, keys, at)
    if standing.retry_after is not None:
        session.rollback()
        raise RateLimitedError(
            f"too many failed authentications from this address or certificate: retry in {standing.retry_after} s",
            standing.retry_after,
        )
    try:
        caller = authenticate(session, token=token, certificate_der=certificate_der, address=address, now=now)
    except AuthenticationError:
        session.rollback()
        if keys:
            try:
                auth_limits.record_failure(
                    session, limits, keys, actor=f"anonymous@{address or '?'}", now=at, address=address
                )
                session.commit()
            except SQLAlchemyError:
                session.rollback()  # the refusal stands; a count lost to the database costs the caller nothing
        raise
    if standing.has_own_failures:
        auth_limits.forget(session, keys)
        session.commit()
    return caller


def caller_for(session: Session, client_id: int) -> Caller:
    """A stored request's CSMS as it is now (an asynchronous job runs after the call that made it)."""
    client = session.get(CsmsClient, client_id)
    if client is None or not client.enabled:
        raise AuthenticationError("the CSMS that made this request is disabled", code="client_disabled")
    return Caller(client.id, client.name, client.environment, "stored")


def check_certificate_type(session: Session, caller: Caller, certificate_type: str) -> None:
    """Refuse at once what no later attempt could sign: an unknown type, or V2G without a V2G hierarchy.

    Without one, the answer is a state the operator can fix, not a server failure, hence a
    conflict (409) rather than a 5xx that would make CSMSs retry.
    """
    if certificate_type not in CERTIFICATE_TYPES:
        raise InputError(f"certificateType must be one of {', '.join(CERTIFICATE_TYPES)}", code="bad_certificate_type")
    iso = SECC_VERSIONS.get(certificate_type)
    if iso is not None and caller.environment not in v2g_environments(session, iso):
        version = v2g_version(iso)
        raise ConflictError(
            f"no {version.title} V2G hierarchy in environment {caller.environment!r}: "
            f"run `chargepki v2g init{iso_option(version)}` first",
            code="v2g_not_configured",
        )


def check_root(session: Session, caller: Caller, certificate_type: str, root: Authority) -> None:
    """The root an OCPP 2.1 ``hashRootCertificate`` named must be a root of the caller's environment
    (``unknown_root``), of the hierarchy ``certificate_type`` is signed in (``root_type_mismatch``:
    the OCPP root for a charger, the ISO 15118-2 or -20 V2G root for an SECC leaf) and still in
    service: for a charger, the root of the issuing CA new certificates come from (``root_not_current``).
    """
    if root.environment != caller.environment or root.parent_id is not None:
        raise NotFoundError(
            "hashRootCertificate names no root certificate of this CSMS's environment", code="unknown_root"
        )
    wanted = ROOT_ROLES[certificate_type]
    if root.role != wanted:
        raise InputError(
            f"hashRootCertificate names {root.name}, a {root.role} root; a {certificate_type} is signed under "
            f"a {wanted} root",
            code="root_type_mismatch",
        )
    if root.status not in (CaStatus.ACTIVE, CaStatus.EXTERNAL):
        message = f"the root {root.name} is {root.status}: nothing is signed under it"
        raise ConflictError(message, code="root_not_current")
    if certificate_type == "ChargingStationCertificate":
        issuing = default_issuing_ca(session, caller.environment)
        current = chain(session, issuing)[-1]
        if current.id != root.id:
            raise ConflictError(
                f"new charger certificates come from {issuing.name} under {current.name}, not under {root.name} "
                "(install the current root on the station first)",
                code="root_not_current",
            )


def sign(
    work: Work,
    *,
    caller: Caller,
    charging_station_id: str,
    certificate_type: str,
    csr: bytes,
    settings: EnrollmentSettings = _DEFAULT_SETTINGS,
    max_chain_chars: int = CERTIFICATE_CHAIN_CHARS,
    before_commit: Callable[[Session, Certificate], None] | None = None,
    root: Authority | None = None,
) -> Certificate:
    """Sign a charger's CSR relayed by ``caller`` with its environment's issuing CA (all EST checks apply),
    or, for ``V2GCertificate`` (ISO 15118-2) and ``V2G20Certificate`` (ISO 15118-20), an SECC
    certificate (CN = the SECC ID, checked against ISO 15118 syntax and against the station owning
    it) under that version's CPO Sub-CA 2. All are routes of the enrollment pipeline, acting as
    ``caller``; the chain must fit OCPP's limit. ``root``: the root an OCPP 2.1 ``hashRootCertificate``
    named (``check_root``); for an SECC leaf, the Sub-CA 2 under it signs."""
    check_certificate_type(work.session, caller, certificate_type)
    if root is not None:
        check_root(work.session, caller, certificate_type, root)
    work = work.as_actor(caller.actor)
    iso = SECC_VERSIONS.get(certificate_type)
    if iso is not None:
        return issue_secc(
            work,
            environment=caller.environment,
            csr=csr,
            device_serial=charging_station_id,
            settings=settings,
            max_chain_chars=max_chain_chars,
            before_commit=before_commit,
            address=caller.address,
            iso=iso,
            root=root,
        )
    return sign_relayed(
        work,
        authority=default_issuing_ca(work.session, caller.environment),
        csr=csr,
        charging_station_id=charging_station_id,
        credentials=Credentials(principal=caller.actor, address=caller.address),
        settings=settings,
        max_chain_chars=max_chain_chars,
        before_commit=before_commit,
    )


def record_call(
    work: Work,
    caller: Caller | None,
    operation: str,
    *,
    address: str | None,
    subject: str | None,
    outcome: dict[str, object],
    interface: str = "api",
) -> None:
    """One audit entry per authenticated call of a CSMS interface (``csms.<interface>.<operation>``:
    the CSMS API, the OPCP API); an unauthenticated one is counted into its address's summary
    (``audit.count_noise``), so bad tokens cannot grow the chain at line rate.

    An entry is written through ``work.write``: in a service it joins the group commit, sharing one
    transaction (one commit, one audit-head update) with concurrent requests' writes, and this
    returns only once it is committed. A noise count keeps a transaction of its own, as the
    enrollment pipeline's do: it locks its address's counter row before the audit head (to
    summarise a finished minute), and in a shared transaction that row would come after another
    unit's head lock: two workers' batches could then wait for each other on PostgreSQL."""
    action = f"csms.{interface}.{operation}"
    now = work.now
    if caller is None:
        code = str(outcome.get("reason") or "unauthenticated")
        with work.transaction() as session:
            audit.count_noise(session, address=address, action=action, code=code, now=now)
        return
    work.write(
        call_entry(caller, operation, address=address, subject=subject, outcome=outcome, interface=interface, now=now)
    )


def call_entry(
    caller: Caller,
    operation: str,
    *,
    address: str | None,
    subject: str | None,
    outcome: dict[str, object],
    interface: str = "api",
    now: Clock = utcnow,
) -> Callable[[Session], None]:
    """The audit entry of an authenticated call (``record_call``'s), as a unit of work to run in a
    transaction: a call whose outcome is settled before its own write commits (a relayed signature,
    200 and its serial) writes it there (``before_commit``), atomically with what it did."""
    action = f"csms.{interface}.{operation}"
    details = {"address": address, **outcome, "auth": caller.method}
    return lambda session: audit.record(session, action, actor=caller.actor, subject=subject, now=now, details=details)
