"""Pre-signing: the token side of OCSP. Responses are signed here, stored, and served elsewhere.

``Presigner`` is the ``ca.status.signal.StatusSigner`` that issuance and every revocation path call
inside their transaction; ``refresh`` re-signs what is due before its nextUpdate; ``sign_request``
answers what no stored response covers (unknown serials, several CertIDs, another hash).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.x509.ocsp import load_der_ocsp_response
from sqlalchemy import Select, bindparam, case, delete, func, literal_column, or_, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ca.authorities.factory import create_ocsp_signer
from ca.config import OcspSettings
from ca.errors import ChargepkiError
from ca.issuance.profiles import ROOT_PROFILES, ca_profile
from ca.keys.pkcs11_token import Token
from ca.keys.token_keys import token_private_key
from ca.kinds import CaStatus, CertStatus
from ca.status.signal import signal_change
from ca.store.engine import begin_reads
from ca.store.models import Authority, Certificate, OcspResponse
from ca.store.prepared import Prepared
from ca.work import Work
from ocsp.certid import CertId, IssuerHashes, issuer_hashes
from ocsp.signing import ResponseSigner, SingleStatus

log = logging.getLogger(__name__)

DEFAULT_VALIDITY = timedelta(hours=24)
DEFAULT_HASHES = ("sha1",)  # what OpenSSL, Go, Java and nginx send; others are signed on first use


@dataclass(frozen=True)
class OcspPolicy:
    """How long responses live and which CertID hashes are signed ahead of any request."""

    validity: timedelta = DEFAULT_VALIDITY
    hashes: tuple[str, ...] = DEFAULT_HASHES

    @property
    def refresh_before(self) -> timedelta:
        """Re-sign once half the validity has passed, so a stalled refresher has half a life to recover."""
        return self.validity / 2


def certificate_status(certificate: Certificate, cert_id: CertId) -> SingleStatus:
    if certificate.status == CertStatus.REVOKED:
        return SingleStatus(cert_id, "revoked", certificate.revoked_at, certificate.revocation_reason)
    if certificate.status == CertStatus.VALID:
        return SingleStatus(cert_id, "good")
    return SingleStatus(cert_id, "unknown")  # pending or aborted: never handed out


def answerable(certificate: Certificate) -> bool:
    """Issued certificates other than roots (a root's status is not any CA's to answer)."""
    return certificate.status in ("valid", "revoked") and certificate.profile not in ROOT_PROFILES


# Prepared once: the statements of every pre-signing, with bound parameters. Core statements on the
# tables, not the ORM's columns: they skip the ORM's per-statement work (~0.25 ms of each enrollment).
_CERTS = Certificate.__table__.c
_CAS = Authority.__table__.c


def _current_signer(*columns: Any, authority: str, now: str) -> Select[Any]:
    """The CA's current delegated signer (newest valid one whose key is in the token): the one rule,
    for its lookup and for the store of a response signed ahead (``_UPSERT_IF_CURRENT``)."""
    return (
        select(*columns)
        .join_from(Certificate.__table__, Authority.__table__, _CAS.id == _CERTS.authority_id)
        .where(
            _CERTS.authority_id == bindparam(authority, type_=_CERTS.authority_id.type),
            _CERTS.profile == literal_column("'ocsp-signer'"),  # a literal: the partial index's predicate
            _CERTS.status == CertStatus.VALID,
            _CERTS.key_label.is_not(None),
            _CERTS.not_before <= bindparam(now, type_=_CERTS.not_before.type),
            _CERTS.not_after > bindparam(now, type_=_CERTS.not_after.type),
        )
        .order_by(_CERTS.not_after.desc(), _CERTS.id.desc())
        .limit(1)
    )


_CURRENT_SIGNER = Prepared(
    _current_signer(_CERTS.serial, _CERTS.der, _CERTS.key_label, _CAS.rsa_padding, authority="authority_id", now="now")
)
_STORED = OcspResponse.__table__.c
# Prepared, on the table's columns: a revocation (e.g. of the certificate a re-enrollment supersedes)
# runs it in its transaction.
_STORED_ALGORITHMS = Prepared(
    select(_STORED.hash_algorithm).where(
        _STORED.authority_id == bindparam("authority_id"), _STORED.serial == bindparam("serial")
    )
)


@dataclass(frozen=True)
class PreparedAnswers:
    """A certificate's responses signed ahead of its record (``Presigner.prepare``)."""

    serial: str
    status: str
    signer: ResponseSigner
    this_update: datetime
    validity: timedelta
    answers: tuple[tuple[str, str, bytes], ...]  # (hash algorithm, status, DER)


