"""Issuance: what the CA refuses, and how a certificate reaches the store before anyone sees it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from freezegun import freeze_time
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import Issuer, issuer_for
from ca.errors import ConflictError, InputError, PolicyError, StoreError, TokenError
from ca.issuance.csr import read_csr
from ca.issuance.flow import (
    IssueRequest,
    Validity,
    abandon_stale_pending,
    build_certificate,
    issue,
    request_from_csr,
)
from ca.issuance.profiles import get_profile
from ca.issuance.serials import format_serial, new_serial, parse_serial
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device
from ca.status.certificates import display_status, list_certificates
from ca.store.engine import Store
from ca.store.models import AuditEvent, Certificate, Device
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr, make_key


@pytest.fixture
def issuer(hierarchy: Hierarchy, token: Token) -> Issuer:
    return issuer_for(hierarchy.issuing, token)


def _issue(session: Session, issuer: Issuer, csr: bytes, profile: str = "charger", **kwargs) -> Certificate:
    status = Presigner(issuer.private_key.token)
    request = request_from_csr(get_profile(profile), read_csr(csr), issuer, **kwargs)
    return issue(Work(session, "test", status=status), issuer=issuer, request=request)


# -- refusals --------------------------------------------------------------------------------------
def test_a_csr_with_a_bad_signature_is_refused() -> None:
    der = x509.load_pem_x509_csr(make_csr()).public_bytes(serialization.Encoding.DER)
    tampered = der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]  # flip a bit inside the signature
    with pytest.raises(PolicyError, match="CSR signature is invalid"):
        read_csr(tampered)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "empty"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n",
            "malformed CSR",
        ),
        (b"\x30\x82\x01\x00garbage", "malformed CSR"),
        (b"hello world", "malformed CSR"),
        (b"A" * 20000, "larger than"),
    ],
)
def test_malformed_pem_and_der_are_refused_with_a_reason(blob: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_csr(blob)


@pytest.mark.parametrize("kind", ["ec-p521", "rsa-1024"])
def test_forbidden_key_types_and_sizes_are_refused(session: Session, issuer: Issuer, kind: str) -> None:
    with pytest.raises(PolicyError, match=f"key type {kind} is not allowed for profile charger"):
        _issue(session, issuer, make_csr(key=make_key(kind)))


def test_ed25519_keys_are_refused(session: Session, issuer: Issuer) -> None:
    with pytest.raises(PolicyError, match="key type ed25519 is not allowed"):
        _issue(session, issuer, make_csr(key=ed25519.Ed25519PrivateKey.generate()))


def test_over_long_validity_is_refused(session: Session, issuer: Issuer) -> None:
    with pytest.raises(PolicyError, match="exceeds the maximum of 1825 days for profile charger"):
        _issue(session, issuer, make_csr(), validity=timedelta(days=1826))


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(InputError, match="unknown profile 'webserver'"):
        get_profile("webserver")


@pytest.mark.parametrize("profile", ["root", "issuing-ca"])
def test_ca_profiles_are_not_issued_from_csrs(session: Session, issuer: Issuer, profile: str) -> None:
    with pytest.raises(PolicyError, match="not issued from a CSR"):
        _issue(session, issuer, make_csr(), profile=profile)


def test_organisation_must_be_the_cas(session: Session, issuer: Issuer) -> None:
    with pytest.raises(PolicyError, match="O 'Evil Corp' is not the CA's organisation"):
        _issue(session, issuer, make_csr(organization="Evil Corp"))


@pytest.mark.parametrize("cn", ["https://cp.example.com/ocpp", "10.0.0.7", "CP 0001", "x" * 49])
def test_charger_cn_must_be_a_station_identity(session: Session, issuer: Issuer, cn: str) -> None:
    with pytest.raises(PolicyError, match="charging station identity"):
        _issue(session, issuer, make_csr(common_name=cn))


def test_csms_server_names_must_be_hostnames(session: Session, issuer: Issuer) -> None:
    with pytest.raises(PolicyError, match="not a DNS host name"):
        _issue(
            session,
            issuer,
            make_csr(common_name="csms.example.com", dns_names=("bad_name!",)),
            profile="csms-server",
        )


def test_refusals_leave_no_trace_in_the_certificate_table(session: Session, issuer: Issuer) -> None:
    before = session.scalar(select(func.count()).select_from(Certificate))
    with pytest.raises(PolicyError):
        _issue(session, issuer, make_csr(key=make_key("rsa-1024")))
    assert session.scalar(select(func.count()).select_from(Certificate)) == before


# -- serials ---------------------------------------------------------------------------------------
def test_serials_are_positive_random_and_at_most_20_octets() -> None:
    serials = {new_serial() for _ in range(2000)}
    assert len(serials) == 2000
    assert all(0 < s < 2**159 for s in serials)
    assert max(s.bit_length() for s in serials) > 150, "the high bits are random too"
    assert all((s.bit_length() + 8) // 8 <= 20 for s in serials), "DER INTEGER content fits 20 octets"


@pytest.mark.parametrize("serial", [0, -1, 2**159])
def test_a_serial_outside_rfc_5280s_bounds_is_never_built_into_a_certificate(issuer: Issuer, serial: int) -> None:
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="serial number"):
        build_certificate(
            get_profile("charger"), issuer, x509.Name([]), make_key().public_key(), serial, Validity(now, now)
        )


def test_a_validity_ending_before_it_starts_is_never_built_into_a_certificate(issuer: Issuer) -> None:
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="validity"):
        build_certificate(
            get_profile("charger"), issuer, x509.Name([]), make_key().public_key(), 1, Validity(now, now - timedelta(1))
        )


def test_certificates_of_one_profile_under_two_cas_name_each_their_own_ca(
    session: Session, hierarchy: Hierarchy, issuer: Issuer, token: Token
) -> None:
    """The extensions kept per profile and CA (AKI, AIA, CRL DP) never cross from one CA to another."""
    root = issuer_for(hierarchy.root, token)
    now = datetime.now(UTC)
    for ca in (issuer, root, issuer):
        builder = build_certificate(
            get_profile("charger"), ca, x509.Name([]), make_key().public_key(), 1, Validity(now, now)
        )
        certificate = ca.sign(builder)
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert ca.certificate is not None
        expected = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        assert aki.key_identifier == expected and certificate.issuer == ca.certificate.subject
        points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert points[0].full_name[0].value == ca.crl_url()


def test_serial_text_is_hex_without_leading_zeros() -> None:
    assert format_serial(0x0ABC) == "ABC"
    assert parse_serial("0x00:ab:cd") == "ABCD"
    with pytest.raises(InputError):
        parse_serial("not-hex")
    with pytest.raises(InputError):
        parse_serial("1" * 41)


def test_the_database_refuses_a_reused_serial(session: Session, issuer: Issuer) -> None:
    row = _issue(session, issuer, make_csr())
    clone = Certificate(
        serial=row.serial,
        authority_id=row.authority_id,
        profile="charger",
        status="pending",
        subject="CN=x",
        not_before=row.not_before,
        not_after=row.not_after,
        public_key_sha256="0" * 64,
        created_at=datetime.now(UTC),
    )
    session.add(clone)
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


def test_a_serial_collision_draws_again_and_keeps_the_callers_work(
    session: Session, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = _issue(session, issuer, make_csr())
    draws = iter([int(taken.serial, 16), 0x1234ABCD])
    monkeypatch.setattr("ca.issuance.flow.new_serial", lambda: next(draws))
    audit.record(session, "test.pending", actor="test")  # the caller's uncommitted work (as a consumed secret)
    row = _issue(session, issuer, make_csr())
    assert row.serial == "1234ABCD"
    assert session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "test.pending")) == 1
    assert session.scalar(select(func.count()).where(Certificate.serial == taken.serial)) == 1
    assert audit.verify(session).ok


# -- recording ---------------------------------------------------------------------------------------
def test_the_certificate_is_committed_and_audited_before_it_is_returned(store: Store, issuer: Issuer) -> None:
    with store.session() as session:
        row = _issue(session, issuer, make_csr(common_name="CP-0042"))
    with store.session() as other:  # a different connection sees it: it was committed
        stored = other.scalar(select(Certificate).where(Certificate.serial == row.serial))
        assert stored is not None and stored.status == "valid" and stored.der == row.der
        issued = x509.load_der_x509_certificate(stored.der)
        assert format_serial(issued.serial_number) == row.serial
        event = other.scalar(select(AuditEvent).where(AuditEvent.subject == row.serial))
        assert event is not None and event.action == "certificate.issued"


def test_a_signing_failure_burns_the_serial_and_hands_out_nothing(
    session: Session, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_sign(*_args, **_kwargs):
        raise TokenError("token 'x' became unavailable: DeviceRemoved")

    monkeypatch.setattr(type(issuer.private_key), "sign", broken_sign)
    with pytest.raises(TokenError, match="became unavailable"):
        _issue(session, issuer, make_csr())
    aborted = session.scalars(select(Certificate).where(Certificate.status == "aborted")).all()
    assert len(aborted) == 1 and aborted[0].der is None
    event = session.scalar(select(AuditEvent).where(AuditEvent.subject == aborted[0].serial))
    assert event is not None and event.action == "certificate.aborted" and "DeviceRemoved" in event.details
    assert audit.verify(session).ok


def test_validity_never_outlives_the_issuer(session: Session, issuer: Issuer, hierarchy: Hierarchy) -> None:
    issuing_end = hierarchy.issuing.not_after
    with freeze_time(issuing_end - timedelta(days=30)):
        row = _issue(session, issuer, make_csr())
    assert row.not_after == issuing_end


def test_an_expired_issuer_issues_nothing(session: Session, issuer: Issuer, hierarchy: Hierarchy) -> None:
    with (
        freeze_time(hierarchy.issuing.not_after + timedelta(days=1)),
        pytest.raises(PolicyError, match="expired"),
    ):
        _issue(session, issuer, make_csr())


def test_the_ca_decides_the_subject_and_ignores_csr_extras(session: Session, issuer: Issuer) -> None:
    row = _issue(session, issuer, make_csr(common_name="CP-7", dns_names=("evil.example.com",)))
    certificate = x509.load_der_x509_certificate(row.der or b"")
    assert certificate.subject.rfc4514_string() == "CN=CP-7,O=Acme Charging,C=DE"
    with pytest.raises(x509.ExtensionNotFound):
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)


# -- listings ------------------------------------------------------------------------------------------
def test_expiry_listing_follows_the_clock(session: Session, issuer: Issuer, hierarchy: Hierarchy) -> None:
    """A 20-day charger certificate is listed as expiring within 30 days, a 400-day one is not, and
    "expired" follows the clock. The moment is taken from the issuing CA (a week into its life), not
    from the calendar: the fixture's CAs and OCSP signers are made at the real date, so a fixed date
    would drift in and out of their validity as the years pass."""
    start = hierarchy.issuing.not_before + timedelta(days=7)
    with freeze_time(start):
        short = _issue(session, issuer, make_csr(common_name="CP-S"), validity=timedelta(days=20))
        long = _issue(session, issuer, make_csr(common_name="CP-L"), validity=timedelta(days=400))
    # The fixture's delegated OCSP signers (30-day certificates) expire in this window too; the
    # statement is about the charger certificates issued here.
    soon = list_certificates(session, start, expiring_within=timedelta(days=30), profile="charger")
    assert [c.serial for c in soon] == [short.serial]
    later = start + timedelta(days=25)
    assert display_status(short, later) == "expired"
    assert display_status(long, later) == "valid"
    assert short.serial in [c.serial for c in list_certificates(session, later, status="expired")]
    assert short.serial not in [c.serial for c in list_certificates(session, later, status="valid")]


def test_stale_reservations_are_swept_and_a_swept_one_is_never_recorded(
    store: Store, session: Session, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed between reserving and recording leaves a ``pending`` row; the sweep marks it
    ``aborted`` once it is older than any live issuance. Were that issuance alive after all, it
    could not record its certificate afterwards: it fails and hands out nothing."""
    later = datetime.now(UTC) + timedelta(hours=1)
    original = type(issuer.private_key).sign
    swept: list[str] = []

    def slow_sign(key, *args, **kwargs):  # type: ignore[no-untyped-def]
        with store.session() as other:
            assert abandon_stale_pending(other, actor="system:test") == []  # too recent to be abandoned
            swept.extend(abandon_stale_pending(other, actor="system:test", now=lambda: later))
        return original(key, *args, **kwargs)

    monkeypatch.setattr(type(issuer.private_key), "sign", slow_sign)
    with pytest.raises(StoreError, match="abandoned before it could be recorded"):
        _issue(session, issuer, make_csr())
    monkeypatch.undo()
    (row,) = session.scalars(select(Certificate).where(Certificate.profile == "charger")).all()
    assert swept == [row.serial] and row.status == "aborted" and row.der is None
    event = session.scalar(select(AuditEvent).where(AuditEvent.subject == row.serial))
    assert event is not None and event.action == "certificate.aborted" and "still pending" in event.details
    assert audit.verify(session).ok
    session.commit()


