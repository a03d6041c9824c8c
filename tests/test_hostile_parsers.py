"""Hostile input for the parsers at the edge, called directly (hypothesis).

Random bytes and mutations of valid inputs (bit flips, truncation, extension, "interesting"
length octets, CSRs damaged inside and signed again) must give either a result or the
module's own refusal (``ChargepkiError``, ``MalformedRequest``) with a one-line message:
never another exception, never a hang. The CSV import runs on SQLite and PostgreSQL and must
register exactly the rows it accepts.
"""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy import func, select

from ca.errors import ChargepkiError
from ca.issuance.csr import CsrRequest, read_csr
from ca.registry.devices import import_devices
from ca.store.engine import Store
from ca.store.models import AuditEvent, Device
from ca.work import Work
from ocsp.certid import CertId
from ocsp.requests import MalformedRequest, decode_get_path, parse_request
from tests.hostile import Drawn, bounded, est_body, make_seeds, mutate_bytes, one_line_error, resigned_csr
from web.caller import decode_client_cert_header
from web.est import decode_pkcs10

SEEDS = make_seeds()


def refused_cleanly(exc: Exception) -> None:
    one_line_error(str(exc) or "?", type(exc).__name__)


def csr_outcome(data: bytes) -> CsrRequest | None:
    with bounded(5):
        try:
            return read_csr(data)
        except ChargepkiError as exc:
            refused_cleanly(exc)
            return None


# -- PKCS#10 ----------------------------------------------------------------------------------------------
@given(st.binary(max_size=4096))
@example(b"")
@example(b"-----BEGIN CERTIFICATE REQUEST-----\n")
@example(b"\x30\x84\xff\xff\xff\xff")
def test_random_bytes_are_refused_as_csr(data: bytes) -> None:
    assert csr_outcome(data) is None


@given(st.data())
def test_mutated_csrs_parse_or_are_refused(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from([SEEDS.csr_der, SEEDS.csr_pem]))
    csr_outcome(mutate_bytes(seed, Drawn(data)))


@given(st.data())
def test_csrs_damaged_inside_and_signed_again_parse_or_are_refused(data: st.DataObject) -> None:
    """The signature holds, so the damage reaches the subject, attribute and extension parsers."""
    csr_outcome(resigned_csr(SEEDS, Drawn(data)))


# -- EST framing (web/est.py) -------------------------------------------------------------------------------
@given(st.data(), st.sampled_from(["application/pkcs10", "application/pkcs10", "text/plain", "", "application/x"]))
def test_est_bodies_decode_or_are_refused(data: st.DataObject, mimetype: str) -> None:
    body = est_body(SEEDS, Drawn(data))
    with bounded(5):
        try:
            der = decode_pkcs10(mimetype, body)
        except ChargepkiError as exc:
            refused_cleanly(exc)
            return
    csr_outcome(der)


@given(st.one_of(st.text(max_size=3000), st.builds(lambda b: quote(b.decode("latin-1")), st.binary(max_size=2000))))
@example("-----BEGIN CERTIFICATE-----%0A%0A-----END CERTIFICATE-----")
def test_proxy_client_certificate_headers_decode_or_are_refused(value: str) -> None:
    with bounded(5):
        try:
            decode_client_cert_header(value, "X-SSL-Client-Cert")
        except ChargepkiError as exc:
            refused_cleanly(exc)


