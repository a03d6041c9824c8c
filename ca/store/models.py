"""Storage only: the tables every process shares. Behaviour lives in the modules that use them.

Datetimes are stored as naive UTC and handed back timezone-aware, so SQLite (which has no
time zones) and PostgreSQL agree to the microsecond, which the audit hash chain relies on.
Serial numbers are upper-case hex strings: 20-octet serials do not fit any SQL integer.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import true as sa_true
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from ca.kinds import CaRole, CaStatus, CertStatus, JobState, sql_in


class UTCDateTime(TypeDecorator[datetime]):
    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Authority(Base):
    """A CA whose key is in the token: a root or an issuing CA of one environment."""

    __tablename__ = "authorities"
    __table_args__ = (
        CheckConstraint(sql_in("role", CaRole), name="ck_authorities_role"),
        CheckConstraint(sql_in("status", CaStatus), name="ck_authorities_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # a CaRole
    environment: Mapped[str] = mapped_column(String(16), index=True)
    organization: Mapped[str] = mapped_column(String(64))
    country: Mapped[str | None] = mapped_column(String(2))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("authorities.id"))
    key_label: Mapped[str] = mapped_column(String(128))
    key_type: Mapped[str] = mapped_column(String(16))
    rsa_padding: Mapped[str | None] = mapped_column(String(8))  # pkcs1 | pss, RSA keys only
    serial: Mapped[str] = mapped_column(String(40))
    subject: Mapped[str] = mapped_column(String(512))
    certificate_der: Mapped[bytes] = mapped_column(LargeBinary)
    # SHA-1 of the subjectPublicKey BIT STRING: the OCSP CertID issuerKeyHash and the SKI.
    key_sha1: Mapped[str] = mapped_column(String(40), index=True)
    ocsp_url: Mapped[str] = mapped_column(String(512))
    repository_url: Mapped[str] = mapped_column(String(512))
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), default=CaStatus.ACTIVE)  # a CaStatus
    # The last CRL number this CA used; raised atomically by every publisher (never goes back).
    crl_number: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    parent: Mapped[Authority | None] = relationship(remote_side=[id])


class Device(Base):
    """A registered charger; enrollment (EST, CSMS API) only serves registered devices."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    model: Mapped[str | None] = mapped_column(String(64))
    environment: Mapped[str] = mapped_column(String(16))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # A first-time enrollment is allowed while this is true; it closes on the first certificate
    # and only `chargepki device reset` re-opens it (anti-cloning).
    enrollment_open: Mapped[bool] = mapped_column(Boolean, default=True, server_default=sa_true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class EnrollmentSecret(Base):
    """A one-time enrollment secret; only its SHA-256 is stored (it is 256 random bits)."""

    __tablename__ = "enrollment_secrets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


_SIGNERS = text("profile = 'ocsp-signer'")  # the partial index's predicate (migration 0016)
REVOKED_ROWS = text("status = 'revoked'")  # the CRL entries' partial index (migration 0017)


class Certificate(Base):
    """Every certificate chargepki ever signed or reserved a serial for.

    ``pending`` rows hold a serial whose signature is in progress (or was interrupted):
    they were never handed out, and their serial is never used again.
    """

    __tablename__ = "certificates"
    __table_args__ = (
        Index("ix_certificates_authority_serial", "authority_id", "serial"),
        # (status, not_after) ranges; the other columns make the metrics' expiry count index-only (0012)
        Index("ix_certificates_status_not_after", "status", "not_after", "authority_id", "profile", "revoke_after"),
        Index("ix_certificates_profile_authority", "profile", "authority_id"),  # a CA's OCSP signers
        # a CA's current OCSP signer (ocsp.presign, which names the profile as a literal to use it)
        Index(
            "ix_certificates_ocsp_signers",
            "authority_id",
            "not_after",
            sqlite_where=_SIGNERS,
            postgresql_where=_SIGNERS,
        ),
        # a CA's CRL entries, read from the index alone (crl.publisher, which names the status as a literal)
        Index(
            "ix_certificates_crl_entries",
            "authority_id",
            "not_after",
            "serial",
            "revoked_at",
            "revocation_reason",
            "invalidity_date",
            "status",  # SQLite checks the predicate's column from the index only when the index holds it
            sqlite_where=REVOKED_ROWS,
            postgresql_where=REVOKED_ROWS,
        ),
        CheckConstraint(sql_in("status", CertStatus), name="ck_certificates_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    serial: Mapped[str] = mapped_column(String(40), unique=True)
    authority_id: Mapped[int] = mapped_column(ForeignKey("authorities.id"))
    profile: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # a CertStatus
    subject: Mapped[str] = mapped_column(String(1024))
    common_name: Mapped[str | None] = mapped_column(String(64), index=True)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    der: Mapped[bytes | None] = mapped_column(LargeBinary)
    fingerprint_sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    public_key_sha256: Mapped[str] = mapped_column(String(64), index=True)
    key_label: Mapped[str | None] = mapped_column(String(128))  # keys chargepki holds (OCSP signers)
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revocation_reason: Mapped[str | None] = mapped_column(String(32))
    invalidity_date: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set when a re-enrollment superseded this certificate with a grace period: revoked then.
    revoke_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    authority: Mapped[Authority] = relationship()


class KeyOwner(Base):
    """One key, one identity: the identity that first had ``public_key_sha256`` certified.

    ``issuance.issue`` claims the key in the transaction that reserves the serial (an upsert on
    this primary key), so two identities racing with one key cannot both get a certificate on
    any database; the identity is ``issuance.key_identity`` (``device:<id>``, ``secc:<SECC ID>``,
    else ``<profile>:<CN>``). A claim is never released: a key stays its first identity's.
    """

    __tablename__ = "key_owners"

    public_key_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    identity: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OcspResponse(Base):
    """A pre-signed OCSP response for one certificate and one CertID hash algorithm.

    The responder (which holds no key) serves ``der`` as it is; the component holding the
    token writes it at issuance and revocation and re-signs it before ``next_update``.
    """

    __tablename__ = "ocsp_responses"
    __table_args__ = (UniqueConstraint("authority_id", "serial", "hash_algorithm", name="uq_ocsp_lookup"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    authority_id: Mapped[int] = mapped_column(ForeignKey("authorities.id"))
    serial: Mapped[str] = mapped_column(String(40))
    hash_algorithm: Mapped[str] = mapped_column(String(8))  # sha1 | sha256 | sha384 | sha512
    cert_status: Mapped[str] = mapped_column(String(8))  # good | revoked
    der: Mapped[bytes] = mapped_column(LargeBinary)
    this_update: Mapped[datetime] = mapped_column(UTCDateTime())
    next_update: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    signer_serial: Mapped[str] = mapped_column(String(40))


class StatusFeed(Base):
    """One row whose counter rises in every transaction that changes a certificate's status.

    OCSP responders poll it (SQLite) or LISTEN for the matching NOTIFY (PostgreSQL) and drop
    their caches when it moves, which is how a revocation reaches them within a second.
    """

    __tablename__ = "status_feed"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger)


class CrlLeader(Base):
    """The lease of the one CRL writer (one row): who holds it, until when in the database's clock
    (Unix seconds), and its term, which rises at every change of holder (crl/leader.py)."""

    __tablename__ = "crl_leader"
    __table_args__ = (CheckConstraint("id = 1", name="ck_crl_leader_one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200))
    term: Mapped[int] = mapped_column(BigInteger)
    expires: Mapped[float] = mapped_column(Float)


class AuthFailure(Base):
    """Failed authentications of one key (``kind``: ``device``, ``cert``, ``address``; CSMS API:
    ``token`` by client address, ``csmscert``).

    Kept in the database, not in a worker's memory, so the limit holds across gunicorn workers
    and processes; ``locked_until`` set means locked out until then (ca/auth_limits.py).
    """

    __tablename__ = "auth_failures"

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    """One entry of the hash chain: ``hash = SHA-256(prev_hash ‖ canonical entry)``."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str | None] = mapped_column(String(256))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The single row naming the chain's last entry.

    Appending updates it first, which serialises writers on SQLite and PostgreSQL alike
    (no forks), and comparing it with the last entry detects a deleted tail.
    """

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class AuditNoise(Base):
    """Frequent events counted per actor, address, minute, action and code instead of chained one by one:
    refusals of callers that established no identity (``actor`` empty) and the fleet console's page
    views (``actor`` the admin).

    One upsert per event instead of one hash-chained entry; ``audit.flush_noise`` turns a
    minute's rows into one summary entry per actor and address and deletes them in the same transaction.
    """

    __tablename__ = "audit_noise"

    address: Mapped[str] = mapped_column(String(128), primary_key=True)
    minute: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True, index=True)
    action: Mapped[str] = mapped_column(String(64), primary_key=True)
    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128), primary_key=True, server_default="")


class AuditCheckpoint(Base):
    """A signed statement of the chain head (``ca/checkpoints.py``); also kept outside the database."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)
    hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    key_sha256: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(Text)  # base64 DER ECDSA-SHA256


class CsmsClient(Base):
    """A CSMS allowed to call the CSMS API (``chargepki csms add``), bound to one environment.

    It authenticates with a ``csms-client`` certificate whose CN is its name, or an API token.
    """

    __tablename__ = "csms_clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    environment: Mapped[str] = mapped_column(String(16))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class CsmsToken(Base):
    """An API token of a CSMS; only its SHA-256 is stored (it is 256 random bits)."""

    __tablename__ = "csms_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("csms_clients.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class CsmsSignJob(Base):
    """A signing request a CSMS made with ``?async=1``, kept until it is decided and after.

    ``claim`` names the worker that took it (``UPDATE … WHERE state = 'queued'``, or a claim
    older than the lease after a crash); only the holder of the claim may complete it, in the
    transaction that records the certificate, so a job is signed at most once.
    """

    __tablename__ = "csms_sign_jobs"
    __table_args__ = (
        Index("ix_csms_sign_jobs_state_claimed", "state", "claimed_at"),
        CheckConstraint(sql_in("state", JobState), name="ck_csms_sign_jobs_state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("csms_clients.id"), index=True)
    charging_station_id: Mapped[str] = mapped_column(String(64))
    certificate_type: Mapped[str] = mapped_column(String(32))
    csr: Mapped[str] = mapped_column(Text)
    # OCPP 2.1 SignCertificateRequest: the requestId to echo, and the root hashRootCertificate named
    request_id: Mapped[int | None] = mapped_column(Integer)
    root_id: Mapped[int | None] = mapped_column(ForeignKey("authorities.id"))
    state: Mapped[str] = mapped_column(String(16))  # a JobState
    claim: Mapped[str | None] = mapped_column(String(32))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    certificate_id: Mapped[int | None] = mapped_column(ForeignKey("certificates.id"))
    reason: Mapped[str | None] = mapped_column(String(64))  # machine-readable refusal code
    error: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Campaign(Base):
    """A fleet re-enrollment campaign: move the devices of a superseded issuing CA onto its successor.

    Progress is not counted here: it is read from the certificates the devices hold, so every
    issuance path (EST simplereenroll, the CSMS API) moves it without knowing campaigns exist.
    """

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    environment: Mapped[str] = mapped_column(String(16))
    # One campaign per superseded CA: a second one would only count the same devices again.
    from_authority_id: Mapped[int] = mapped_column(ForeignKey("authorities.id"), unique=True)
    to_authority_id: Mapped[int] = mapped_column(ForeignKey("authorities.id"))
    actor: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())

    from_authority: Mapped[Authority] = relationship(foreign_keys=[from_authority_id])
    to_authority: Mapped[Authority] = relationship(foreign_keys=[to_authority_id])


class CampaignDevice(Base):
    """A device in a campaign, with the certificate from the old CA it held when it joined."""

    __tablename__ = "campaign_devices"

    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    certificate_id: Mapped[int] = mapped_column(ForeignKey("certificates.id"))
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ConsoleLink(Base):
    """A one-time login link of the fleet console (``chargepki console login-link``): only the token's
    SHA-256 is kept; ``used_at`` is set by the one conditional UPDATE that spends it."""

    __tablename__ = "console_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ConsoleSession(Base):
    """A fleet console session opened by a login link: the cookie's random id is kept as its SHA-256."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[str] = mapped_column(String(64))
    link_id: Mapped[int] = mapped_column(ForeignKey("console_links.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
