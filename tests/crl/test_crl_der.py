"""The hand-written CRL entries (crl/der.py) against cryptography's own builder and OpenSSL.

The fast path must produce the CRL ``cryptography``'s ``CertificateRevocationListBuilder`` would:
the same TBSCertList byte for byte (only the signature differs, ECDSA and PSS being randomised),
for every key type and signature padding, and every kind of entry.
"""

from __future__ import annotations

import base64
import random
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import insert
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.authorities.issuers import Issuer, issuer_for
from ca.errors import TokenError
from ca.issuance.serials import new_serial
from ca.keys.pkcs11_token import Token
from ca.status.revocation import REASONS
from ca.store.engine import Store
from ca.store.models import Certificate
from ca.work import Work
from crl import der
from crl.builder import RevokedEntry, build_crl
from crl.publisher import _pem_crl, publish_crl, revoked_rows
from ocsp.presign import Presigner
from tests.helpers import openssl

THIS_UPDATE = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
NEXT_UPDATE = THIS_UPDATE + timedelta(days=7)
CET = timezone(timedelta(hours=1))


def reference_crl(
    issuer: Issuer,
    entries: Iterable[RevokedEntry],
    number: int = 42,
    *,
    this_update: datetime = THIS_UPDATE,
    next_update: datetime = NEXT_UPDATE,
) -> x509.CertificateRevocationList:
    """What crl/builder.py did before: one RevokedCertificate per entry through cryptography's builder."""
    revoked = []
    for entry in entries:
        extensions: list[x509.Extension[x509.ExtensionType]] = []
        if entry.reason is not None and entry.reason != "unspecified":
            reason = x509.CRLReason(REASONS[entry.reason])
            extensions.append(x509.Extension(reason.oid, False, reason))
        if entry.invalidity_date is not None:
            when = entry.invalidity_date
            invalidity = x509.InvalidityDate((when.astimezone(UTC) if when.tzinfo else when).replace(tzinfo=None))
            extensions.append(x509.Extension(invalidity.oid, False, invalidity))
        revoked.append(x509.RevokedCertificateBuilder(entry.serial, entry.revoked_at, extensions).build())
    assert issuer.certificate is not None
    ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    crl_number = x509.CRLNumber(number)
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.certificate.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=[x509.Extension(aki.oid, False, aki), x509.Extension(crl_number.oid, False, crl_number)],
        revoked_certificates=revoked,
    )
    return x509.load_der_x509_crl(issuer.sign_crl(builder))


def fast_crl(issuer: Issuer, entries: Iterable[der.Entry], number: int = 42) -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl(
        build_crl(issuer, entries, this_update=THIS_UPDATE, next_update=NEXT_UPDATE, number=number)
    )


def mixed_entries() -> list[RevokedEntry]:
    """Every reason (and none), invalidity dates, awkward serials, both sides of 2050, odd time zones."""
    when = datetime(2026, 3, 1, 8, 30, 15, 999_999, tzinfo=UTC)
    serials = [
        1,
        0x7F,
        0x80,  # high bit set: needs a leading zero octet
        0xFF,
        0x8000,
        0x123,  # odd number of hex digits
        (1 << 158) | 1,  # 159 bits: a 20-octet INTEGER, the RFC 5280 maximum
        (1 << 159) - 1,
        new_serial(),
        new_serial(),
    ]
    reasons: list[str | None] = [None, "unspecified", *REASONS]
    entries = []
    for index, serial in enumerate(serials + [new_serial() for _ in range(len(reasons))]):
        reason = reasons[index % len(reasons)]
        invalidity = when - timedelta(days=index) if index % 3 == 0 else None
        entries.append(RevokedEntry(serial, when + timedelta(hours=index), reason, invalidity))
    entries += [
        RevokedEntry(new_serial(), datetime(2049, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC), "keyCompromise"),
        RevokedEntry(new_serial(), datetime(2050, 1, 1, 0, 0, 0, tzinfo=UTC), None, datetime(2050, 1, 1, tzinfo=UTC)),
        RevokedEntry(new_serial(), datetime(2100, 2, 28, 1, 2, 3, tzinfo=UTC), "superseded"),
        RevokedEntry(new_serial(), datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), None, datetime(1950, 1, 1)),
        RevokedEntry(
            new_serial(), datetime(2026, 1, 1, 0, 30, tzinfo=CET), "cACompromise", datetime(2026, 1, 1, tzinfo=CET)
        ),
        RevokedEntry(new_serial(), datetime(2026, 6, 1, 12, 0, 0), "certificateHold"),  # naive: UTC
    ]
    return entries


