"""One enrollment pipeline for every route, independent of the protocol that carries it.

EST (``web/est.py``), the CSMS API (``web/api.py``, ``ca.registry.csms``) and the CLI call the
route functions here and in ``ca.enrollment.secc`` with a ``Work`` and what the transport
authenticated. Each route is a ``Policy`` (``ca.enrollment.policy``) run by ``run``:

1. lockout: a caller locked out for failed authentications is refused first (429);
2. the CSR is read; the policy's authenticator says who is asking (``ca.enrollment.authenticators``);
3. the policy's subject rule checks the CN and the device (``ca.enrollment.subjects``), then the
   TLS channel binding and the first-enrollment rule where the route has them;
4. ``issue()``: the one-time secret is spent with the serial reservation, the new certificate
   supersedes the old one and meets OCPP's chain limit in the issuing transaction;
5. a refusal is rolled back, audited under the policy's action with its code, counted when it
   was a failed authentication, and re-raised; a success clears the caller's own failure count.

Units of work: ``run`` owns the session's transactions from its first statement until it returns
(call it with a session holding no uncommitted work): the lockout read and the checks run in one
transaction that ``issue()`` continues and commits with the reservation; a refusal ends it here,
in one place, and records the refusal in a transaction of its own.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from cryptography import x509
from cryptography.x509.oid import AttributeOID, NameOID
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, object_session
from sqlalchemy.orm.attributes import set_committed_value

from ca import audit, observe
from ca.enrollment import auth_limits
from ca.enrollment.authenticators import Relay, by_current_certificate, by_secret_or_ra
from ca.enrollment.policy import DEFAULTS, Attempt, Authenticated, Credentials, EnrollmentSettings, Policy
from ca.enrollment.subjects import CHARGER
from ca.errors import AuthenticationError, ChargepkiError, ConflictError, PolicyError, RateLimitedError
from ca.issuance.csr import CsrRequest, read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.profiles import get_profile, v2g_version_of
from ca.keys.keyspec import KeySpec, key_spec
from ca.ocpp_limits import CERTIFICATE_CHAIN_CHARS
from ca.registry.devices import current_certificate
from ca.registry.secrets import consume_secret, restore_secret
from ca.status.certificates import intermediates_pem, pem_certificate
from ca.store.engine import begin_reads
from ca.store.models import Authority, Certificate
from ca.work import IssuerFactory, Work  # Work.issuers: called only once every check passed

__all__ = [
    "DEFAULTS",
    "ENROLL",
    "REENROLL",
    "RELAYED",
    "Credentials",
    "EnrollmentSettings",
    "IssuerFactory",
    "enroll",
    "ocpp_chain_check",
    "reenroll",
    "requested_key",
    "run",
    "sign_relayed",
]

# The charger routes. The SECC ones are in ``ca.enrollment.secc``.
ENROLL = Policy("enroll", "enrollment.refused", by_secret_or_ra, CHARGER, first_enrollment=True, channel_binding=True)
REENROLL = Policy("reenroll", "reenrollment.refused", by_current_certificate, CHARGER, channel_binding=True)
RELAYED = Policy("relayed", "csms.sign.refused", Relay(names_subject=True), CHARGER)


def enroll(
    work: Work,
    *,
    authority: Authority,
    csr: bytes,
    credentials: Credentials,
    settings: EnrollmentSettings = DEFAULTS,
) -> Certificate:
    """First enrollment (EST simpleenroll): a one-time secret, or an RA enrolling on a device's behalf."""
    return run(work, ENROLL, Attempt(authority, csr, credentials, settings))


def reenroll(
    work: Work,
    *,
    authority: Authority,
    csr: bytes,
    credentials: Credentials,
    settings: EnrollmentSettings = DEFAULTS,
) -> Certificate:
    """Renewal or re-key (EST simplereenroll), authenticated by the device's current certificate."""
    return run(work, REENROLL, Attempt(authority, csr, credentials, settings))


def sign_relayed(
    work: Work,
    *,
    authority: Authority,
    csr: bytes,
    charging_station_id: str,
    credentials: Credentials,
    settings: EnrollmentSettings = DEFAULTS,
    max_chain_chars: int = CERTIFICATE_CHAIN_CHARS,
    before_commit: Callable[[Session, Certificate], None] | None = None,
) -> Certificate:
    """A charger's CSR relayed by a CSMS (OCPP ``SignCertificate``), for the station it names.

    The CSMS stands where an RA stands in EST: it authenticated the station (security profile 2 or
    3), so it may ask for a first certificate or a renewal. The checks are the enrollment ones:
    registered and enabled device of this environment, CN = the station identity, O = the CA's,
    the profile's key policy, one key one identity; the new certificate supersedes the old one.
    The certificate must also fit, with its sub-CAs, in OCPP's chain limit: checked on the signed
    bytes before the commit (``chain_too_long``; the certificate is then abandoned, never handed out).
    ``before_commit`` runs last in the issuing transaction, with its session (an asynchronous job
    marks itself done there).
    """
    attempt = Attempt(
        authority,
        csr,
        credentials,
        settings,
        station=charging_station_id,
        max_chain_chars=max_chain_chars,
        before_commit=before_commit,
    )
    return run(work, RELAYED, attempt)


