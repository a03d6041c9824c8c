"""CPU per OCSP response built and signed by ``ocsp.signing.ResponseSigner``, without the token.

A software P-256 key stands in for the token key, so what is counted is this module's own work:
building the ResponseData, the signature and its verification, and wrapping the response.
CPU seconds of this process (``time.process_time``), best of ``--repeat`` rounds: a figure that
stays meaningful on a loaded machine, unlike wall-clock time.

    .venv/bin/python bench/presign_micro.py [--count 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (bench/ocsp.py)
from ocsp.certid import CertId  # noqa: E402
from ocsp.signing import ResponseSigner, SingleStatus  # noqa: E402


def software_signer() -> ResponseSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench OCSP signer")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    return ResponseSigner(1, "01", certificate, der, key)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    signer = software_signer()
    cert_id = CertId("sha1", b"\x11" * 20, b"\x22" * 20, 0x5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A)
    now = datetime.now(UTC)
    statuses = [SingleStatus(cert_id, "good")]
    best = None
    for _ in range(args.repeat):
        started = time.process_time()
        for _ in range(args.count):
            signer.sign(statuses, this_update=now, next_update=now + timedelta(hours=24))
        spent = (time.process_time() - started) / args.count
        best = spent if best is None else min(best, spent)
    key = signer.private_key
    data = b"x" * 200
    started = time.process_time()
    for _ in range(args.count):
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, arg-type]
        key.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))
    crypto = (time.process_time() - started) / args.count
    assert best is not None
    print(
        f"sign(): {best * 1e6:.0f} µs CPU per response; of which software sign+verify {crypto * 1e6:.0f} µs, "
        f"the rest (building the DER) {(best - crypto) * 1e6:.0f} µs"
    )


if __name__ == "__main__":
    main()