class Presigner:
    """Signs and stores OCSP responses with each CA's current delegated signer (keys in the token)."""

    def __init__(self, token: Token, policy: OcspPolicy | None = None) -> None:
        self.token = token
        self.policy = policy or OcspPolicy()
        self._signers: dict[str, ResponseSigner] = {}  # by signer serial
        self._current: dict[int, ResponseSigner] = {}  # by CA: the signer its last lookup found
        self._issuers: dict[int, dict[str, IssuerHashes]] = {}
        self._validities: dict[int, timedelta] = {}

    def validity_for(self, session: Session, authority_id: int) -> timedelta:
        """How long responses about this CA's certificates live: the policy's validity, or longer
        where the CA's profile asks for it (ISO 15118 CAs: stapled, refreshed about weekly)."""
        validity = self._validities.get(authority_id)
        if validity is None:
            role = session.scalar(select(Authority.role).where(Authority.id == authority_id))
            profile = ca_profile(role) if role is not None else None
            floor = profile.ocsp_validity if profile is not None else None
            validity = max(self.policy.validity, floor) if floor is not None else self.policy.validity
            self._validities[authority_id] = validity
        return validity

    # -- who signs for a CA ----------------------------------------------------------------------
    def signer_for(self, session: Session, authority_id: int, now: datetime) -> ResponseSigner | None:
        """The CA's newest valid delegated signer whose key chargepki holds, or None."""
        row = _CURRENT_SIGNER.run(session, {"authority_id": authority_id, "now": now}).first()
        if row is None:
            self._current.pop(authority_id, None)
            return None
        signer = self._signers.get(row.serial)
        if signer is None:
            certificate = x509.load_der_x509_certificate(row.der)
            key = token_private_key(self.token, row.key_label, certificate.public_key())
            signer = ResponseSigner(authority_id, row.serial, certificate, row.der, key, row.rsa_padding)
            self._signers[row.serial] = signer
        self._current[authority_id] = signer
        return signer

    def _likely_signer(self, session: Session, authority_id: int, now: datetime) -> ResponseSigner | None:
        """``prepare``'s guess at the CA's current signer: the one its last lookup in this process found,
        while that one's certificate is within its validity; read otherwise (``begin_reads``: no writer
        lock). A guess made stale by a rotation or revocation elsewhere costs one signature more, never
        a wrong answer: the record reads the current signer again in its own transaction."""
        signer = self._current.get(authority_id)
        if signer is not None and signer.certificate.not_valid_before_utc <= now < signer.not_after:
            return signer
        begin_reads(session)
        return self.signer_for(session, authority_id, now)

    def issuer_hashes(self, session: Session, authority_id: int) -> dict[str, IssuerHashes]:
        hashes = self._issuers.get(authority_id)
        if hashes is None:
            der = session.scalar(select(Authority.certificate_der).where(Authority.id == authority_id))
            if der is None:
                raise ChargepkiError(f"no CA with id {authority_id}")
            hashes = {h.hash_algorithm: h for h in issuer_hashes(x509.load_der_x509_certificate(der))}
            self._issuers[authority_id] = hashes
        return hashes

    def cert_id(self, session: Session, certificate: Certificate, algorithm: str) -> CertId:
        issuer = self.issuer_hashes(session, certificate.authority_id)[algorithm]
        return CertId(algorithm, issuer.name_hash, issuer.key_hash, int(certificate.serial, 16))

    # -- the StatusSigner seam -------------------------------------------------------------------
    def prepare(self, session: Session, certificate: Certificate, now: datetime) -> PreparedAnswers | None:
        """Sign a just-issued certificate's responses before its record's transaction (``update``
        with ``prepared`` stores them there): the signing and building leave the one-writer section
        (SQLite's writer lock, the audit head's row lock), where each of an enrollment's steps
        makes every other writer wait. None when it cannot (no signer, token trouble): ``update``
        then signs in the transaction, as without it. Usually reads nothing (``_likely_signer``);
        what it reads, it reads in ``session`` begun for reads (a session in a transaction of its
        own is the caller's to keep out: ``ca.issuance.flow``)."""
        if not answerable(certificate):
            return None
        try:
            signer = self._likely_signer(session, certificate.authority_id, now)
            if signer is None:
                return None
            if certificate.authority_id not in self._validities or certificate.authority_id not in self._issuers:
                begin_reads(session)  # a CA's first certificate in this process: its role and name are read
            validity = self.validity_for(session, certificate.authority_id)
            answers = []
            for algorithm in self.policy.hashes:
                status = certificate_status(certificate, self.cert_id(session, certificate, algorithm))
                answers.append(
                    (algorithm, status.status, signer.sign([status], this_update=now, next_update=now + validity))
                )
        except ChargepkiError as exc:
            log.warning("OCSP pre-signing ahead of the record failed; signing in its transaction: %s", exc)
            return None
        return PreparedAnswers(certificate.serial, certificate.status, signer, now, validity, tuple(answers))

    def update(
        self,
        session: Session,
        certificates: Sequence[Certificate],
        now: datetime,
        *,
        fresh: bool = False,
        prepared: PreparedAnswers | None = None,
    ) -> None:
        """Re-sign the stored responses of ``certificates``; if the token fails, drop them instead.
        ``fresh``: recorded in this transaction, nothing stored yet (no lookup of stored algorithms).
        ``prepared`` (``prepare``'s, for a fresh certificate) is stored as it is when its signer is
        still the CA's current one in this transaction; otherwise it is signed here after all."""
        try:
            if prepared is None or not self._store_prepared(session, certificates, now, prepared):
                self.store(session, certificates, now, fresh=fresh)
        except ChargepkiError as exc:
            log.warning("OCSP pre-signing failed, dropping stored responses instead: %s", exc)
            drop_responses(session, certificates)
        signal_change(session)

    def _store_prepared(
        self, session: Session, certificates: Sequence[Certificate], now: datetime, prepared: PreparedAnswers
    ) -> bool:
        if len(certificates) != 1:
            return False
        certificate = certificates[0]
        if (certificate.serial, certificate.status) != (prepared.serial, prepared.status):
            return False
        # The rule is the signer current *in this transaction*: a signer rotated or revoked since
        # ``prepare`` read it must not answer for the new certificate. The first response is stored
        # only if so (one statement: the check and the write); when it is not, nothing was written.
        signer, signed_at, validity = prepared.signer, prepared.this_update, prepared.validity
        for index, (algorithm, status, der) in enumerate(prepared.answers):
            checked_at = now if index == 0 else None  # the first one's check holds for the transaction
            stored = upsert_response(
                session, certificate, algorithm, status, der, signer, signed_at, self.policy,
                validity=validity, if_current_at=checked_at,
            )  # fmt: skip
            if not stored:
                return False  # a stale guess: ``store`` reads the current signer and signs with it
        return True

    def store(
        self, session: Session, certificates: Iterable[Certificate], now: datetime, *, fresh: bool = False
    ) -> int:
        """Sign and upsert a response per certificate and hash algorithm; returns how many.

        Each certificate gets the policy's hash algorithms and those already stored for it (a client
        asked for them); ``fresh`` certificates have none stored, so that lookup is skipped."""
        count = 0
        signers: dict[int, ResponseSigner | None] = {}
        for certificate in certificates:
            if not answerable(certificate):
                continue
            if certificate.authority_id not in signers:
                signers[certificate.authority_id] = self.signer_for(session, certificate.authority_id, now)
            signer = signers[certificate.authority_id]
            if signer is None:  # no signer yet (init order) or none left: never serve a stale answer
                drop_responses(session, [certificate])
                continue
            stored = (
                []
                if fresh
                else _STORED_ALGORITHMS.run(
                    session, {"authority_id": certificate.authority_id, "serial": certificate.serial}
                ).scalars()
            )
            validity = self.validity_for(session, certificate.authority_id)
            for algorithm in dict.fromkeys([*self.policy.hashes, *stored]):
                status = certificate_status(certificate, self.cert_id(session, certificate, algorithm))
                der = signer.sign([status], this_update=now, next_update=now + validity)
                upsert_response(
                    session, certificate, algorithm, status.status, der, signer, now, self.policy, validity=validity
                )
                count += 1
        return count