# -- OCSP requests -------------------------------------------------------------------------------------------
def _ocsp_seeds() -> list[bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fuzz CA")])
    now = datetime.now(UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    seeds = [
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(b"\x01" * size, b"\x02" * size, serial, algorithm)
        .build()
        .public_bytes(serialization.Encoding.DER)
        for size, algorithm, serial in ((20, hashes.SHA1(), 12345), (32, hashes.SHA256(), 2**158 + 7))
    ]
    seeds.append(
        ocsp.OCSPRequestBuilder()
        .add_certificate(ca_cert, ca_cert, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    return seeds


OCSP_SEEDS = _ocsp_seeds()


def ocsp_outcome(der: bytes) -> list[CertId] | None:
    with bounded(5):
        try:
            cert_ids = parse_request(der)
        except MalformedRequest as exc:
            refused_cleanly(exc)
            return None
    assert cert_ids and all(cert_id.serial_number > 0 for cert_id in cert_ids)
    return cert_ids


@given(st.binary(max_size=4096))
@example(b"\x30\x80\x00\x00")
def test_random_bytes_are_malformed_ocsp_requests(data: bytes) -> None:
    ocsp_outcome(data)


@given(st.data())
def test_mutated_ocsp_requests_parse_or_are_malformed(data: st.DataObject) -> None:
    ocsp_outcome(mutate_bytes(data.draw(st.sampled_from(OCSP_SEEDS)), Drawn(data)))


def _get_paths() -> st.SearchStrategy[str]:
    """GET paths as a server hands them over: base64 (either alphabet), damaged, percent-encoded or not."""
    encoded = st.builds(
        lambda seed, urlsafe, strip: (
            (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(seed).decode().rstrip("=" if strip else "")
        ),
        st.sampled_from(OCSP_SEEDS),
        st.booleans(),
        st.booleans(),
    )
    damaged = st.builds(
        lambda text, junk, at: text[:at] + junk + text[at:], encoded, st.text(max_size=8), st.integers(0, 200)
    )
    return st.one_of(
        st.text(max_size=2000),
        encoded,
        damaged,
        st.builds(lambda text: quote(text, safe=""), st.one_of(encoded, damaged)),
        st.builds(lambda b: b.decode("latin-1"), st.binary(max_size=2000)),
    )


@given(_get_paths())
@example("%")
@example("%%%%")
@example("=" * 40000)
def test_get_paths_decode_or_are_malformed(path: str) -> None:
    with bounded(5):
        try:
            der = decode_get_path(path)
        except MalformedRequest as exc:
            refused_cleanly(exc)
            return
    ocsp_outcome(der)


# -- CSV device import ---------------------------------------------------------------------------------------
def _csv_texts() -> st.SearchStrategy[str]:
    cell = st.one_of(
        st.sampled_from(["CP-1", "CP-2", "production", "staging", "factory-test", "", " ", '"', ",", "\n"]),
        st.text(max_size=80),
    )
    header = st.lists(st.sampled_from(["serial", "Serial ", "model", "environment", "x", ""]), min_size=1, max_size=4)
    rows = st.lists(st.lists(cell, max_size=5), max_size=20)
    structured = st.builds(
        lambda h, r, sep: sep.join(",".join(row) for row in [h, *r]), header, rows, st.sampled_from(["\n", "\r\n"])
    )
    return st.one_of(structured, st.text(max_size=1000), st.builds(lambda t: mutate_text(t), structured))


def mutate_text(value: str) -> str:
    return value.replace(",", '"', 1).replace("\n", "\x00", 1)


@pytest.fixture
def device_store(store: Store) -> Store:
    return store


@given(_csv_texts())
@example(make_seeds().csv)
@example("serial\n" + "CP-X,\x00\n")
@example("\ufeffserial,model\nCP-BOM,m\n")
def test_csv_imports_register_exactly_the_rows_they_accept(device_store: Store, text: str) -> None:
    with device_store.session() as session:
        before = session.scalar(select(func.count()).select_from(Device))
        audit_before = session.scalar(select(func.count()).select_from(AuditEvent))
        session.commit()
        with bounded(10):
            try:
                result = import_devices(Work(session, "fuzz"), stream=io.StringIO(text, newline=""), batch=7)
            except ChargepkiError as exc:
                refused_cleanly(exc)
                result = None
        session.rollback()
        after = session.scalar(select(func.count()).select_from(Device))
        audit_after = session.scalar(select(func.count()).select_from(AuditEvent))
        session.commit()
    if result is None or result.accepted == 0:
        assert (after, audit_after) == (before, audit_before), "a refused import changed the database"
        return
    assert after - before == result.accepted
    for line, reason in result.refused:
        assert line >= 1
        one_line_error(reason, f"CSV line {line}")
