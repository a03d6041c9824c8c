"""Firmware signing: the manufacturer root, per-channel signers directly under it, signatures in
the shape of OCPP SignedUpdateFirmware checked by `openssl dgst`, and `firmware verify` refusing
revoked signers (from the store and from the published CRL), on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, SignatureAlgorithmOID

from cli.main import cli
from tests.helpers import make_csr, openssl, pkilint_findings, write

ORG = "Acme Chargers GmbH"


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def ok(home: Path, *args: str) -> Result:
    result = run(home, *args)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result: Result, pattern: str) -> None:
    assert result.exit_code != 0 and "Traceback" not in result.output
    hints = ("[", "Usage: ", "Try '")
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(hints)]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and pattern in lines[0], result.stderr


@pytest.fixture
def signers(home: Path) -> Path:
    """A manufacturer root with a stable and a beta signer."""
    output = ok(home, "manufacturer", "init", "--org", ORG, "--country", "DE").output
    assert "[production] manufacturer root production-manufacturer-root-1" in output
    for name, channel in (("fw-stable", "stable"), ("fw-beta", "beta")):
        added = ok(home, "firmware", "signer", "add", name, "--channel", channel)
        assert "[production] CA production-manufacturer-root-1" in added.stderr
        assert f"firmware signer {name} ({channel})" in added.output
    return home


def _image(tmp_path: Path, name: str = "firmware.bin", size: int = 3 << 20) -> Path:
    return write(tmp_path / name, os.urandom(size))


def _sign(home: Path, image: Path, signer: str) -> dict[str, Path]:
    result = ok(home, "firmware", "sign", str(image), "--signer", signer)
    assert "[production]" in result.stderr
    return {suffix: image.with_name(image.name + suffix) for suffix in (".json", ".sig", ".crt")}


def _verify(home: Path, image: Path, files: dict[str, Path], *extra: str) -> Result:
    return run(
        home, "firmware", "verify", str(image), "--signature", str(files[".sig"]), "--certificate", str(files[".crt"]),
        *extra,
    )  # fmt: skip


def test_signature_has_the_ocpp_shape_and_openssl_verifies_it(signers: Path, tmp_path: Path) -> None:
    image = _image(tmp_path)
    files = _sign(signers, image, "fw-stable")
    document = json.loads(files[".json"].read_text())
    assert set(document) == {"signingCertificate", "signature"}  # OCPP FirmwareType's two signature fields
    assert document["signature"] == files[".sig"].read_text().strip()
    assert document["signingCertificate"] == files[".crt"].read_text()
    assert len(document["signature"]) <= 800 and len(document["signingCertificate"]) <= 5500
    assert document["signingCertificate"].startswith("-----BEGIN CERTIFICATE-----\n")

    # An independent verifier: OpenSSL checks the DER signature over the file with the certificate's key.
    certificate = x509.load_pem_x509_certificate(files[".crt"].read_bytes())
    public = write(
        tmp_path / "pub.pem",
        certificate.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    signature = write(tmp_path / "sig.der", base64.b64decode(document["signature"]))
    result = openssl("dgst", "-sha256", "-verify", str(public), "-signature", str(signature), str(image))
    assert result.returncode == 0 and result.stdout.strip() == "Verified OK", result.stdout + result.stderr
    data = image.read_bytes()
    tampered = write(tmp_path / "tampered.bin", data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    result = openssl("dgst", "-sha256", "-verify", str(public), "-signature", str(signature), str(tampered))
    assert result.returncode != 0 and "Verification failure" in result.stdout

    verified = _verify(signers, image, files)
    assert verified.exit_code == 0, verified.output
    assert "OK: firmware.bin signed by fw-stable (stable)" in verified.output
    assert "[production] CA production-manufacturer-root-1" in verified.stderr
    one_line_error(_verify(signers, tampered, files), "does not match this firmware file")


def test_signer_certificates_sit_directly_under_the_manufacturer_root(signers: Path, tmp_path: Path) -> None:
    files = _sign(signers, _image(tmp_path, size=1000), "fw-beta")
    signer = x509.load_pem_x509_certificate(files[".crt"].read_bytes())
    listing = ok(signers, "ca", "list").output
    assert "production-manufacturer-root-1" in listing and "manufacturer" in listing
    chain = ok(signers, "ca", "chain", "--ca", "production-manufacturer-root-1").stdout
    (root_der,) = x509.load_pem_x509_certificates(chain.encode())
    root = write(tmp_path / "root.pem", root_der.public_bytes(serialization.Encoding.PEM))
    # No intermediate: the root alone is enough for OpenSSL (3.0 has no code-signing purpose; EKU below).
    result = openssl("verify", "-x509_strict", "-CAfile", str(root), str(files[".crt"]))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
    assert signer.issuer == root_der.subject
    assert signer.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    key = signer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    eku = signer.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    usage = signer.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert not signer.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca
    assert signer.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "beta"
    assert signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fw-beta"
    constraints = root_der.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
    assert constraints.critical and constraints.value.path_length == 0
    assert pkilint_findings(files[".crt"], root) == ""
    assert pkilint_findings(root) == ""


def test_a_revoked_beta_signer_is_refused_while_stable_still_verifies(signers: Path, tmp_path: Path) -> None:
    image = _image(tmp_path)
    stable = _sign(signers, image, "fw-stable")
    beta_image = _image(tmp_path, "beta.bin")
    beta = _sign(signers, beta_image, "fw-beta")
    beta_serial = format(x509.load_pem_x509_certificate(beta[".crt"].read_bytes()).serial_number, "X")
    published = tmp_path / "crls-before"
    ok(signers, "crl", "publish", "--dir", str(published))
    crl_before = published / "production-manufacturer-root-1.crl"
    assert _verify(signers, beta_image, beta, "--crl", str(crl_before)).exit_code == 0

    revoked = ok(signers, "revoke", beta_serial, "--reason", "keyCompromise")
    assert "[production] CA production-manufacturer-root-1" in revoked.stderr
    one_line_error(_verify(signers, beta_image, beta), "is revoked (keyCompromise")
    one_line_error(run(signers, "firmware", "sign", str(beta_image), "--signer", "fw-beta"), "is revoked")
    assert _verify(signers, image, stable).exit_code == 0
    # The published CRL says the same, for whoever checks it offline.
    after = tmp_path / "crls-after"
    ok(signers, "crl", "publish", "--dir", str(after))
    crl_after = after / "production-manufacturer-root-1.crl"
    crl = x509.load_der_x509_crl(crl_after.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(beta_serial, 16)) is not None
    one_line_error(_verify(signers, beta_image, beta, "--crl", str(crl_after)), "revoked")
    assert _verify(signers, image, stable, "--crl", str(crl_after)).exit_code == 0
    one_line_error(
        _verify(signers, image, stable, "--crl", str(after / "production-manufacturer-root-1.crt")),
        "holds no readable CRL",
    )
    # The channel gets a new signer under the same name once the old one is revoked.
    ok(signers, "firmware", "signer", "add", "fw-beta", "--channel", "beta")
    fresh = _sign(signers, beta_image, "fw-beta")
    assert _verify(signers, beta_image, fresh).exit_code == 0
    listing = ok(signers, "firmware", "signer", "list").output
    assert listing.count("fw-beta") == 2 and "revoked" in listing and "stable" in listing


def test_bad_inputs_get_one_line_errors(signers: Path, tmp_path: Path) -> None:
    image = _image(tmp_path, size=100)
    files = _sign(signers, image, "fw-stable")
    long_signature = write(tmp_path / "long.sig", base64.b64encode(os.urandom(700)))
    not_base64 = write(tmp_path / "bad.sig", b"!!! not base64 !!!")
    raw_der = write(tmp_path / "raw.der", base64.b64decode(files[".sig"].read_bytes()))  # DER, not OCPP's base64
    garbage_cert = write(tmp_path / "bad.crt", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    two = write(tmp_path / "two.crt", files[".crt"].read_bytes() * 2)
    huge = write(tmp_path / "huge.crt", files[".crt"].read_bytes() * 8)
    # A certificate from another hierarchy: the OCPP issuing CA's charger certificate.
    ok(signers, "init", "--org", ORG)
    charger = tmp_path / "charger.pem"
    csr = write(tmp_path / "c.csr", make_csr("CP-1", organization=ORG))
    ok(signers, "issue", "--profile", "charger", "--csr", str(csr), "--out", str(charger))
    verify = ("firmware", "verify", str(image))
    cases = [
        ((*verify, "--signature", str(long_signature), "--certificate", str(files[".crt"])), "at most 800"),
        ((*verify, "--signature", str(not_base64), "--certificate", str(files[".crt"])), "is not base64"),
        ((*verify, "--signature", str(files[".sig"]), "--certificate", str(garbage_cert)), "not a readable PEM"),
        ((*verify, "--signature", str(files[".sig"]), "--certificate", str(two)), "expected one signing certificate"),
        ((*verify, "--signature", str(files[".sig"]), "--certificate", str(huge)), "exceeds OCPP's 5500"),
        ((*verify, "--signature", str(files[".sig"]), "--certificate", str(charger)), "not a code-signing"),
        ((*verify, "--signature", str(raw_der), "--certificate", str(files[".crt"])), "is not base64"),
        ((*verify, "--signature", str(tmp_path / "nope.sig"), "--certificate", str(files[".crt"])), "cannot read"),
        (("firmware", "sign", str(tmp_path / "missing.bin"), "--signer", "fw-stable"), "cannot read the firmware"),
        (("firmware", "sign", str(image), "--signer", "nobody"), "no firmware signer 'nobody'"),
        (("firmware", "signer", "add", "fw-stable"), "exists (serial"),
        (("firmware", "signer", "add", "bad name!"), "signer name 'bad name!'"),
        (("firmware", "signer", "add", "fw-x", "--channel", "Beta Channel"), "channel 'Beta Channel'"),
        (("firmware", "signer", "add", "fw-x", "--environment", "staging"), "no manufacturer root in environment"),
        (("manufacturer", "init", "--org", ORG), "already has a manufacturer root"),
        (("issue", "--profile", "firmware-signer", "--csr", str(csr), "--ca", "production-issuing-1"), "manufacturer"),
    ]
    for args, message in cases:
        one_line_error(run(signers, *args), message)


def test_a_code_signing_certificate_from_a_foreign_root_is_refused(signers: Path, home: Path, tmp_path: Path) -> None:
    """Another environment's manufacturer root is not this environment's signer: the chain decides."""
    ok(home, "manufacturer", "init", "--org", "Other Maker", "--environment", "staging")
    ok(home, "firmware", "signer", "add", "staging-fw", "--environment", "staging")
    image = _image(tmp_path, size=10)
    result = ok(home, "firmware", "sign", str(image), "--signer", "staging-fw", "--environment", "staging")
    assert "[staging]" in result.stderr
    files = {suffix: image.with_name(image.name + suffix) for suffix in (".sig", ".crt")}
    verified = _verify(home, image, files)
    assert verified.exit_code == 0 and "[staging] CA staging-manufacturer-root-1" in verified.stderr
    one_line_error(
        run(home, "firmware", "sign", str(image), "--signer", "fw-stable"), "several environments have a manufacturer"
    )
    # A self-made code-signing certificate whose issuer name copies our root's, signing with its own key.
    forged_certificate, forged_signature = _forged_signer(tmp_path, files[".crt"], image)
    one_line_error(
        run(home, "firmware", "verify", str(image), "--signature", str(forged_signature),
            "--certificate", str(forged_certificate)),
        "not issued directly by a manufacturer root",
    )  # fmt: skip
    # The genuine signature with the forged certificate: the key does not match.
    one_line_error(
        run(home, "firmware", "verify", str(image), "--signature", str(files[".sig"]),
            "--certificate", str(forged_certificate)),
        "does not match",
    )  # fmt: skip


def _forged_signer(tmp_path: Path, genuine: Path, image: Path) -> tuple[Path, Path]:
    original = x509.load_pem_x509_certificate(genuine.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(key, hashes.SHA256())
    )
    signature = key.sign(image.read_bytes(), ec.ECDSA(hashes.SHA256()))
    return (
        write(tmp_path / "forged.crt", forged.public_bytes(serialization.Encoding.PEM)),
        write(tmp_path / "forged.sig", base64.b64encode(signature)),
    )
