"""Helpers for building requests and asking independent tools (OpenSSL, pkilint) about results."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent  # the repository (tests live at any depth below it)
CHARGEPKI = [sys.executable, "-c", "from cli.main import main; main()"]


def chargepki(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, with none of this process's CHARGEPKI_ or SoftHSM settings."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CHARGEPKI_", "SOFTHSM2"))}
    environment.update(env or {})
    return subprocess.run(
        [*CHARGEPKI, "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        cwd=ROOT,
    )


def make_key(kind: str = "ec-p256") -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """A requester's key (software: it belongs to the device, not the CA)."""
    if kind.startswith("ec-p"):
        curve = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1(), "ec-p521": ec.SECP521R1()}[kind]
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=int(kind.split("-")[1]))


def make_csr(
    common_name: str = "CP-0001",
    organization: str | None = "Acme Charging",
    key: object | None = None,
    dns_names: tuple[str, ...] = (),
) -> bytes:
    key = key or make_key()
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    algorithm = None if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def b64csr(cn: str, key=None, organization: str | None = "Acme Charging", **kwargs) -> bytes:  # type: ignore[no-untyped-def]
    """An EST request body: the DER CSR in base64 (RFC 7030 §4.2.1)."""
    pem = make_csr(cn, organization=organization, key=key or make_key(), **kwargs)
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    return base64.encodebytes(der)


def pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def openssl(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=check, timeout=60)


def pkilint_findings(certificate: Path, issuer: Path | None = None, ignore: tuple[str, ...] = ()) -> str:
    """pkilint's RFC 5280 findings at NOTICE and above (empty means nothing to report).

    ``ignore`` drops named findings that are pkilint's own known limitations (each caller says why).
    """
    from pkilint.bin import lint_pkix_cert, lint_pkix_signer_signee_cert_chain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if issuer is None:
            lint_pkix_cert.main(["lint", "-s", "NOTICE", str(certificate)])
        else:
            lint_pkix_signer_signee_cert_chain.main(["lint", "-s", "NOTICE", str(issuer), str(certificate)])
    lines = out.getvalue().strip().splitlines()
    kept = [line for line in lines if not any(name in line for name in ignore)]
    if len(kept) == 1 and "@" in kept[0]:  # only a validator header left, its findings were ignored
        kept = []
    return "\n".join(kept)


def openssl_verify_against_chain(chain_pem: str, leaf: Path, *purpose: str) -> subprocess.CompletedProcess[str]:
    """`openssl verify` of ``leaf`` with the root of `chargepki ca chain` as trust anchor and the
    issuing CA as untrusted intermediate (files written next to ``leaf``)."""
    issuing, root = x509.load_pem_x509_certificates(chain_pem.encode())
    issuing_path = write(leaf.parent / "issuing.pem", issuing.public_bytes(serialization.Encoding.PEM))
    root_path = write(leaf.parent / "root.pem", root.public_bytes(serialization.Encoding.PEM))
    extra = ["-purpose", purpose[0]] if purpose else []
    return openssl("verify", "-CAfile", str(root_path), "-untrusted", str(issuing_path), *extra, str(leaf))


def oem_root_pem() -> bytes:
    """A vehicle manufacturer's root, for the CSMS to install as OEMRootCertificate."""
    key = ec.generate_private_key(ec.SECP521R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example Motors OEM Root")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA512())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)
