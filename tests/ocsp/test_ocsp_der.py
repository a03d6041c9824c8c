"""The OCSP response DER that ``ocsp.signing`` writes by hand against two independent oracles.

1. asn1crypto, as the previous implementation built every response: with a deterministic signature
   (RSA PKCS#1 v1.5) the whole OCSPResponse must be byte-for-byte what asn1crypto's objects encode.
2. cryptography's OCSP parser (OpenSSL's rules in Rust): every field read back, the signature
   verified over the parsed ``tbs_response_bytes``; and asn1crypto re-encodes the parse unchanged (DER).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from asn1crypto import algos as asn1_algos
from asn1crypto import core as asn1_core
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from ocsp.certid import CertId
from ocsp.signing import _ASN1_REASONS, ResponseSigner, SingleStatus

NOW = datetime(2026, 12, 3, 14, 5, 6, 789000, tzinfo=UTC)


def _signer(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, padding_name: str | None = None) -> ResponseSigner:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OCSP signer")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0x1234)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    return ResponseSigner(1, "1234", certificate, der, key, padding_name)  # type: ignore[arg-type]


def _reference(
    signer: ResponseSigner, statuses: list[SingleStatus], this_update: datetime, next_update: datetime
) -> bytes:
    """The previous implementation: asn1crypto objects, field by field (RSA PKCS#1 v1.5 only)."""
    this_update = this_update.replace(microsecond=0)
    next_update = min(next_update.replace(microsecond=0), signer.not_after)

    def single(status: SingleStatus) -> asn1_ocsp.SingleResponse:
        if status.status == "revoked":
            info: dict[str, object] = {"revocation_time": status.revoked_at.replace(microsecond=0)}  # type: ignore[union-attr]
            if status.reason is not None and status.reason != "unspecified":
                info["revocation_reason"] = _ASN1_REASONS[status.reason]
            cert_status = asn1_ocsp.CertStatus(name="revoked", value=asn1_ocsp.RevokedInfo(info))
        else:
            cert_status = asn1_ocsp.CertStatus(name=status.status, value=asn1_core.Null())
        return asn1_ocsp.SingleResponse(
            {
                "cert_id": {
                    "hash_algorithm": {"algorithm": status.cert_id.hash_algorithm},
                    "issuer_name_hash": status.cert_id.issuer_name_hash,
                    "issuer_key_hash": status.cert_id.issuer_key_hash,
                    "serial_number": status.cert_id.serial_number,
                },
                "cert_status": cert_status,
                "this_update": this_update,
                "next_update": next_update,
            }
        )

    tbs = asn1_ocsp.ResponseData(
        {
            "responder_id": asn1_ocsp.ResponderId(name="by_key", value=signer.key_hash()),
            "produced_at": this_update,
            "responses": [single(status) for status in statuses],
        }
    )
    key = signer.private_key
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(tbs.dump(), padding.PKCS1v15(), hashes.SHA256())
    basic = asn1_ocsp.BasicOCSPResponse(
        {
            "tbs_response_data": tbs,
            "signature_algorithm": asn1_algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa"}),
            "signature": signature,
            "certs": [asn1_x509.Certificate.load(signer.certificate_der)],
        }
    )
    return asn1_ocsp.OCSPResponse(
        {"response_status": "successful", "response_bytes": {"response_type": "basic_ocsp_response", "response": basic}}
    ).dump()


SERIALS = [1, 0x7F, 0x80, 0xFF, 0x100, 2**159 - 1, 2**158 + 12345, 0x00A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3]


def _statuses() -> list[list[SingleStatus]]:
    sha1 = ("sha1", bytes(range(20)), bytes(range(20, 40)))
    sha256 = ("sha256", bytes(range(32)), bytes(range(32, 64)))
    revoked_at = NOW - timedelta(hours=3, microseconds=5)
    cases = [[SingleStatus(CertId(*sha1, serial), "good")] for serial in SERIALS]
    cases.append([SingleStatus(CertId(*sha256, 42), "good")])
    cases.append([SingleStatus(CertId(*sha1, 43), "unknown")])
    cases += [[SingleStatus(CertId(*sha1, 44), "revoked", revoked_at, reason)] for reason in [None, *_ASN1_REASONS]]
    # several CertIDs in one response (what the on-demand signer answers), and a long one (> 127, > 255 octets)
    cases.append(
        [
            SingleStatus(CertId(*sha1, 45), "good"),
            SingleStatus(CertId(*sha256, 46), "revoked", revoked_at, "keyCompromise"),
            SingleStatus(CertId(*sha1, 47), "unknown"),
        ]
        * 4
    )
    return cases


@pytest.fixture(scope="module")
def rsa_signer() -> ResponseSigner:
    return _signer(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.mark.parametrize("statuses", _statuses())
def test_the_der_is_what_asn1crypto_encodes(rsa_signer: ResponseSigner, statuses: list[SingleStatus]) -> None:
    next_update = NOW + timedelta(hours=24, microseconds=1)
    assert rsa_signer.sign(statuses, this_update=NOW, next_update=next_update) == _reference(
        rsa_signer, statuses, NOW, next_update
    )


def test_next_update_never_outlives_the_signer(rsa_signer: ResponseSigner) -> None:
    statuses = [SingleStatus(CertId("sha1", b"\0" * 20, b"\1" * 20, 9), "good")]
    late = NOW + timedelta(days=400)
    assert rsa_signer.sign(statuses, this_update=NOW, next_update=late) == _reference(rsa_signer, statuses, NOW, late)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
@pytest.mark.parametrize("statuses", _statuses())
def test_cryptography_reads_back_every_field(curve: ec.EllipticCurve, statuses: list[SingleStatus]) -> None:
    signer = _signer(ec.generate_private_key(curve))
    der = signer.sign(statuses, this_update=NOW, next_update=NOW + timedelta(hours=24))
    assert asn1_ocsp.OCSPResponse.load(der).dump(force=True) == der, "DER: asn1crypto re-encodes it unchanged"
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.responder_key_hash == signer.key_hash()
    assert response.produced_at_utc == NOW.replace(microsecond=0)
    assert [c.public_bytes(serialization.Encoding.DER) for c in response.certificates] == [signer.certificate_der]
    algorithm = hashes.SHA384() if isinstance(curve, ec.SECP384R1) else hashes.SHA256()
    signer.certificate.public_key().verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))  # type: ignore[call-arg, arg-type]
    singles = list(response.responses)
    assert len(singles) == len(statuses)
    for single, status in zip(singles, statuses, strict=True):
        assert single.serial_number == status.cert_id.serial_number
        assert single.issuer_name_hash == status.cert_id.issuer_name_hash
        assert single.issuer_key_hash == status.cert_id.issuer_key_hash
        assert single.hash_algorithm.name == status.cert_id.hash_algorithm
        assert single.certificate_status.name.lower() == status.status
        assert single.this_update_utc == NOW.replace(microsecond=0)
        assert single.next_update_utc == (NOW + timedelta(hours=24)).replace(microsecond=0)
        if status.status == "revoked":
            assert status.revoked_at is not None
            assert single.revocation_time_utc == status.revoked_at.replace(microsecond=0)
            expected = None if status.reason in (None, "unspecified") else x509.ReasonFlags(status.reason)
            assert single.revocation_reason == expected


def test_pss_signers_sign_and_verify() -> None:
    signer = _signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "pss")
    der = signer.sign(
        [SingleStatus(CertId("sha1", b"\0" * 20, b"\1" * 20, 7), "good")], this_update=NOW, next_update=NOW
    )
    response = ocsp.load_der_ocsp_response(der)
    signer.certificate.public_key().verify(  # type: ignore[call-arg]
        response.signature,
        response.tbs_response_bytes,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),  # type: ignore[arg-type]
        hashes.SHA256(),  # type: ignore[arg-type]
    )
    assert asn1_ocsp.OCSPResponse.load(der).dump(force=True) == der
