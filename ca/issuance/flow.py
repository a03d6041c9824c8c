"""Issuance, shared by the CLI, EST and the CSMS API.

Order matters (ARCHITECTURE.md, "Where each rule lives"): check → reserve the serial in a
committed row → sign in the token → parse back and verify → record the certificate and its
audit entry in one commit → return. A crash anywhere before that last commit leaves at most a
``pending`` row whose serial is burnt and whose certificate nobody received.

Units of work: ``issue`` owns its transactions. It commits twice (the reservation, the record)
and rolls back its own work on any failure; it never commits or rolls back work it did not
start. The caller's transaction may hold the reads that led to the issuance (the checks), but
no writes: what must commit with the reservation (a spent enrollment secret) goes in
``with_reservation``, what must commit with the certificate (superseding the previous one, a
job marked done) in ``before_commit``. ORM changes still pending in the session are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID, NameOID
from sqlalchemy import bindparam, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, make_transient_to_detached

from ca import audit, observe
from ca.authorities.issuers import Issuer, public_key_sha256, still_signs
from ca.clock import Clock, utcnow
from ca.errors import ChargepkiError, ConflictError, PolicyError, StoreError
from ca.issuance.csr import CsrRequest
from ca.issuance.names import check_common_name, check_hostname, subject_name
from ca.issuance.profiles import Profile, check_issuer_role
from ca.issuance.serials import format_serial, new_serial
from ca.keys.keyspec import describe_public_key
from ca.kinds import CertStatus
from ca.status.signal import StatusSigner
from ca.store.engine import in_reads
from ca.store.models import Authority, Certificate, KeyOwner
from ca.store.prepared import Prepared, new_object
from ca.work import Work

BACKDATE = timedelta(minutes=5)  # tolerate chargers whose clocks run a little behind
# A reservation older than this belongs to a process that died (kill -9, power loss): an issuance
# takes milliseconds, a stuck token call at most the service's 30 s request timeout.
PENDING_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime


def check_key(profile: Profile, public_key: CertificatePublicKeyTypes, issuer_key_type: str | None = None) -> str:
    """The key's type name, or a ``PolicyError`` (``key_not_allowed``) saying what the profile allows
    instead; ``issuer_key_type``: the issuing CA's, which some profiles also allow (OCSP signers)."""
    kind = describe_public_key(public_key)
    allowed = profile.allowed_key_types(issuer_key_type)
    if kind not in allowed:
        raise PolicyError(
            f"key type {kind} is not allowed for profile {profile.name} (allowed: {', '.join(allowed)})",
            code="key_not_allowed",
        )
    return kind


def validity_window(
    profile: Profile, requested: timedelta | None, now: datetime, issuer_not_after: datetime | None
) -> Validity:
    """Profile default or the requested length, capped by the profile; never beyond the issuer."""
    length = profile.default_validity if requested is None else requested
    if length <= timedelta(0):
        raise PolicyError("the validity must be positive")
    if length > profile.max_validity:
        raise PolicyError(
            f"validity of {length.days} days exceeds the maximum of {profile.max_validity.days} "
            f"days for profile {profile.name}"
        )
    not_before = now.astimezone(UTC).replace(microsecond=0) - BACKDATE
    not_after = not_before + length
    if issuer_not_after is not None:
        if issuer_not_after <= now:
            raise PolicyError("the issuing CA has expired")
        not_after = min(not_after, issuer_not_after)
    return Validity(not_before, not_after)


def _key_usage(profile: Profile, public_key: CertificatePublicKeyTypes) -> x509.KeyUsage:
    usage = set(profile.key_usage)
    if profile.key_agreement_for_ec and isinstance(public_key, ec.EllipticCurvePublicKey):
        usage.add("key_agreement")
    if profile.key_encipherment_for_rsa and isinstance(public_key, rsa.RSAPublicKey):
        usage.add("key_encipherment")
    fields = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    )
    return x509.KeyUsage(**{field: field in usage for field in fields}, encipher_only=False, decipher_only=False)