def drop_responses(session: Session, certificates: Iterable[Certificate]) -> None:
    keys = [(c.authority_id, c.serial) for c in certificates]
    if keys:
        session.execute(delete(OcspResponse).where(tuple_(OcspResponse.authority_id, OcspResponse.serial).in_(keys)))


_REPLACED = ("cert_status", "der", "this_update", "next_update", "signer_serial")
_RESPONSES = OcspResponse.__table__


def _upsert(dialect_insert, *, while_current: bool = False):  # type: ignore[no-untyped-def]
    """INSERT … ON CONFLICT of a response; ``while_current``: inserted only while its signer
    (``signer_serial``) is the CA's current one, the check and the write in one statement (SQLite
    needs the SELECT's WHERE before ON CONFLICT)."""
    if while_current:
        current = _current_signer(_CERTS.serial, authority="authority_id", now="current_at").scalar_subquery()
        values = select(*(bindparam(column, type_=_RESPONSES.c[column].type) for column in _UPSERT_COLUMNS))
        statement = dialect_insert(_RESPONSES).from_select(
            _UPSERT_COLUMNS, values.where(current == bindparam("signer_serial", type_=_CERTS.serial.type))
        )
    else:
        statement = dialect_insert(_RESPONSES).values({column: bindparam(column) for column in _UPSERT_COLUMNS})
    return statement.on_conflict_do_update(
        index_elements=["authority_id", "serial", "hash_algorithm"],
        set_={key: statement.excluded[key] for key in _REPLACED},
    )