def test_a_key_belongs_to_its_first_identity(session: Session, issuer: Issuer, token: Token, status: Presigner) -> None:
    """One key, one identity (``key_owners``): the same device may certify its key again; another
    device, an SECC ID or a certificate issued from the CLI for another name may not."""
    first, second = (add_device(Work(session, "test"), serial=serial) for serial in ("CP-K1", "CP-K2"))
    key = make_key().public_key()
    charger = get_profile("charger")
    for _ in range(2):  # a renewal with the same key
        issue(
            Work(session, "t", status=status),
            issuer=issuer,
            request=IssueRequest(charger, key, "CP-K1", device_id=first.id),
        )
    refused = [
        IssueRequest(charger, key, "CP-K2", device_id=second.id),
        IssueRequest(get_profile("ra"), key, "station-1"),
        IssueRequest(charger, key, "CP-K1"),  # the CLI, without the device: another identity
    ]
    for request in refused:
        with pytest.raises(ConflictError, match="already certified for another identity") as caught:
            issue(Work(session, "t", status=status), issuer=issuer, request=request)
        assert caught.value.code == "key_reuse"
        session.rollback()
    rows = session.scalars(select(Certificate.common_name).where(Certificate.status != "valid")).all()
    assert rows == [], "a refused claim reserves no serial"