def build_certificate(
    profile: Profile,
    issuer: Issuer,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    serial: int,
    validity: Validity,
    dns_names: tuple[str, ...] = (),
) -> x509.CertificateBuilder:
    """The TBSCertificate exactly as the profile prescribes (RFC 5280 criticality).

    Built in one constructor call from a list of extensions, most of them the same for every
    certificate of a profile under a CA (``_fixed_extensions``): chaining ``add_extension`` copied
    and re-checked the builder seven times, a twelfth of an enrollment's Python calls. What the
    chained setters checked is checked here (the serial's RFC 5280 bounds, the validity order)."""
    if not 0 < serial < 2**159:  # RFC 5280 4.1.2.2: positive, at most 20 octets in DER
        raise ValueError("the serial number must be positive and below 2^159")
    not_before, not_after = _naive_utc(validity.not_before), _naive_utc(validity.not_after)
    if not _EARLIEST <= not_before <= not_after:
        raise ValueError("the validity must start after 1950 and end after it starts")
    leading, middle, trailing = _fixed_extensions(profile, issuer, public_key)
    extensions = [*leading, x509.Extension(_SKI, False, x509.SubjectKeyIdentifier.from_public_key(public_key)), *middle]
    if profile.san_dns:
        common_name = subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        names = list(dict.fromkeys([str(common_name), *dns_names]))
        san = x509.SubjectAlternativeName([x509.DNSName(name) for name in names])
        extensions.append(x509.Extension(_SAN, False, san))
    extensions.extend(trailing)
    issuer_name = issuer.certificate.subject if issuer.certificate is not None else subject
    return x509.CertificateBuilder(issuer_name, subject, public_key, serial, not_before, not_after, extensions)


_SKI, _SAN = ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.SUBJECT_ALTERNATIVE_NAME
_EARLIEST = datetime(1950, 1, 1)  # naive UTC, as the builder keeps its times
_Extensions = tuple[x509.Extension[Any], ...]
_FIXED: dict[tuple[Any, ...], tuple[_Extensions, _Extensions, _Extensions]] = {}
_FIXED_KEPT = 256


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _fixed_extensions(
    profile: Profile, issuer: Issuer, public_key: CertificatePublicKeyTypes
) -> tuple[_Extensions, _Extensions, _Extensions]:
    """The extensions that depend only on the profile, the CA and the key's algorithm, in their order
    around the subject key identifier and the SAN: (before the SKI, between it and the SAN, after).
    Kept per profile, key algorithm and CA (its certificate and URLs), which never change."""
    algorithm = (isinstance(public_key, ec.EllipticCurvePublicKey), isinstance(public_key, rsa.RSAPublicKey))
    key = (profile, algorithm, issuer.certificate, issuer.name, issuer.ocsp_url, issuer.repository_url)
    fixed = _FIXED.get(key)
    if fixed is None:
        fixed = _FIXED[key] = _extensions_around_ski_and_san(profile, issuer, _key_usage(profile, public_key))
        if len(_FIXED) > _FIXED_KEPT:
            _FIXED.clear()  # more CAs and profiles than any installation has: start over rather than grow
    return fixed


def _extensions_around_ski_and_san(
    profile: Profile, issuer: Issuer, key_usage: x509.KeyUsage
) -> tuple[_Extensions, _Extensions, _Extensions]:
    leading = (
        # RFC 5280 4.2.1.9: critical in CA certificates; we mark it critical for every profile.
        x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True, x509.BasicConstraints(profile.ca, profile.path_length)),
        x509.Extension(ExtensionOID.KEY_USAGE, True, key_usage),
    )
    middle = []
    if issuer.certificate is not None:  # RFC 5280 4.2.1.1: may be omitted only when self-signed
        ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        middle.append(x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki))
    if profile.extended_key_usage:
        eku = x509.ExtendedKeyUsage(list(profile.extended_key_usage))
        middle.append(x509.Extension(ExtensionOID.EXTENDED_KEY_USAGE, False, eku))
    trailing = []
    access = []
    if profile.aia_ocsp:
        access.append(
            x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(issuer.ocsp_url))
        )
    if profile.aia_ca_issuers and issuer.certificate is not None:
        access.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(issuer.certificate_url()),
            )
        )
    if access:
        aia = x509.AuthorityInformationAccess(access)
        trailing.append(x509.Extension(ExtensionOID.AUTHORITY_INFORMATION_ACCESS, False, aia))
    if profile.crl_distribution_point and issuer.certificate is not None:
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(issuer.crl_url())], None, None, None)
        points = x509.CRLDistributionPoints([point])
        trailing.append(x509.Extension(ExtensionOID.CRL_DISTRIBUTION_POINTS, False, points))
    if profile.ocsp_no_check:
        trailing.append(x509.Extension(ExtensionOID.OCSP_NO_CHECK, False, x509.OCSPNoCheck()))
    return leading, tuple(middle), tuple(trailing)


