"""Every profile, for every CA key type, yields certificates that conform to RFC 5280 to the
letter: OpenSSL verifies the chain, pkilint (an independent RFC 5280 linter) reports nothing,
and each extension has the value and criticality the profile prescribes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, SignatureAlgorithmOID
from freezegun import freeze_time
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.authorities.issuers import issuer_for
from ca.issuance.csr import read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.profiles import PROFILES, get_profile
from ca.keys.pkcs11_token import Token
from ca.store.engine import Store
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr, make_key, openssl, pem, pkilint_findings, write

LEAF_REQUESTS = {
    "charger": {"common_name": "CP-0001"},
    "csms-server": {"common_name": "csms.example.com", "dns_names": ("csms.example.com", "ocpp.example.com")},
    "ocsp-signer": {"common_name": "Acme OCSP Signer"},
    "ra": {"common_name": "Factory Station Shenzhen 1"},
    "csms-client": {"common_name": "Acme CSMS eu-west"},
    "admin": {"common_name": "alice"},
}
OPENSSL_PURPOSE = {
    "charger": "sslclient", "csms-server": "sslserver", "ra": "sslclient", "csms-client": "sslclient",
    "admin": "sslclient",
}  # fmt: skip


def _issue_all(session: Session, token: Token, hierarchy: Hierarchy, leaf_key: str) -> dict[str, bytes]:
    status = Presigner(token)
    issuer = issuer_for(hierarchy.issuing, token)
    issued = {"root": hierarchy.root.certificate_der, "issuing-ca": hierarchy.issuing.certificate_der}
    for profile_name, fields in LEAF_REQUESTS.items():
        csr = read_csr(make_csr(key=make_key(leaf_key), **fields))
        row = issue(
            Work(session, "test", status=status),
            issuer=issuer,
            request=request_from_csr(get_profile(profile_name), csr, issuer),
        )
        assert row.der is not None
        issued[profile_name] = row.der
    return issued


CA_KEY_TYPES = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072-pss", "rsa-4096"]


@pytest.fixture(scope="module")
def issued_by_kind(token: Token, tmp_path_factory: pytest.TempPathFactory):
    """Builds each hierarchy once per module. Certificate bytes do not depend on the database,
    so these use SQLite (the store itself is exercised on SQLite and PostgreSQL elsewhere)."""
    cache: dict[str, dict[str, Path]] = {}

    def build(kind: str) -> dict[str, Path]:
        status = Presigner(token)
        if kind not in cache:
            key_type = kind.removesuffix("-pss")
            directory = tmp_path_factory.mktemp(kind)
            store = Store(f"sqlite:///{directory / 'db.sqlite'}")
            store.upgrade()
            with store.session() as session:
                hierarchy = init_hierarchy(
                    Work(session=session, actor="test", status=status, token=token),
                    request=HierarchyRequest(
                        organization="Acme Charging",
                        country="DE",
                        key_type=key_type,
                        rsa_padding="pss" if kind.endswith("-pss") else "pkcs1",
                    ),
                )
                leaf_key = "ec-p256" if key_type.startswith("ec") else "rsa-2048"
                cache[kind] = {
                    name: write(directory / f"{name}.pem", pem(der))
                    for name, der in _issue_all(session, token, hierarchy, leaf_key).items()
                }
            store.dispose()
        return cache[kind]

    return build


@pytest.fixture(params=CA_KEY_TYPES)
def issued(request: pytest.FixtureRequest, issued_by_kind) -> dict[str, Path]:
    """A hierarchy of each CA key type, and one certificate of every profile, written as PEM."""
    return issued_by_kind(request.param)


# The manufacturer and ISO 15118 hierarchies have their own tests
# (tests/ca/test_firmware.py, tests/ca/authorities/test_v2g.py).
OTHER_HIERARCHIES = {
    "manufacturer-root",
    "firmware-signer",
    *("v2g-root", "v2g-sub-ca-1", "v2g-sub-ca-2", "v2g-secc"),
    *("v2g20-root", "v2g20-sub-ca-1", "v2g20-sub-ca-2", "v2g20-secc"),
}


def test_every_profile_is_covered() -> None:
    # root-link certificates come from `ca rollover-root`: linted and verified in tests/ca/authorities/test_rollover.py.
    assert set(PROFILES) == {"root", "issuing-ca", "root-link", *LEAF_REQUESTS, *OTHER_HIERARCHIES}


def test_openssl_verifies_every_certificate_against_root_and_issuing_ca(issued: dict[str, Path]) -> None:
    for name, path in issued.items():
        if name == "root":
            args = ["verify", "-x509_strict", "-CAfile", str(path), str(path)]
        elif name == "issuing-ca":
            args = ["verify", "-x509_strict", "-CAfile", str(issued["root"]), str(path)]
        else:
            args = [
                "verify",
                "-x509_strict",
                "-CAfile",
                str(issued["root"]),
                "-untrusted",
                str(issued["issuing-ca"]),
                str(path),
            ]
            if name in OPENSSL_PURPOSE:
                args[1:1] = ["-purpose", OPENSSL_PURPOSE[name]]
        result = openssl(*args)
        assert result.returncode == 0 and result.stdout.strip().endswith("OK"), (name, result.stderr)


def test_pkilint_finds_nothing_to_report(issued: dict[str, Path]) -> None:
    # pkilint 0.13's pair linter checks every RSA signature with PKCS#1 v1.5, ignoring RSASSA-PSS
    # parameters (pkix/certificate/certificate_key.py); OpenSSL verifies those chains above.
    root = x509.load_pem_x509_certificate(issued["root"].read_bytes())
    is_pss = root.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
    pss = "signature_verification_failed" if is_pss else "(none)"
    for name, path in issued.items():
        assert pkilint_findings(path) == "", name
        if name != "root":  # the pair linter is for issuer ≠ subject; roots omit AKI (RFC 5280 4.2.1.1)
            issuer = issued["root"] if name == "issuing-ca" else issued["issuing-ca"]
            assert pkilint_findings(path, issuer, ignore=(pss,)) == "", f"{name} against its issuer"


def _text(path: Path) -> str:
    return openssl("x509", "-in", str(path), "-noout", "-text", check=True).stdout


def test_openssl_sees_the_extensions_each_profile_prescribes(issued: dict[str, Path]) -> None:
    root, issuing = _text(issued["root"]), _text(issued["issuing-ca"])
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE\n", root)
    assert re.search(r"Key Usage: critical\s+Certificate Sign, CRL Sign", root)
    assert "Authority Key Identifier" not in root, "self-signed roots omit AKI (RFC 5280 4.2.1.1)"
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE, pathlen:0", issuing)
    assert re.search(r"Key Usage: critical\s+Certificate Sign, CRL Sign", issuing)
    assert "URI:http://127.0.0.1:8081/pki/production-root-1.crl" in issuing
    assert "CA Issuers - URI:http://127.0.0.1:8081/pki/production-root-1.crt" in issuing

    charger = _text(issued["charger"])
    assert re.search(r"Basic Constraints: critical\s+CA:FALSE", charger)
    assert re.search(r"Extended Key Usage: \n\s+TLS Web Client Authentication\n", charger)
    assert "Subject Alternative Name" not in charger, "OCPP: no dNSName SAN for charging stations"
    assert "Subject: C = DE, O = Acme Charging, CN = CP-0001" in charger
    assert "OCSP - URI:http://127.0.0.1:8081/ocsp" in charger
    assert "CA Issuers - URI:http://127.0.0.1:8081/pki/production-issuing-1.crt" in charger
    assert "URI:http://127.0.0.1:8081/pki/production-issuing-1.crl" in charger

    server = _text(issued["csms-server"])
    assert re.search(r"Extended Key Usage: \n\s+TLS Web Server Authentication\n", server)
    assert "DNS:csms.example.com, DNS:ocpp.example.com" in server

    signer = _text(issued["ocsp-signer"])
    assert re.search(r"Extended Key Usage: \n\s+OCSP Signing\n", signer)
    assert "OCSP No Check" in signer
    assert "CRL Distribution Points" not in signer

    for text in (charger, server, signer):
        assert "Subject Key Identifier" in text and "Authority Key Identifier" in text


def test_key_usage_follows_the_key_algorithm(issued: dict[str, Path]) -> None:
    charger = x509.load_pem_x509_certificate(issued["charger"].read_bytes())
    usage = charger.extensions.get_extension_for_class(x509.KeyUsage).value
    ec_leaf = "id-ecPublicKey" in _text(issued["charger"])
    assert usage.digital_signature and usage.key_agreement == ec_leaf
    server = x509.load_pem_x509_certificate(issued["csms-server"].read_bytes())
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment == (not ec_leaf)


def test_no_empty_or_duplicate_extensions_and_criticality_per_rfc(issued: dict[str, Path]) -> None:
    must_be_critical = {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE}
    never_critical = {
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.CRL_DISTRIBUTION_POINTS,
    }
    for name, path in issued.items():
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        oids = [extension.oid for extension in certificate.extensions]
        assert len(oids) == len(set(oids)), f"{name} repeats an extension"
        for extension in certificate.extensions:
            # An empty SEQUENCE is the DER of basicConstraints cA=FALSE (DEFAULT omitted); empty anywhere else
            # would be an empty extension.
            if extension.oid != ExtensionOID.BASIC_CONSTRAINTS:
                assert extension.value.public_bytes() not in (b"", b"\x30\x00"), f"{name}: empty {extension.oid}"
            if extension.oid in must_be_critical:
                assert extension.critical, f"{name}: {extension.oid} must be critical"
            if extension.oid in never_critical:
                assert not extension.critical, f"{name}: {extension.oid} must not be critical"
        assert certificate.version == x509.Version.v3
        assert 0 < certificate.serial_number < 2**159
        assert certificate.signature_hash_algorithm is not None
        assert certificate.signature_hash_algorithm.name in ("sha256", "sha384")


def test_encoding_is_distinguished(issued: dict[str, Path]) -> None:
    """Re-encoding every parsed field from scratch gives the same bytes: the certificates are DER."""
    for name, path in issued.items():
        der = x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)
        assert asn1_x509.Certificate.load(der).dump(force=True) == der, name


def test_ocsp_signer_eku_is_only_ocsp_signing(issued: dict[str, Path]) -> None:
    signer = x509.load_pem_x509_certificate(issued["ocsp-signer"].read_bytes())
    eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]


# -- time encoding -----------------------------------------------------------------------------
def _time_choice(der: bytes, which: str) -> str:
    return asn1_x509.Certificate.load(der)["tbs_certificate"]["validity"][which].name


def test_utctime_until_2049_and_generalizedtime_from_2050(session: Session, token: Token, status: Presigner) -> None:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 on."""
    with freeze_time(datetime(2040, 6, 1, tzinfo=UTC)):
        hierarchy = init_hierarchy(
            Work(session=session, actor="test", status=status, token=token),
            request=HierarchyRequest(organization="Acme Charging"),
        )
    root = hierarchy.root.certificate_der
    assert x509.load_der_x509_certificate(root).not_valid_after_utc.year == 2060
    assert _time_choice(root, "not_before") == "utc_time"
    assert _time_choice(root, "not_after") == "general_time"
    issuing = hierarchy.issuing.certificate_der
    assert x509.load_der_x509_certificate(issuing).not_valid_after_utc.year == 2050
    assert _time_choice(issuing, "not_after") == "general_time"
    assert _time_choice(hierarchy.ocsp_signer.der or b"", "not_after") == "utc_time"