def as_store_text(entries: Iterable[RevokedEntry]) -> Iterator[der.Entry]:
    """The same entries in the form the publisher reads them: hex serials, UTC time text."""

    def text(moment: datetime | None) -> str | None:
        if moment is None:
            return None
        return (moment.astimezone(UTC) if moment.tzinfo else moment).strftime("%Y-%m-%d %H:%M:%S.%f")

    for entry in entries:
        yield format(entry.serial, "X"), text(entry.revoked_at), entry.reason, text(entry.invalidity_date)  # type: ignore[misc]


def openssl_text(crl: x509.CertificateRevocationList, path: Path) -> str:
    """`openssl crl -text` without the signature value (randomised for ECDSA and PSS)."""
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    result = openssl("crl", "-inform", "DER", "-in", str(path), "-noout", "-text")
    assert result.returncode == 0, result.stderr
    return result.stdout.split("Signature Value:")[0]


# -- one hierarchy per key type and padding, on its own SQLite store ----------------------------
KEY_TYPES = [("ec-p256", "pkcs1"), ("ec-p384", "pkcs1"), ("rsa-2048", "pkcs1"), ("rsa-2048", "pss")]


@pytest.fixture(scope="module", params=KEY_TYPES, ids=[f"{k}-{p}" if k.startswith("rsa") else k for k, p in KEY_TYPES])
def issuer(request: pytest.FixtureRequest, token: Token, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    """A CA of each key type. The CRL bytes under test do not depend on the database, which only
    holds the hierarchy here, so SQLite suffices (the last test here reads rows from both databases)."""
    key_type, padding = request.param
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('crl-der') / 'chargepki.db'}")
    store.upgrade()
    with store.session() as session:
        hierarchy = init_hierarchy(
            Work(session=session, actor="test", status=Presigner(token), token=token),
            request=HierarchyRequest(organization="Acme Charging", key_type=key_type, rsa_padding=padding),
        )
        yield issuer_for(hierarchy.issuing, token)
    store.dispose()


def test_the_fast_crl_is_the_crl_cryptography_builds(issuer: Issuer, tmp_path: Path) -> None:
    entries = mixed_entries()
    reference = reference_crl(issuer, entries)
    for fast in (fast_crl(issuer, entries), fast_crl(issuer, as_store_text(entries))):
        assert fast.tbs_certlist_bytes == reference.tbs_certlist_bytes
        outer = [der.split_certificate_list(c.public_bytes(serialization.Encoding.DER))[1] for c in (fast, reference)]
        assert outer[0] == outer[1]  # the signatureAlgorithm after the TBSCertList, too
        assert fast.is_signature_valid(issuer.public_key)  # type: ignore[arg-type]
        assert len(fast) == len(entries)
        assert openssl_text(fast, tmp_path / "fast.crl") == openssl_text(reference, tmp_path / "reference.crl")


def test_openssl_verifies_the_fast_crl_and_reads_every_entry(issuer: Issuer, tmp_path: Path) -> None:
    entries = mixed_entries()
    crl = tmp_path / "fast.crl"
    crl.write_bytes(build_crl(issuer, entries, this_update=THIS_UPDATE, next_update=NEXT_UPDATE, number=7))
    assert issuer.certificate is not None
    ca = tmp_path / "ca.pem"
    ca.write_bytes(issuer.certificate.public_bytes(serialization.Encoding.PEM))
    result = openssl("crl", "-inform", "DER", "-in", str(crl), "-CAfile", str(ca), "-noout", "-verify", "-text")
    assert result.returncode == 0 and "verify OK" in result.stderr + result.stdout, result.stderr
    listed = {int(line.split(":")[1], 16) for line in result.stdout.splitlines() if "Serial Number:" in line}
    assert listed == {entry.serial for entry in entries}
    assert "Hold" in result.stdout and "Invalidity Date" in result.stdout
    assert "Dec 31 23:59:59 2049 GMT" in result.stdout and "Jan  1 00:00:00 2050 GMT" in result.stdout


def test_thousands_of_random_entries_match_cryptography_byte_for_byte(issuer: Issuer) -> None:
    if issuer.spec.name != "ec-p256":
        pytest.skip("one key type is enough for the volume test")
    rng = random.Random(4)
    now = datetime(2026, 11, 24, tzinfo=UTC)
    entries = [
        RevokedEntry(
            rng.randrange(1, 1 << 159),
            now - timedelta(seconds=rng.randrange(10**8), microseconds=rng.randrange(10**6)),
            rng.choice([None, None, "unspecified", *REASONS]),
            now - timedelta(days=rng.randrange(1, 900)) if rng.random() < 0.2 else None,
        )
        for _ in range(5000)
    ]
    assert fast_crl(issuer, entries).tbs_certlist_bytes == reference_crl(issuer, entries).tbs_certlist_bytes