def key_identity(profile: str, common_name: str | None, device_id: int | None) -> str:
    """Who a certified key belongs to (one key, one identity): a registered device, whatever it asks
    for as a charger; an SECC by its SECC ID, whoever asks, once per ISO 15118 version (a station
    holds an ISO 15118-2 and an ISO 15118-20 leaf, each with a key of its own: a key certified for
    one version is refused for the other); anything else by profile and CN.
    Migration 0008 computes the same for the certificates issued before it (there were no -20 ones)."""
    if profile == "v2g-secc":
        return f"secc:{common_name or ''}"
    if profile == "v2g20-secc":
        return f"secc20:{common_name or ''}"
    if device_id is not None:
        return f"device:{device_id}"
    return f"{profile}:{common_name or ''}"


@dataclass(frozen=True)
class IssueRequest:
    """What the CA will certify, after the caller has authenticated the requester."""

    profile: Profile
    public_key: CertificatePublicKeyTypes
    common_name: str
    dns_names: tuple[str, ...] = ()
    validity: timedelta | None = None
    device_id: int | None = None
    key_label: str | None = None  # set when the key is one chargepki holds in its token
    organizational_unit: str | None = None  # e.g. a firmware signer's release channel


def request_from_csr(
    profile: Profile,
    csr: CsrRequest,
    issuer: Issuer,
    validity: timedelta | None = None,
    device_id: int | None = None,
) -> IssueRequest:
    """Apply the profile's subject rules to a verified CSR (O, when present, must be the CA's)."""
    if not profile.from_csr:
        raise PolicyError(f"profile {profile.name} is not issued from a CSR (it is created by `chargepki init`)")
    if csr.organization is not None and csr.organization != issuer.organization:
        raise PolicyError(
            f"the CSR's O {csr.organization!r} is not the CA's organisation {issuer.organization!r}",
            code="wrong_organization",
        )
    dns_names = tuple(check_hostname(name) for name in csr.dns_names) if profile.san_dns else ()
    return IssueRequest(profile, csr.public_key, csr.common_name, dns_names, validity, device_id)