_UPSERT_COLUMNS = ("authority_id", "serial", "hash_algorithm", *_REPLACED)
# Prepared once: building an INSERT … ON CONFLICT per response cost more than running it.
_UPSERT = Prepared({"postgresql": _upsert(pg_insert), "": _upsert(sqlite_insert)})
# Its signer checked and the response stored in one statement (one round trip fewer per enrollment).
_UPSERT_IF_CURRENT = Prepared(
    {"postgresql": _upsert(pg_insert, while_current=True), "": _upsert(sqlite_insert, while_current=True)}
)


def upsert_response(
    session: Session,
    certificate: Certificate,
    algorithm: str,
    status: str,
    der: bytes,
    signer: ResponseSigner,
    now: datetime,
    policy: OcspPolicy,
    *,
    validity: timedelta | None = None,
    if_current_at: datetime | None = None,
) -> bool:
    """Store a signed response; ``validity`` is the CA's own when it differs from the policy's.
    ``if_current_at``: only while ``signer`` is the CA's current signer at that time, in this
    transaction; False when it is not (nothing is written)."""
    stamp = now.replace(microsecond=0)  # as in the DER (GeneralizedTime without fractions)
    values = {
        "authority_id": certificate.authority_id,
        "serial": certificate.serial,
        "hash_algorithm": algorithm,
        "cert_status": status,
        "der": der,
        "this_update": stamp,
        "next_update": min(stamp + (validity or policy.validity), signer.not_after),
        "signer_serial": signer.serial,
    }
    if if_current_at is None:
        _UPSERT.run(session, values)
        return True
    return _UPSERT_IF_CURRENT.run(session, {**values, "current_at": if_current_at}).rowcount == 1


@dataclass(frozen=True)
class StoredAnswer:
    """What the responder answers now for one certificate and CertID hash, read from the stored DER."""

    hash_algorithm: str
    cert_status: str  # good | revoked | unknown
    this_update: datetime
    next_update: datetime | None
    revocation_reason: str | None
    signer_serial: str


def stored_answers(session: Session, certificate: Certificate) -> list[StoredAnswer]:
    """The pre-signed responses the responder serves for ``certificate`` (one per CertID hash), as their
    DER says (not as the row's columns say: what a relying party receives is the DER)."""
    rows = session.scalars(
        select(OcspResponse)
        .where(OcspResponse.authority_id == certificate.authority_id, OcspResponse.serial == certificate.serial)
        .order_by(OcspResponse.hash_algorithm)
    ).all()
    answers = []
    for row in rows:
        response = load_der_ocsp_response(row.der)
        reason = response.revocation_reason
        answers.append(
            StoredAnswer(
                row.hash_algorithm, response.certificate_status.name.lower(), response.this_update_utc,
                response.next_update_utc, reason.name if reason is not None else None, row.signer_serial,
            )
        )  # fmt: skip
    return answers