def requested_key(authority: Authority) -> KeySpec:
    """The EC key type to ask clients of ``authority`` for (EST ``csrattrs``): the CA's own curve
    when its leaves may use it, else the first EC type the leaf profile allows (a CPO Sub-CA 2's
    leaves: its ISO 15118 version's SECC profile)."""
    version = v2g_version_of(authority.role)
    profile = get_profile(version.secc if version is not None and authority.role == version.sub_ca_2 else "charger")
    if authority.key_type in profile.key_types and key_spec(authority.key_type).curve_name is not None:
        return key_spec(authority.key_type)
    return key_spec(next(name for name in profile.key_types if key_spec(name).curve_name is not None))


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


# -- the pipeline ---------------------------------------------------------------------------------------
def run(work: Work, policy: Policy, attempt: Attempt) -> Certificate:
    """Run one enrollment route: lockout → authenticate → subject policy → ``issue()``; see the module.

    Failed authentications are counted only against the keys of the methods the caller
    presents (``auth_limits.request_keys``), so guesses made with one method never lock out
    another. A caller that established no identity is only counted into its address's
    per-minute summary (``audit.count_noise``), never an entry of its own.

    Each run's outcome goes to the process's observers (``ca.observe``): the route, the CA's
    environment, the profile, and the refusal's code (``unavailable`` for a database failure).
    """
    # The loaded value, never a query (a refusal's rollback expires the object; the hot path is counted).
    environment = str(getattr(attempt.authority, "__dict__", {}).get("environment") or "unknown")
    try:
        certificate = _run(work, policy, attempt)
    except ChargepkiError as exc:
        observe.enrollment(policy.name, environment, policy.subject.profile, exc.code)
        raise
    except SQLAlchemyError:
        observe.enrollment(policy.name, environment, policy.subject.profile, "unavailable")
        raise
    observe.enrollment(policy.name, environment, policy.subject.profile, None)
    return certificate


def _run(work: Work, policy: Policy, attempt: Attempt) -> Certificate:
    session, credentials, settings = work.session, attempt.credentials, attempt.settings
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("the enrollment pipeline owns its transactions: commit the caller's changes first")
    keys = _limit_keys(credentials)
    if work.commits is not None:
        begin_reads(session)  # the checks read without SQLite's writer lock; the writes are grouped
    standing = auth_limits.standing(session, settings.limits, keys, work.now())
    if standing.retry_after is not None:
        session.rollback()  # ends the lockout read, the only work of this refused request
        raise RateLimitedError(
            f"too many failed authentications from this device or address: retry in {standing.retry_after} s",
            standing.retry_after,
        )
    work = work.as_actor(_actor(credentials))
    subject, parsed, who = credentials.username, False, None
    spent: list[tuple[str, str]] = []  # the secret, once a committed reservation spent it
    try:
        csr = read_csr(attempt.csr)
        subject, parsed = csr.common_name, True
        who = policy.authenticate(work, attempt, csr)
        if who.repeated is not None:
            who.expect(csr.common_name)
            certificate = _repeated(work, policy, who.repeated)
        else:
            certificate = _issue(work, policy, attempt, csr, who, spent)
    except ChargepkiError as exc:
        # The one place a refused request's work ends: the checks' reads (and whatever issue()
        # had not already rolled back itself). The refusal is then recorded on its own.
        session.rollback()
        presented = _presented(credentials)
        failed = isinstance(exc, AuthenticationError) and presented
        # No identity established: nothing presented, or refused before the credentials were checked.
        anonymous = credentials.principal is None and (
            not parsed or (isinstance(exc, AuthenticationError) and not presented)
        )
        _refused(work, policy, attempt, exc, subject, spent, keys if failed else None, anonymous)
        raise
    if standing.has_own_failures:
        try:
            with work.transaction():
                auth_limits.forget(session, keys)
        except SQLAlchemyError:
            pass  # the certificate is committed; a stale count only costs the device a retry
    return certificate