def issue(
    work: Work,
    *,
    issuer: Issuer,
    request: IssueRequest,
    with_reservation: Callable[[Session], None] | None = None,
    on_reserved: Callable[[], None] | None = None,
    before_commit: Callable[[Work, Certificate], None] | None = None,
) -> Certificate:
    """Issue and durably record one certificate under ``issuer``; return the committed row.

    Two write steps (``Work.write``: group-committed with concurrent requests in services), with the
    token's signature between them: the reservation commits a ``pending`` row, so the serial is
    taken before the token signs; the record commits the DER, its audit entry and its presigned
    OCSP response together. The certificate is returned only after that commit.

    ``work.status`` pre-signs the new certificate's OCSP response in the record's transaction;
    ``work.actor`` is audited as the issuer of the request.
    ``with_reservation`` runs first in the reservation's transaction (e.g. spending a one-time
    secret: a ``ChargepkiError`` it raises refuses the request before any serial is taken);
    ``on_reserved`` is called once that transaction committed (what it did is then durable).
    ``before_commit`` runs last in the record's transaction, with a ``Work`` on that transaction's
    session (use it, not the caller's), so what it changes (superseding the previous certificate,
    closing enrollment) commits atomically with it; a ``ChargepkiError`` it raises abandons the
    certificate (``aborted``) instead. Both may run again after a rollback (``ca.store.group_commit``).
    The row returned joins the caller's session only after the commit.
    Refuses (``RuntimeError``, a programming error) a session holding pending ORM changes: this
    function commits, and would otherwise commit the caller's work as a side effect.
    """
    started = time.perf_counter()
    session, actor, now = work.session, work.actor, work.now
    status = work.signer()
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("issue() commits its own transactions: commit or roll back the caller's changes first")
    profile = request.profile
    key_type = check_key(profile, request.public_key, issuer.spec.name)
    common_name = check_common_name(profile.common_name, request.common_name)
    assert issuer.certificate is not None and issuer.authority_id is not None, "roots are made by init"
    if issuer.role is not None:
        check_issuer_role(profile, issuer.role, issuer.name)
    validity = validity_window(profile, request.validity, now(), issuer.certificate.not_valid_after_utc)
    subject = subject_name(
        common_name, issuer.organization, issuer.country, profile.domain_component, request.organizational_unit
    )
    pending = _pending_values(issuer, request, subject, common_name, validity, now)
    identity = key_identity(profile.name, common_name, request.device_id)

    def reserve(tx: Session) -> Certificate:
        return _reserve(tx, issuer, pending, identity, now, with_reservation)

    row = work.write(reserve)
    if on_reserved is not None:
        on_reserved()
    try:
        builder = build_certificate(
            profile, issuer, subject, request.public_key, int(row.serial, 16), validity, request.dns_names
        )
        certificate = issuer.sign(builder)
    except ChargepkiError as exc:
        _abandon(session, row, str(exc), actor, now)
        raise
    row.der = certificate.public_bytes(serialization.Encoding.DER)
    row.fingerprint_sha256 = certificate.fingerprint(hashes.SHA256()).hex()
    row.status = "valid"
    details = {
        "profile": profile.name,
        "ca": issuer.name,
        "cn": common_name,
        "key": key_type,
        "not_after": validity.not_after.isoformat(),
        "fingerprint": row.fingerprint_sha256,
    }

    prepared = _prepare_answers(session, status, row, now)

    def record(tx: Session) -> None:
        # The audit entry first: it takes the audit head's row lock, which every status change of a
        # CA (revocation, retirement: they are audited) also takes. Checked after it, the CA's status
        # is final until this commit, so no certificate commits under a CA after its revocation.
        audit.record(tx, "certificate.issued", actor=actor, subject=row.serial, now=now, details=details)
        # The ORM unit of work costs more than the rest of issuance: one UPDATE by primary key instead.
        values = {"row_id": row.id, "der": row.der, "fingerprint": row.fingerprint_sha256}
        if _RECORD.run(tx, {**values, "signing_ca": issuer.authority_id}).rowcount != 1:
            # The CA was revoked or retired since the reservation (its key signed, nobody receives it),
            # or the reservation was swept as abandoned (``abandon_stale_pending``): hand out nothing.
            raise _ca_refusal(tx, issuer) or _Swept(
                f"the reservation of serial {row.serial} was abandoned before it could be recorded"
            )
        # Recorded just now, so no response is stored yet: the one signed ahead is stored, or signed here.
        status.update(tx, [row], now(), fresh=True, prepared=prepared)
        if before_commit is not None:
            before_commit(replace(work, session=tx), row)

    try:
        work.write(record)
    except _Swept as exc:
        raise StoreError(str(exc)) from None
    except ChargepkiError as exc:  # the CA stopped signing, or a last check refused: nobody receives it
        _abandon(session, row, str(exc), actor, now)
        raise
    make_transient_to_detached(row)  # every column is set: it joins the session as loaded, without a query
    session.add(row)
    observe.issued(profile.name, time.perf_counter() - started)
    return row


