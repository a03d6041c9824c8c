"""Reading OCSP requests: which ones the responder may remember by their bytes (``Request.repeatable``)."""

from __future__ import annotations

from asn1crypto import ocsp as asn1_ocsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ocsp.certid import CertId
from ocsp.requests import REMEMBERED_REQUEST_BYTES, read_request

NAME_HASH, KEY_HASH = b"\x01" * 20, b"\x02" * 20
CERT_ID = CertId("sha1", NAME_HASH, KEY_HASH, 7)


def _builder(serial: int = 7) -> ocsp.OCSPRequestBuilder:
    return ocsp.OCSPRequestBuilder().add_certificate_by_hash(NAME_HASH, KEY_HASH, serial, hashes.SHA1())


def _der(request: ocsp.OCSPRequest) -> bytes:
    return request.public_bytes(serialization.Encoding.DER)


def _edited(der: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    parsed = asn1_ocsp.OCSPRequest.load(der)
    edit(parsed["tbs_request"])
    return parsed.dump(force=True)


def test_a_plain_request_for_one_certificate_is_remembered_by_its_bytes() -> None:
    assert read_request(_der(_builder().build())) == ([CERT_ID], True)


def test_a_request_with_a_nonce_is_answered_but_not_remembered() -> None:
    der = _der(_builder().add_extension(x509.OCSPNonce(b"\x03" * 16), critical=False).build())
    assert read_request(der) == ([CERT_ID], False)


def test_a_padded_request_is_answered_but_never_fills_memory() -> None:
    """A long requestorName makes a valid request of any size up to the body limit, without extensions."""

    def pad(tbs: asn1_ocsp.TBSRequest) -> None:
        tbs["requestor_name"] = asn1_ocsp.GeneralName(
            name="uniform_resource_identifier", value="http://x/" + "x" * REMEMBERED_REQUEST_BYTES
        )

    der = _edited(_der(_builder().build()), pad)
    assert len(der) > REMEMBERED_REQUEST_BYTES
    assert read_request(der) == ([CERT_ID], False)


def test_duplicate_extensions_are_answered_and_not_remembered() -> None:
    def duplicate(tbs: asn1_ocsp.TBSRequest) -> None:
        tbs["request_extensions"].append(tbs["request_extensions"][0].copy())

    der = _edited(_der(_builder().add_extension(x509.OCSPNonce(b"\x04" * 16), critical=False).build()), duplicate)
    assert read_request(der) == ([CERT_ID], False)


def test_a_request_for_several_certificates_is_not_remembered() -> None:
    single = asn1_ocsp.OCSPRequest.load(_der(_builder().build()))["tbs_request"]["request_list"][0]
    der = asn1_ocsp.OCSPRequest({"tbs_request": {"request_list": [single, single.copy()]}}).dump()
    assert read_request(der) == ([CERT_ID, CERT_ID], False)
