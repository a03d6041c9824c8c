"""One test per bug that the property tests and `make fuzz` found, with the input that found it.

Each was an HTTP 500/503, an "internal error" or a changed database before its fix; the
chunked-body and short-body cases need a real server and are in tests/e2e/test_est_limits.py.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from ca.errors import InputError, PolicyError
from ca.issuance.csr import read_csr
from ca.store.models import AuditEvent
from cli.main import cli
from tests.hostile import DEVICE, World, _csr_parts, basic, der_tlv, est_client, make_seeds, snapshot

SEEDS = make_seeds()
_CHALLENGE_PASSWORD = b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x09\x07"
_EXTENSION_REQUEST = b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x09\x0e"
_SAN = der_tlv(0x30, b"\x06\x03\x55\x1d\x11" + der_tlv(0x04, der_tlv(0x30, der_tlv(0x82, b"a.example"))))


def _signed(info_content: bytes, algorithm: bytes | None = None) -> bytes:
    """A CSR around this CertificationRequestInfo content, correctly signed by the seed key."""
    info = der_tlv(0x30, info_content)
    _, seed_algorithm = _csr_parts(SEEDS.csr_der)
    signature = SEEDS.key.sign(info, ec.ECDSA(hashes.SHA256()))
    return der_tlv(0x30, info + (algorithm or seed_algorithm) + der_tlv(0x03, b"\x00" + signature))


def _seed_content() -> bytes:
    info, _ = _csr_parts(SEEDS.csr_der)
    return info[info.index(b"\x02\x01\x00") :]  # version, subject, key, [0] attributes (empty: a0 00)


def _with_attributes(attributes: bytes) -> bytes:
    return _signed(_seed_content()[:-2] + der_tlv(0xA0, attributes))


BAD_CSRS = {
    # cryptography raised InvalidVersion, which is no ValueError.
    "version 2": (_signed(b"\x02\x01\x01" + _seed_content()[3:]), InputError),
    # UnsupportedAlgorithm from public_key(): an EC key under an unknown algorithm OID.
    "unknown key type": (
        _signed(_seed_content().replace(b"\x2a\x86\x48\xce\x3d\x02\x01", b"\x2b\x86\x48\xce\x3d\x02\x01")),
        PolicyError,
    ),
    # UnsupportedAlgorithm from is_signature_valid: an unknown signature algorithm.
    "unknown signature algorithm": (_signed(_seed_content(), der_tlv(0x30, b"\x06\x03\x2a\x03\x04")), PolicyError),
    # DuplicateExtension (no ValueError) from csr.extensions.
    "duplicate extension": (
        _with_attributes(der_tlv(0x30, _EXTENSION_REQUEST + der_tlv(0x31, der_tlv(0x30, _SAN + _SAN)))),
        InputError,
    ),
    # A ValueError only when enrollment looked for the challengePassword, after read_csr had passed it.
    "multi-valued challengePassword": (
        _with_attributes(der_tlv(0x30, _CHALLENGE_PASSWORD + der_tlv(0x31, der_tlv(0x0C, b"a") + der_tlv(0x0C, b"b")))),
        InputError,
    ),
}


@pytest.mark.parametrize("case", list(BAD_CSRS))
def test_csrs_that_crashed_the_parser_are_refused(case: str) -> None:
    der, error = BAD_CSRS[case]
    with pytest.raises(error):
        read_csr(der)


def _post(fresh_world: World, body: bytes, authorization: str, path: str = "simpleenroll"):  # type: ignore[no-untyped-def]
    return est_client(fresh_world).post(
        f"/.well-known/est/{path}",
        data=base64.encodebytes(body),
        headers={"Content-Type": "application/pkcs10", "Authorization": authorization},
    )


def test_bad_csrs_with_the_right_secret_get_4xx_and_keep_the_secret(fresh_world: World) -> None:
    before = snapshot(fresh_world.pki.store)
    for case, (der, _error) in BAD_CSRS.items():
        response = _post(fresh_world, der, basic(DEVICE, fresh_world.secret))
        assert response.status_code in (400, 403), (case, response.status_code, response.get_data(as_text=True))
    assert snapshot(fresh_world.pki.store) == before


def test_a_basic_token_with_non_ascii_characters_is_a_401(fresh_world: World) -> None:
    response = _post(fresh_world, SEEDS.csr_der, "Basic \x95abc")  # werkzeug raised ValueError: HTTP 500
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")


def test_nul_characters_never_reach_the_database(fresh_world: World) -> None:
    """On PostgreSQL each of these was a DataError, answered 503 as if the database were down."""
    label = est_client(fresh_world).get("/.well-known/est/a%00b/cacerts")
    assert label.status_code == 404
    user = _post(fresh_world, SEEDS.csr_der, basic("CP-\x00", "x"))
    assert user.status_code == 401


def test_a_refusal_with_a_hostile_cn_is_still_audited(fresh_world: World) -> None:
    """A CN of NULs and 300 characters made the refusal's own audit entry fail (subject is 256 wide)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "\x00" + "x" * 300, _validate=False)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(SEEDS.key, hashes.SHA256())
    response = _post(fresh_world, csr.public_bytes(serialization.Encoding.DER), basic(DEVICE, fresh_world.secret))
    assert response.status_code == 403
    with fresh_world.pki.store.session() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "enrollment.refused").order_by(AuditEvent.seq.desc())
        ).first()
        session.commit()
    assert event is not None and event.subject is not None and len(event.subject) <= 256
    assert "\x00" not in event.subject