def _prepare_answers(session: Session, status: StatusSigner, row: Certificate, now: Clock) -> Any:
    """The new certificate's OCSP responses, signed before the record's transaction (what it reads,
    it reads in ``session`` begun for reads: on SQLite no writer lock is taken for them). None when
    that fails, or when the caller's session is inside a transaction (whose work is not this
    function's to end): the record signs them."""
    if session.in_transaction() and not in_reads(session):
        return None
    try:
        return status.prepare(session, row, now())
    except SQLAlchemyError:  # the store is away: the record will say so, or sign when it is back
        session.rollback()
        return None


class _Swept(ChargepkiError):
    """The reservation was marked aborted by the sweeper before the record: nothing to abandon."""


_CERTIFICATES = Certificate.__table__
# Both the reservation and the record require the CA to be active in that very transaction
# (``still_signs``): an ``Issuer`` a worker bound before a revocation can never record under it.
# The reservation's check spares the token a signature; the record's is the rule.
_RECORD = Prepared(
    update(_CERTIFICATES)
    .where(_CERTIFICATES.c.id == bindparam("row_id"), _CERTIFICATES.c.status == CertStatus.PENDING, still_signs())
    .values(der=bindparam("der"), fingerprint_sha256=bindparam("fingerprint"), status=CertStatus.VALID)
)
_ABORT = Prepared(
    update(_CERTIFICATES)
    .where(_CERTIFICATES.c.id == bindparam("row_id"), _CERTIFICATES.c.status == CertStatus.PENDING)
    .values(status=CertStatus.ABORTED)
)


_PENDING_COLUMNS = (
    "authority_id",
    "profile",
    "status",
    "subject",
    "common_name",
    "not_before",
    "not_after",
    "der",
    "fingerprint_sha256",
    "public_key_sha256",
    "key_label",
    "device_id",
    "revoked_at",
    "revocation_reason",
    "invalidity_date",
    "revoke_after",
    "created_at",
    "serial",
)
# INSERT … SELECT <values> WHERE <the CA still signs>: the check costs no extra round trip.
_PENDING_SOURCE = select(*(bindparam(name, type_=_CERTIFICATES.c[name].type) for name in _PENDING_COLUMNS)).where(
    still_signs()
)
_INSERT_PENDING = Prepared(
    {
        name: dialect_insert(_CERTIFICATES)
        .from_select(_PENDING_COLUMNS, _PENDING_SOURCE)
        .on_conflict_do_nothing()
        .returning(_CERTIFICATES.c.id)
        for name, dialect_insert in (("sqlite", sqlite_insert), ("postgresql", postgresql_insert))
    }
)


def _insert_pending(session: Session, values: dict[str, Any]) -> int | None:
    """INSERT the reserved row if the CA still signs; None when it does not or the serial is taken
    (the caller's transaction stays usable)."""
    if _INSERT_PENDING.knows(session.get_bind().dialect):
        return _INSERT_PENDING.run(session, values).scalar()
    try:  # other databases: a savepoint keeps the caller's work when the INSERT fails
        with session.begin_nested():
            inserted = session.execute(
                sa_insert(_CERTIFICATES).from_select(_PENDING_COLUMNS, _PENDING_SOURCE).returning(_CERTIFICATES.c.id),
                values,
            )
            return inserted.scalar()
    except IntegrityError:
        return None


_KEY_OWNERS = KeyOwner.__table__
_CLAIM_VALUES = {
    "public_key_sha256": bindparam("claim_key", type_=_KEY_OWNERS.c.public_key_sha256.type),
    "identity": bindparam("claim_identity", type_=_KEY_OWNERS.c.identity.type),
    "created_at": bindparam("claim_at", type_=_KEY_OWNERS.c.created_at.type),
}
# Insert the claim or read the owner in one statement. The no-op update makes the database
# return the stored row; on PostgreSQL it also waits for a racing transaction that inserted
# the same key and then reads its committed owner, so exactly one identity wins.
_CLAIM_KEY_BY_DIALECT = {
    name: dialect_insert(_KEY_OWNERS)
    .values(_CLAIM_VALUES)
    .on_conflict_do_update(index_elements=["public_key_sha256"], set_={"identity": _KEY_OWNERS.c.identity})
    .returning(_KEY_OWNERS.c.identity)
    for name, dialect_insert in (("sqlite", sqlite_insert), ("postgresql", postgresql_insert))
}
_CLAIM_KEY = Prepared(_CLAIM_KEY_BY_DIALECT)