def _repeated(work: Work, policy: Policy, certificate_id: int) -> Certificate:
    """A retried request whose first attempt committed (``repeated_enrollment``): the certificate it
    produced, issued once; the repeat is audited in a transaction of its own."""
    session = work.session
    certificate = session.get(Certificate, certificate_id)
    assert certificate is not None
    serial, common_name = certificate.serial, certificate.common_name
    session.expunge(certificate)  # handed back as loaded: the audit's commit must not expire it
    session.rollback()  # ends the checks' reads
    with work.transaction():
        audit.record(
            session,
            "certificate.resent",
            actor=work.actor,
            subject=common_name,
            now=work.now,
            details={"serial": serial, "route": policy.name, "reason": "a repeated request of an issued certificate"},
        )
    return certificate


def _issue(
    work: Work, policy: Policy, attempt: Attempt, csr: CsrRequest, who: Authenticated, spent: list[tuple[str, str]]
) -> Certificate:
    """The subject policy, then ``issue()`` with what commits alongside: the spent secret with the
    reservation (noted in ``spent`` once committed: only then is it this request's to give back);
    the chain limit, the superseding and the caller's last step with the certificate."""
    session, authority = work.session, attempt.authority
    device = policy.subject.check(work, attempt, csr, who)
    if policy.channel_binding:
        _check_binding(csr.csr, attempt.credentials, attempt.settings)
    if (
        policy.first_enrollment
        and device is not None
        and not device.enrollment_open
        and current_certificate(session, device, work.now) is not None
    ):
        raise ConflictError(
            f"device {device.serial} is already enrolled: renew with simplereenroll, or an "
            "admin re-opens it with `chargepki device reset`",
            code="already_enrolled",
        )
    issuer = work.issuer(authority)
    request = request_from_csr(
        get_profile(policy.subject.profile),
        csr,
        issuer,
        attempt.validity,
        device_id=device.id if device is not None else None,
    )
    fits_ocpp_chain = (
        ocpp_chain_check(session, authority, attempt.max_chain_chars) if attempt.max_chain_chars is not None else None
    )

    def last_checks(tx: Work, row: Certificate) -> None:
        if fits_ocpp_chain is not None:
            fits_ocpp_chain(row)
        policy.subject.supersede(tx, attempt, device, row)
        if attempt.before_commit is not None:
            attempt.before_commit(tx.session, row)

    secret = who.secret
    spend = _spender(work, secret) if secret is not None else None
    reserved = (lambda: spent.append(secret)) if secret is not None else None
    row = issue(
        work, issuer=issuer, request=request, with_reservation=spend, on_reserved=reserved, before_commit=last_checks
    )
    if row.authority_id == authority.id and object_session(authority) is session:  # read later without a query
        set_committed_value(row, "authority", authority)
    return row


def _spender(work: Work, secret: tuple[str, str]) -> Callable[[Session], None]:
    """Spending the one-time secret in the reservation's transaction (a concurrent request with the
    same secret waits for it, then finds it used); refused when it is no longer valid."""
    serial, value = secret

    def spend(session: Session) -> None:
        if not consume_secret(session, serial, value, now=work.now, commit=False):
            raise AuthenticationError("unknown device or wrong, used or expired secret")

    return spend


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


def _refused(
    work: Work,
    policy: Policy,
    attempt: Attempt,
    exc: ChargepkiError,
    subject: str | None,
    spent: list[tuple[str, str]],
    failed: list[auth_limits.Key] | None,
    anonymous: bool,
) -> None:
    """Record a refusal in a transaction of its own (the refused work was rolled back by ``run``).

    ``failed``: the caller's keys, when the refusal was a failed authentication, counted against
    them in this transaction (which may start a lockout). ``anonymous``: the caller established
    no identity, so the refusal is counted into the per-address summary instead of an entry of
    its own. A secret this request spent is given back (the device did nothing wrong); never one it
    did not spend: a concurrent request with the same secret may have spent that one.
    """
    session, credentials = work.session, attempt.credentials
    try:
        with work.transaction():
            for secret in spent:
                restore_secret(session, *secret, commit=False)
            if anonymous:
                address, action = credentials.address, policy.refused
                audit.count_noise(session, address=address, action=action, code=exc.code, now=work.now)
                return
            if failed is not None:
                auth_limits.record_failure(
                    session,
                    attempt.settings.limits,
                    failed,
                    actor=work.actor,
                    now=work.now(),
                    address=credentials.address,
                    shown_device=_printable(_claimed_device(credentials), 64),
                )
            audit.record(
                session,
                policy.refused,
                actor=work.actor,
                subject=_printable(subject, 256),
                now=work.now,
                details={
                    "reason": str(exc),
                    "error": type(exc).__name__,
                    "code": exc.code,
                    "address": credentials.address,
                    "ca": attempt.authority.name,
                },
            )
    except SQLAlchemyError:
        pass  # rolled back: the refusal stands, unrecorded only while the database is away


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
