#!/usr/bin/env python3
"""A factory provisioning station: enrolls a batch of chargers over EST.

For every device it generates a key (as a charger's secure element would), sends a CSR to
`simpleenroll` authenticated either with the device's one-time secret (HTTP Basic, from the
CSV that `chargepki token issue-batch` wrote) or with the station's RA certificate (mutual
TLS, `chargepki ra add`), and writes `<serial>.key` and `<serial>.pem` for flashing.
It ends with a summary; every refused device is listed with the server's reason.

    python examples/factory_station.py --url https://localhost:8443/.well-known/est \\
        --root root.pem --org "Acme Charging" --secrets secrets.csv --out provisioned/
    python examples/factory_station.py ... --serials serials.txt --ra-cert station.pem --ra-key station.key
"""

from __future__ import annotations

import argparse
import base64
import csv
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID


def csr_for(serial: str, organization: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization), x509.NameAttribute(NameOID.COMMON_NAME, serial)]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def enroll(args: argparse.Namespace, serial: str, secret: str | None) -> str | None:
    """Enroll one device; None on success, else the reason."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        response = requests.post(
            f"{args.url}/simpleenroll",
            data=csr_for(serial, args.org, key),
            timeout=60,
            headers={"Content-Type": "application/pkcs10"},
            verify=args.root,
            auth=(serial, secret) if secret else None,
            cert=(args.ra_cert, args.ra_key) if args.ra_cert else None,
        )
    except requests.RequestException as exc:
        return f"connection failed: {exc}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text.strip()}"
    (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    key_file = args.out / f"{serial}.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    (args.out / f"{serial}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="EST base URL, e.g. https://host:8443/.well-known/est")
    parser.add_argument("--root", required=True, help="trust anchor PEM (chargepki ca chain --ca <root>)")
    parser.add_argument("--org", required=True, help="the CA's organisation (subject O)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--secrets", type=Path, help="CSV serial,secret[,expires_at] from token issue-batch")
    source.add_argument("--serials", type=Path, help="one serial per line (with --ra-cert/--ra-key)")
    parser.add_argument("--ra-cert")
    parser.add_argument("--ra-key")
    parser.add_argument("--out", type=Path, default=Path("provisioned"))
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    if args.serials and not (args.ra_cert and args.ra_key):
        parser.error("--serials needs --ra-cert and --ra-key (enroll on behalf of the devices)")
    if args.secrets:
        with args.secrets.open(newline="") as handle:
            batch = [(row["serial"], row["secret"]) for row in csv.DictReader(handle)]
    else:
        batch = [(line.strip(), None) for line in args.serials.read_text().splitlines() if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)

    failures: list[tuple[str, str]] = []
    with (
        ThreadPoolExecutor(max_workers=args.parallel) as pool,
        click.progressbar(length=len(batch), label="enrolling", file=sys.stderr) as bar,
    ):
        for (serial, _secret), reason in zip(batch, pool.map(lambda item: enroll(args, *item), batch), strict=True):
            if reason is not None:
                failures.append((serial, reason))
            bar.update(1)
    print(f"enrolled {len(batch) - len(failures)} of {len(batch)} devices into {args.out}")
    for serial, reason in failures:
        print(f"  refused {serial}: {reason}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