def _claim_parameters(key_sha256: str, identity: str, now: Clock) -> dict[str, Any]:
    return {"claim_key": key_sha256, "claim_identity": identity, "claim_at": now()}


def _refuse_another_owner(owner: str | None, identity: str) -> None:
    if owner != identity:
        raise ConflictError("this public key is already certified for another identity", code="key_reuse")


def _claim_key(session: Session, key_sha256: str, identity: str, now: Clock) -> None:
    """One key, one identity, held by the database: refuse (``key_reuse``) a key whose owner differs."""
    parameters = _claim_parameters(key_sha256, identity, now)
    if _CLAIM_KEY.knows(session.get_bind().dialect):
        owner = _CLAIM_KEY.run(session, parameters).scalar()
    else:  # other databases: the primary key still refuses a second owner at commit
        owner = session.scalar(select(_KEY_OWNERS.c.identity).where(_KEY_OWNERS.c.public_key_sha256 == key_sha256))
        if owner is None:
            session.execute(sa_insert(_KEY_OWNERS).values(_CLAIM_VALUES), parameters)
            owner = identity
    _refuse_another_owner(owner, identity)


# PostgreSQL: the key claim and the pending row in one round trip. The claim (a data-modifying WITH:
# it runs once, to completion, whatever the INSERT does) returns the key's owner, and the row is
# inserted only when that owner is this identity and the CA still signs; when nothing is inserted,
# ``_reserve`` reads which of the three it was (the claim's effect is visible in the transaction).
_CLAIM = _CLAIM_KEY_BY_DIALECT["postgresql"].cte("claim")
_CLAIM_AND_INSERT_PENDING = Prepared(
    postgresql_insert(_CERTIFICATES)
    .from_select(
        _PENDING_COLUMNS,
        _PENDING_SOURCE.where(select(_CLAIM.c.identity).scalar_subquery() == _CLAIM_VALUES["identity"]),
    )
    .on_conflict_do_nothing()
    .returning(_CERTIFICATES.c.id)
)


def _claim_and_insert_pending(session: Session, values: dict[str, Any], identity: str, now: Clock) -> int | None:
    """PostgreSQL: ``_claim_key`` and ``_insert_pending`` in one statement, with their outcomes: the id,
    or None when the CA stopped signing or the serial is taken; ``key_reuse`` as ``_claim_key`` says it."""
    key_sha256 = values["public_key_sha256"]
    parameters = {**values, **_claim_parameters(key_sha256, identity, now)}
    row_id = _CLAIM_AND_INSERT_PENDING.run(session, parameters).scalar()
    if row_id is None:
        owner = session.scalar(select(_KEY_OWNERS.c.identity).where(_KEY_OWNERS.c.public_key_sha256 == key_sha256))
        _refuse_another_owner(owner, identity)
    return row_id


def _ca_refusal(session: Session, issuer: Issuer) -> PolicyError | None:
    """Why ``issuer``'s CA may not sign any more (read after a guarded statement matched nothing)."""
    status = session.scalar(select(Authority.status).where(Authority.id == issuer.authority_id))
    if status == "active":
        return None
    return PolicyError(f"CA {issuer.name} is {status}: it signs nothing any more", code="ca_not_active")


def _pending_values(
    issuer: Issuer, request: IssueRequest, subject: x509.Name, common_name: str, validity: Validity, now: Clock
) -> dict[str, Any]:
    """The columns of the reserved row, all but its serial."""
    return {
        "authority_id": issuer.authority_id,
        "profile": request.profile.name,
        "status": "pending",
        "subject": subject.rfc4514_string(),
        "common_name": common_name,
        "not_before": validity.not_before,
        "not_after": validity.not_after,
        "der": None,
        "fingerprint_sha256": None,
        "public_key_sha256": public_key_sha256(request.public_key),
        "key_label": request.key_label,
        "device_id": request.device_id,
        "revoked_at": None,
        "revocation_reason": None,
        "invalidity_date": None,
        "revoke_after": None,
        "created_at": now(),
    }