def test_a_crl_without_entries_has_no_revoked_certificates_field(issuer: Issuer) -> None:
    fast = fast_crl(issuer, [])
    assert len(fast) == 0
    assert fast.tbs_certlist_bytes == reference_crl(issuer, []).tbs_certlist_bytes


def test_a_signature_that_does_not_verify_is_refused(issuer: Issuer) -> None:
    good = build_crl(issuer, mixed_entries(), this_update=THIS_UPDATE, next_update=NEXT_UPDATE, number=1)
    position = good.index(bytes.fromhex("02020080"))  # the entry with serial 0x80
    tampered = good[: position + 3] + b"\x81" + good[position + 4 :]  # still well-formed DER
    assert len(x509.load_der_x509_crl(tampered)) == len(mixed_entries())
    with pytest.raises(TokenError, match="does not verify"):
        issuer.check_crl(tampered)


def test_times_outside_1950_to_2049_are_generalized_time() -> None:
    """RFC 5280 §5.1.2.6/§4.1.2.5 (cryptography's builder cannot be asked: it panics before 1950)."""
    for moment, encoded in [
        (datetime(1949, 12, 31, 23, 59, 59), b"\x18\x0f19491231235959Z"),
        (datetime(1950, 1, 1), b"\x17\x0d500101000000Z"),
        (datetime(2049, 12, 31, 23, 59, 59, 999_999), b"\x17\x0d491231235959Z"),
        (datetime(2050, 1, 1), b"\x18\x0f20500101000000Z"),
    ]:
        revoked, count = der.revoked_certificates([(1, moment, None, None)])
        assert count == 1 and revoked == b"\x30" + bytes([len(encoded) + 5, 0x30, len(encoded) + 3, 2, 1, 1]) + encoded


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ((0, THIS_UPDATE, None, None), "positive"),
        ((-5, THIS_UPDATE, None, None), "positive"),
        ((1 << 159, THIS_UPDATE, None, None), "20 octets"),
        (("80" + "00" * 20, THIS_UPDATE, None, None), "20 octets"),
        ((1, THIS_UPDATE, "notAReason", None), "unknown revocation reason"),
        ((1, "2026-11-24", None, None), "revocation time"),
        ((1, THIS_UPDATE, None, "yesterday"), "invalidity date"),
    ],
)
def test_bad_entries_are_refused(entry: der.Entry, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        der.revoked_certificates([entry])


# -- from the store, on SQLite and PostgreSQL ----------------------------------------------------
def test_the_published_crl_is_what_cryptography_builds_from_the_same_rows(
    session: Session, hierarchy: Hierarchy, token: Token, tmp_path: Path
) -> None:
    """Rows read through the publisher's lean path (SQLite's stored text, PostgreSQL's to_char)."""
    now = datetime.now(UTC)
    entries = [
        RevokedEntry(new_serial(), now - timedelta(days=1, microseconds=1), "keyCompromise", now - timedelta(days=9)),
        RevokedEntry(new_serial(), now.replace(microsecond=999_999) - timedelta(hours=1), None),
        RevokedEntry(new_serial(), now - timedelta(minutes=5), "certificateHold"),
        RevokedEntry(0x80, now - timedelta(days=400), "unspecified", datetime(2051, 5, 6, 7, 8, 9, 123, tzinfo=UTC)),
        RevokedEntry((1 << 158) | 0xABC, datetime(2049, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "superseded"),
    ]
    table = Certificate.__table__

    def row(serial: int, revoked_at: datetime | None, status: str, not_after: datetime, **extra: object) -> dict:
        return {
            "serial": format(serial, "X"),
            "authority_id": hierarchy.issuing.id,
            "profile": "charger",
            "status": status,
            "subject": "CN=CP-1,O=Acme Charging",
            "not_before": now - timedelta(days=500),
            "not_after": not_after,
            "public_key_sha256": format(serial, "064x")[-64:],
            "revoked_at": revoked_at,
            "revocation_reason": None,
            "invalidity_date": None,
            "created_at": now,
            **extra,
        }

    rows = [
        row(
            e.serial,
            e.revoked_at,
            "revoked",
            now + timedelta(days=30),
            revocation_reason=e.reason,
            invalidity_date=e.invalidity_date,
        )
        for e in entries
    ]
    rows.append(row(new_serial(), now - timedelta(days=2), "revoked", now - timedelta(seconds=1)))  # expired
    rows.append(row(new_serial(), None, "valid", now + timedelta(days=30)))
    session.execute(insert(table), rows)
    session.commit()

    authority = hierarchy.issuing
    read = list(revoked_rows(session, authority, now))
    assert sorted(r[0] for r in read) == sorted(format(e.serial, "X") for e in entries)
    issuer = issuer_for(authority, token)
    published = publish_crl(session, issuer, authority, tmp_path, now=now)
    assert published.entries == len(entries)
    fast = x509.load_der_x509_crl(published.path.read_bytes())
    number = fast.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    by_serial = {e.serial: e for e in entries}
    in_published_order = [by_serial[e.serial_number] for e in fast]  # a CRL's entries have no required order
    reference = reference_crl(
        issuer, in_published_order, number, this_update=fast.last_update_utc, next_update=fast.next_update_utc
    )
    assert fast.tbs_certlist_bytes == reference.tbs_certlist_bytes


def test_reading_a_crls_rows_leaves_sqlite_writers_free(
    session: Session, store: Store, hierarchy: Hierarchy, db_url: str
) -> None:
    """Reading and encoding a large CRL's rows takes seconds: on SQLite they are read outside a
    write transaction, so an enrollment can commit while the publisher is in the middle of them."""
    if not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL reads lock nothing")
    now = datetime.now(UTC)
    table = Certificate.__table__
    rows = [
        {
            "serial": format(new_serial(), "X"),
            "authority_id": hierarchy.issuing.id,
            "profile": "charger",
            "status": "revoked",
            "subject": f"CN=CP-{index},O=Acme Charging",
            "not_before": now - timedelta(days=1),
            "not_after": now + timedelta(days=30),
            "public_key_sha256": format(index, "064x"),
            "revoked_at": now - timedelta(hours=1),
            "created_at": now,
        }
        for index in range(3)
    ]
    session.execute(insert(table), rows)
    session.commit()
    streaming = revoked_rows(session, hierarchy.issuing, now)
    first = next(streaming)  # the statement is open, its rows half read
    assert not session.in_transaction()
    other = sqlite3.connect(store.engine.url.database, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # SQLITE_BUSY at once if the publisher held the writer lock
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert sorted([first[0], *(row[0] for row in streaming)]) == sorted(row["serial"] for row in rows)


def test_the_crl_number_is_read_past_the_entries_without_parsing_them(issuer: Issuer, tmp_path: Path) -> None:
    # 1 and 2**63 (its INTEGER needs a leading zero octet), with entries and without.
    for number, entries in ((1, []), (2**63, mixed_entries()), (1796487194, mixed_entries())):
        crl = build_crl(issuer, entries, this_update=THIS_UPDATE, next_update=NEXT_UPDATE, number=number)
        assert der.crl_number(crl) == number
        assert der.crl_number(memoryview(crl)) == number
    assert issuer.certificate is not None
    numberless = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.certificate.subject, last_update=THIS_UPDATE, next_update=NEXT_UPDATE
    )
    assert der.crl_number(issuer.sign_crl(numberless)) is None


@pytest.mark.parametrize("cut", [0, 1, 2, 10, 200, -40, -1])
def test_a_truncated_or_foreign_file_has_no_crl_number(issuer: Issuer, cut: int) -> None:
    crl = build_crl(issuer, mixed_entries(), this_update=THIS_UPDATE, next_update=NEXT_UPDATE, number=9)
    with pytest.raises(ValueError):
        der.crl_number(crl[:cut])
    with pytest.raises(ValueError):
        der.crl_number(b"\x02\x01\x05")  # an INTEGER, not a CertificateList


@pytest.mark.parametrize("size", [1, 47, 48, 49, 49151, 49152, 49153, 200_003])
def test_the_pem_copy_has_64_character_lines_at_every_length(size: int) -> None:
    data = random.Random(size).randbytes(size)  # 49,152 octets are exactly one block of 1,024 lines
    body = base64.b64encode(data)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    expected = b"\n".join([b"-----BEGIN X509 CRL-----", *lines, b"-----END X509 CRL-----", b""])
    assert _pem_crl(data) == expected


def test_openssl_reads_the_pem_copy_of_a_published_crl(issuer: Issuer, tmp_path: Path) -> None:
    crl = build_crl(issuer, mixed_entries(), this_update=THIS_UPDATE, next_update=NEXT_UPDATE, number=3)
    (tmp_path / "crl.pem").write_bytes(_pem_crl(crl))
    result = openssl("crl", "-in", str(tmp_path / "crl.pem"), "-outform", "DER", "-out", str(tmp_path / "back.der"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back.der").read_bytes() == crl