# -- refreshing ----------------------------------------------------------------------------------
def due_certificates(
    session: Session,
    policy: OcspPolicy,
    now: datetime,
    signer: ResponseSigner,
    limit: int,
    after_id: int = 0,
    *,
    refresh_before: timedelta | None = None,
) -> list[Certificate]:
    """Unexpired issued certificates of the signer's CA whose response is due, signed by an older
    signer, or missing (``refresh_before``: the CA's own half-life when its responses live longer)."""
    outdated = or_(
        OcspResponse.next_update <= now + (refresh_before or policy.refresh_before),
        OcspResponse.signer_serial != signer.serial,
    )
    # 0 if a response of this certificate is outdated, 1 if all are current, NULL if it has none. One
    # correlated probe of uq_ocsp_lookup per certificate: written as EXISTS(outdated) OR NOT EXISTS(any),
    # PostgreSQL hashed the whole ocsp_responses table for every batch (a full scan per 200 certificates).
    freshness = (
        select(func.min(case((outdated, 0), else_=1)))
        .where(OcspResponse.authority_id == Certificate.authority_id, OcspResponse.serial == Certificate.serial)
        .scalar_subquery()
    )
    query = (
        select(Certificate)
        .where(
            Certificate.authority_id == signer.authority_id,
            Certificate.id > after_id,  # a cursor: each pass visits a certificate once (linear, and it ends)
            Certificate.status.in_(("valid", "revoked")),
            Certificate.profile.not_in(ROOT_PROFILES),
            Certificate.not_after > now,
            func.coalesce(freshness, 0) == 0,
        )
        .order_by(Certificate.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        # Lock the rows: a revocation committing meanwhile waits, so its response is always written last.
        query = query.with_for_update(of=Certificate, skip_locked=True)
    return list(session.scalars(query))


def refresh(session: Session, presigner: Presigner, now: datetime, *, batch: int = 200) -> int:
    """Re-sign every due response, a committed batch at a time; returns how many were signed.

    CAs without a current signer are left out (``rotate_signers`` makes one); their certificates
    are answered by the on-demand signer meanwhile, or not at all, never from a stale response.
    """
    total = 0
    for authority_id in list(session.scalars(select(Authority.id).order_by(Authority.id))):
        signer = presigner.signer_for(session, authority_id, now)
        half_life = presigner.validity_for(session, authority_id) / 2
        after_id = 0
        while signer is not None:
            certificates = due_certificates(
                session, presigner.policy, now, signer, batch, after_id, refresh_before=half_life
            )
            if not certificates:
                break
            after_id = certificates[-1].id
            total += presigner.store(session, certificates, now)
            session.commit()
    session.rollback()
    return total


def rotate_signers(
    session: Session,
    presigner: Presigner,
    *,
    actor: str,
    now: datetime,
    validity: timedelta,
    force: bool = False,
    authority_names: Sequence[str] = (),
) -> list[tuple[Authority, Certificate]]:
    """A new delegated signer for every unexpired active CA whose signer is missing or has a third of its life left.

    ``refresh`` then re-signs that CA's responses with it; the old signer's responses stay valid
    meanwhile, since none outlives its signer. A CA made by a rotation is covered from its first
    pass; a retired CA (``ca.authorities.rotation``) has nothing left to answer for and gets no new signer.
    """
    rotated = []
    work = Work(session=session, actor=actor, status=presigner, token=presigner.token, now=lambda: now)
    # External CAs (an imported V2G root) have no key here: their own operator answers for them;
    # a retired CA (ca/rotation.py) has nothing left to answer for.
    candidates = select(Authority).where(Authority.not_after > now, Authority.status == CaStatus.ACTIVE)
    for authority in session.scalars(candidates.order_by(Authority.id)):
        if authority_names and authority.name not in authority_names:
            continue
        signer = presigner.signer_for(session, authority.id, now)
        if signer is not None and not force:
            lifetime = signer.not_after - signer.certificate.not_valid_before_utc
            if signer.not_after - now > lifetime / 3:
                continue
        row = create_ocsp_signer(work, authority=authority, validity=validity)
        rotated.append((authority, row))
    return rotated


def policy_from(settings: OcspSettings) -> OcspPolicy:
    return OcspPolicy(validity=timedelta(hours=settings.validity_hours), hashes=settings.presign_hashes)