# -- units of work -----------------------------------------------------------------------------------
def test_issue_refuses_a_session_with_pending_changes_and_commits_none_of_them(
    session: Session, issuer: Issuer
) -> None:
    """issue() commits its own transactions; it never carries the caller's unfinished work along."""
    session.add(Device(serial="CP-PENDING", environment="production", enabled=True, created_at=datetime.now(UTC)))
    with pytest.raises(RuntimeError, match="commits its own transactions"):
        _issue(session, issuer, make_csr("CP-U1"))
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Certificate).where(Certificate.common_name == "CP-U1")) == 0
    assert session.scalar(select(func.count()).select_from(Device).where(Device.serial == "CP-PENDING")) == 0


def test_what_commits_with_the_reservation_is_said_and_a_refusal_there_takes_no_serial(
    session: Session, issuer: Issuer
) -> None:
    seen: list[bool] = []

    def refuse(reserving: Session) -> None:
        seen.append(reserving is session)
        raise PolicyError("refused in the reservation")

    request = request_from_csr(get_profile("charger"), read_csr(make_csr("CP-U2")), issuer)
    status = Presigner(issuer.private_key.token)
    before = session.scalar(select(func.count()).select_from(Certificate))
    with pytest.raises(PolicyError, match="refused in the reservation"):
        issue(Work(session, "test", status=status), issuer=issuer, request=request, with_reservation=refuse)
    assert seen == [True]
    assert session.scalar(select(func.count()).select_from(Certificate)) == before, "no pending row, no serial"
    session.commit()
