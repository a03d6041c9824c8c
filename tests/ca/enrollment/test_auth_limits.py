"""Rate limiting of failed EST authentications in the core (ca/auth_limits.py through ca/enrollment.py).

A controllable clock drives windows and lockouts (no waiting); SQLite and PostgreSQL.
The end-to-end test over HTTPS with several workers and two server processes is in
tests/e2e/test_est_limits.py.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import default_issuing_ca, issuer_for
from ca.enrollment.auth_limits import AuthLimits
from ca.enrollment.pipeline import Credentials, EnrollmentSettings, enroll, reenroll
from ca.errors import AuthenticationError, InputError, RateLimitedError
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device
from ca.registry.secrets import issue_secret
from ca.store.models import AuditEvent, AuthFailure, Certificate
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr, make_key

LIMITS = AuthLimits(
    max_failures_per_device=3, max_failures_per_address=6, window=timedelta(minutes=10), lockout=timedelta(minutes=5)
)


class Clock:
    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.at

    def advance(self, **kwargs: float) -> None:
        self.at += timedelta(**kwargs)


class Station:
    """Enrollment attempts against the core with one clock and one set of limits."""

    def __init__(self, session: Session, hierarchy: Hierarchy, token: Token, limits: AuthLimits = LIMITS) -> None:
        self.session, self.hierarchy, self.token = session, hierarchy, token
        self.status = Presigner(token)
        self.clock = Clock()
        self.settings = EnrollmentSettings(limits=limits)

    def device(self, serial: str) -> str:
        device = add_device(Work(self.session, "test"), serial=serial)
        return issue_secret(Work(self.session, "test"), device=device)

    def attempt(self, serial: str, password: str | None, address: str = "192.0.2.1", csr: bytes | None = None):  # type: ignore[no-untyped-def]
        name = serial if len(serial) <= 64 and serial.isprintable() else "CP-HOSTILE"
        der = (
            csr if csr is not None else x509.load_pem_x509_csr(make_csr(name)).public_bytes(serialization.Encoding.DER)
        )
        return enroll(
            Work(
                self.session,
                "test",
                status=self.status,
                issuers=lambda authority: issuer_for(authority, self.token),
                now=self.clock,
            ),
            authority=self.hierarchy.issuing,
            csr=der,
            credentials=Credentials(
                username=serial if password is not None else None, password=password, address=address
            ),
            settings=self.settings,
        )

    def with_certificate(self, certificate: bytes, csr_name: str, *, renew: bool, address: str = "192.0.2.1"):  # type: ignore[no-untyped-def]
        """Enrollment (RA) or re-enrollment (charger) authenticated by a client certificate alone."""
        der = x509.load_pem_x509_csr(make_csr(csr_name)).public_bytes(serialization.Encoding.DER)
        return (reenroll if renew else enroll)(
            Work(
                self.session,
                "test",
                status=self.status,
                issuers=lambda authority: issuer_for(authority, self.token),
                now=self.clock,
            ),
            authority=self.hierarchy.issuing,
            csr=der,
            credentials=Credentials(client_certificate=certificate, address=address),
            settings=self.settings,
        )

    def ra(self, name: str) -> bytes:
        authority = default_issuing_ca(self.session, "production")
        row = issue(
            Work(self.session, "test", status=self.status, now=self.clock),
            issuer=issuer_for(authority, self.token),
            request=IssueRequest(get_profile("ra"), make_key().public_key(), name),
        )
        return row.der

    def fail(self, serial: str, times: int, address: str = "192.0.2.1") -> None:
        for _ in range(times):
            with pytest.raises(AuthenticationError):
                self.attempt(serial, "wrong-" + serial, address)

    def lockouts(self) -> list[dict]:
        events = self.session.scalars(select(AuditEvent).where(AuditEvent.action == "auth.locked_out")).all()
        self.session.commit()
        return [json.loads(event.details) | {"subject": event.subject} for event in events]


@pytest.fixture
def station(session: Session, hierarchy: Hierarchy, token: Token) -> Station:
    return Station(session, hierarchy, token)


def test_a_device_is_locked_out_after_its_failures_even_with_the_right_secret_and_that_is_audited(
    station: Station,
) -> None:
    secret = station.device("CP-LOCK")
    station.fail("CP-LOCK", 3)
    with pytest.raises(RateLimitedError) as locked:
        station.attempt("CP-LOCK", secret)
    assert locked.value.retry_after == 300
    (event,) = station.lockouts()
    assert event["subject"] == "CP-LOCK" and event["device"] == "CP-LOCK" and event["address"] == "192.0.2.1"
    assert event["locked"] == "device" and "3 failed authentications within 600 s" in event["reason"]
    assert secret not in json.dumps(event) and "wrong-CP-LOCK" not in json.dumps(event)


def test_a_lockout_ends_by_itself(station: Station) -> None:
    secret = station.device("CP-EXPIRE")
    station.fail("CP-EXPIRE", 3)
    station.clock.advance(minutes=4, seconds=59)
    with pytest.raises(RateLimitedError) as locked:
        station.attempt("CP-EXPIRE", secret)
    assert locked.value.retry_after == 1
    station.clock.advance(seconds=1)
    assert station.attempt("CP-EXPIRE", secret).status == "valid"


def test_success_clears_only_the_devices_own_count(station: Station) -> None:
    secret_a, secret_b = station.device("CP-A"), station.device("CP-B")
    station.fail("CP-A", 2, address="192.0.2.10")
    station.fail("CP-B", 2, address="192.0.2.11")
    assert station.attempt("CP-B", secret_b, address="192.0.2.11").status == "valid"
    station.fail("CP-A", 1, address="192.0.2.10")  # A's count survived B's success: its third failure
    with pytest.raises(RateLimitedError):
        station.attempt("CP-A", secret_a, address="192.0.2.10")
    station.fail("CP-B", 2, address="192.0.2.11")  # B starts from zero again: two failures do not lock it
    assert [event["device"] for event in station.lockouts()] == ["CP-A"]


def test_failures_outside_the_window_do_not_add_up(station: Station) -> None:
    secret = station.device("CP-WINDOW")
    station.fail("CP-WINDOW", 2)
    station.clock.advance(minutes=11)
    station.fail("CP-WINDOW", 2)
    assert station.attempt("CP-WINDOW", secret).status == "valid"
    assert station.lockouts() == []


def test_an_address_is_locked_out_across_devices_and_other_addresses_are_not(station: Station) -> None:
    secret = station.device("CP-GOOD")
    for index in range(6):
        station.fail(f"CP-GUESS-{index}", 1, address="198.51.100.7")
    with pytest.raises(RateLimitedError):
        station.attempt("CP-GOOD", secret, address="198.51.100.7")
    assert station.attempt("CP-GOOD", secret, address="198.51.100.8").status == "valid"
    (event,) = station.lockouts()
    assert event["locked"] == "address" and event["address"] == "198.51.100.7"


def test_only_failed_authentications_count(station: Station) -> None:
    secret = station.device("CP-COUNT")
    garbage = b"\x30\x03\x02\x01\x00"
    for _ in range(5):
        with pytest.raises(AuthenticationError):  # no credentials: the first leg of HTTP authentication
            station.attempt("CP-COUNT", None)
        with pytest.raises(InputError):  # the right secret, a broken CSR: not an authentication failure
            station.attempt("CP-COUNT", secret, csr=garbage)
    assert station.session.scalar(select(func.count()).select_from(AuthFailure)) == 0
    station.session.commit()
    assert station.attempt("CP-COUNT", secret).status == "valid"


def test_hostile_user_names_are_counted_under_a_bounded_key(station: Station) -> None:
    for index, name in enumerate(("x" * 5000, "CP-\x00-NUL", "ÄÖÜ")):
        station.fail(name, 3, address=f"192.0.2.{20 + index}")
        with pytest.raises(RateLimitedError):
            station.attempt(name, "anything", address=f"192.0.2.{20 + index}")
    keys = station.session.scalars(select(AuthFailure.key).where(AuthFailure.kind == "device")).all()
    station.session.commit()
    assert all(len(key) <= 128 and "\x00" not in key for key in keys)


def test_a_limit_of_zero_switches_it_off(session: Session, hierarchy: Hierarchy, token: Token) -> None:
    station = Station(session, hierarchy, token, AuthLimits(max_failures_per_device=0, max_failures_per_address=0))
    secret = station.device("CP-OFF")
    station.fail("CP-OFF", 10)
    assert station.attempt("CP-OFF", secret).status == "valid"


def test_behind_a_trusted_proxy_the_forwarded_address_is_counted(tmp_path, db_url: str, token_settings) -> None:
    """One proxy must not be one address for everybody; from anyone else the header is ignored."""
    from ca.config import EstSettings
    from tests.hostile import basic, build_world, est_client

    settings = EstSettings(trusted_proxies=("10.0.0.5",), auth_max_failures_per_address=2)
    world = build_world(tmp_path / "home", db_url, token_settings[0], settings)
    try:
        client = est_client(world)
        body = x509.load_pem_x509_csr(make_csr("CP-FUZZ-1")).public_bytes(serialization.Encoding.DER)

        def post(peer: str, forwarded: str) -> int:
            return client.post(
                "/.well-known/est/simpleenroll",
                data=base64.encodebytes(body),
                headers={
                    "Content-Type": "application/pkcs10",
                    "Authorization": basic("CP-GUESS", "wrong"),
                    "X-Forwarded-For": forwarded,
                },
                environ_base={"REMOTE_ADDR": peer},
            ).status_code

        assert [post("10.0.0.5", "203.0.113.1, 198.51.100.9") for _ in range(3)] == [401, 401, 429]
        assert post("10.0.0.5", "198.51.100.10") == 401, "another client behind the same proxy"
        assert post("192.0.2.77", "198.51.100.10") == 401, "an untrusted peer's header is not believed"
        with world.pki.store.session() as session:
            keys = set(session.scalars(select(AuthFailure.key).where(AuthFailure.kind == "address")))
            session.commit()
        assert keys == {"198.51.100.9", "198.51.100.10", "192.0.2.77"}
    finally:
        world.close()


# -- one key space per authentication method -------------------------------------------------------------
def test_basic_guesses_with_an_ras_name_never_lock_out_the_ra_certificate(station: Station) -> None:
    """Guessing passwords for the RA's name, from the RA's own address, until name and address are locked."""
    ra = station.ra("Station-7")
    station.device("CP-BY-RA")  # registered; the RA enrolls it without its secret
    station.fail("Station-7", 3, address="192.0.2.50")
    station.fail("CP-OTHER-1", 3, address="192.0.2.50")
    with pytest.raises(RateLimitedError):
        station.attempt("Station-7", "another-guess", address="192.0.2.50")
    assert {event["locked"] for event in station.lockouts()} == {"device", "address"}
    assert station.with_certificate(ra, "CP-BY-RA", renew=False, address="192.0.2.50").status == "valid"


def test_basic_guesses_with_a_serial_never_lock_out_that_chargers_certificate(station: Station) -> None:
    secret = station.device("CP-VICTIM")
    current = station.attempt("CP-VICTIM", secret, address="192.0.2.60")
    station.fail("CP-VICTIM", 3, address="192.0.2.60")
    station.fail("CP-OTHER-2", 3, address="192.0.2.60")  # the serial and the address are both locked out now
    with pytest.raises(RateLimitedError):
        station.attempt("CP-VICTIM", "guess", address="192.0.2.60")
    renewed = station.with_certificate(current.der, "CP-VICTIM", renew=True, address="192.0.2.60")
    assert renewed.status == "valid"
    kinds = set(station.session.scalars(select(AuthFailure.kind)).all())
    station.session.commit()
    assert kinds == {"device", "address"}, "no certificate was ever counted"


def test_certificate_failures_lock_out_that_certificate_only(station: Station) -> None:
    """A revoked certificate is counted under its own SHA-256: not its CN, not the Basic name, not the address."""
    secret = station.device("CP-RENEWED")
    first = station.attempt("CP-RENEWED", secret)
    second = station.with_certificate(first.der, "CP-RENEWED", renew=True)  # supersedes (revokes) the first
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            station.with_certificate(first.der, "CP-RENEWED", renew=True)
    with pytest.raises(RateLimitedError):
        station.with_certificate(first.der, "CP-RENEWED", renew=True)
    (event,) = station.lockouts()
    assert (event["locked"], event["device"], event["subject"]) == ("cert", "CP-RENEWED", "CP-RENEWED")
    assert station.with_certificate(second.der, "CP-RENEWED", renew=True).status == "valid"
    other = station.device("CP-NEIGHBOUR")
    assert station.attempt("CP-NEIGHBOUR", other).status == "valid", "the address was not counted"
    keys = station.session.execute(select(AuthFailure.kind, AuthFailure.key)).all()
    fingerprint = station.session.scalar(select(Certificate.fingerprint_sha256).where(Certificate.id == first.id))
    station.session.commit()
    assert [tuple(key) for key in keys] == [("cert", fingerprint)]