def _reserve(
    session: Session,
    issuer: Issuer,
    pending: dict[str, Any],
    identity: str,
    now: Clock,
    with_reservation: Callable[[Session], None] | None = None,
) -> Certificate:
    """Claim the key for ``identity`` and insert a ``pending`` row, so the serial is taken before the
    token signs anything; the caller's ``Work.write`` commits it.

    The transaction carries ``with_reservation``'s statements (run first, e.g. a consumed
    enrollment secret), the key claim and the row. The returned row is not in any session
    (``issue`` adds it to the caller's once it is recorded).
    """
    if with_reservation is not None:
        with_reservation(session)
    claimed = session.get_bind().dialect.name != "postgresql"
    if claimed:
        _claim_key(session, pending["public_key_sha256"], identity, now)
    for _attempt in range(5):
        values = {**pending, "serial": format_serial(new_serial())}
        if claimed:
            row_id = _insert_pending(session, {**values, "signing_ca": issuer.authority_id})
        else:  # PostgreSQL: the claim goes with the first attempt (one round trip fewer)
            row_id = _claim_and_insert_pending(session, {**values, "signing_ca": issuer.authority_id}, identity, now)
            claimed = True
        if row_id is None:  # the CA stopped signing, or a serial collision (2^-159 per pair: never trust luck)
            refusal = _ca_refusal(session, issuer)
            if refusal is not None:
                raise refusal
            continue
        return new_object(Certificate, {"id": row_id, **values}.items())
    raise PolicyError("could not reserve a unique serial number")


def _abandon(session: Session, row: Certificate, reason: str, actor: str, now: Clock) -> None:
    """Mark a reserved serial as never issued, and say why in the audit log.

    If the database is down too, the row stays ``pending``: still burnt, still never handed out.
    """
    session.rollback()
    try:
        _ABORT.run(session, {"row_id": row.id})
        row.status = "aborted"
        audit.record(
            session,
            "certificate.aborted",
            actor=actor,
            subject=row.serial,
            now=now,
            details={"reason": reason},
        )
        session.commit()
    except SQLAlchemyError:
        session.rollback()


def abandon_stale_pending(
    session: Session,
    *,
    actor: str,
    now: Clock = utcnow,
    older_than: timedelta = PENDING_TIMEOUT,
    limit: int = 1000,
) -> list[str]:
    """Mark reservations left ``pending`` longer than ``older_than`` as ``aborted``, each audited; commit.

    A process killed between reserving a serial and recording the certificate leaves its row
    ``pending`` for ever. Nobody received that certificate (``issue`` returns only after the
    record commits), so the row says ``aborted`` from then on and the serial stays burnt. Should
    the issuance still be running after all, it cannot record any more (``_RECORD`` only takes a
    pending row) and fails instead of handing out a certificate the store does not show.
    Returns the serials marked.
    """
    cutoff = now() - older_than
    stale = session.execute(
        select(_CERTIFICATES.c.id, _CERTIFICATES.c.serial)
        .where(_CERTIFICATES.c.status == CertStatus.PENDING, _CERTIFICATES.c.created_at < cutoff)
        .order_by(_CERTIFICATES.c.id)
        .limit(limit)
    ).all()
    marked = []
    for row_id, serial in stale:
        if _ABORT.run(session, {"row_id": row_id}).rowcount != 1:
            continue  # recorded or swept by someone else meanwhile
        audit.record(
            session,
            "certificate.aborted",
            actor=actor,
            subject=serial,
            now=now,
            details={"reason": f"still pending after {older_than}: the issuing process stopped before recording it"},
        )
        marked.append(serial)
    session.commit()
    return marked