def _cli(fresh_world: World, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["--home", str(fresh_world.home), *args])


def test_cli_values_that_overflowed_are_usage_errors(fresh_world: World) -> None:
    ttl = _cli(fresh_world, "token", "issue", DEVICE, "--ttl", "99999999999d")  # OverflowError in timedelta
    assert ttl.exit_code == 2 and "longer than 36500 days" in ttl.output
    date = _cli(
        fresh_world, "revoke", "1", "--reason", "keyCompromise", "--invalidity-date", "0001-01-01T00:00:00+01:00"
    )
    assert date.exit_code == 2 and "ISO 8601" in date.output


def test_cli_files_that_are_not_utf8_are_one_line_errors(fresh_world: World, tmp_path: Path) -> None:
    csv_file = tmp_path / "devices.csv"
    csv_file.write_bytes(b"\xff\xfeserial\nCP-1\n")
    result = _cli(fresh_world, "device", "import", str(csv_file))
    assert result.exit_code == 1 and "not valid UTF-8" in result.output and "internal error" not in result.output


def test_unusable_output_paths_are_refused_before_anything_is_issued(fresh_world: World, tmp_path: Path) -> None:
    serials = tmp_path / "serials.txt"
    serials.write_text(DEVICE + "\n")
    before = snapshot(fresh_world.pki.store)
    missing = tmp_path / "missing" / "secrets.csv"  # secrets were issued, then the file could not be written
    batch = _cli(fresh_world, "token", "issue-batch", "--file", str(serials), "--out", str(missing))
    assert batch.exit_code == 1 and "not a directory" in batch.output
    csr = tmp_path / "cp.csr"
    csr.write_bytes(SEEDS.csr_pem)
    issued = _cli(
        fresh_world, "issue", "--csr", str(csr), "--profile", "charger", "--out", str(tmp_path / "no" / "x.pem")
    )
    assert issued.exit_code == 1 and "not a directory" in issued.output
    (tmp_path / "file").write_text("x")
    ra = _cli(fresh_world, "ra", "add", "Line 9", "--out-dir", str(tmp_path / "file"))
    assert ra.exit_code in (1, 2) and "Error:" in ra.output and "internal error" not in ra.output
    assert snapshot(fresh_world.pki.store) == before, "nothing was issued, no secret was spent"
