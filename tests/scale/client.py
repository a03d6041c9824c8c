"""What the bed's client host does, run inside its namespace (``python -m tests.scale.client …``):
enrollments through the load balancer, OCSP questions to the responders. Prints one JSON document.

Times are ``time.time()``: every namespace shares the machine's clock, so the test compares them
with the moment a revocation committed on another host.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from requests.adapters import HTTPAdapter

ORG = "Acme Charging"


class _Named(HTTPAdapter):
    """TLS to an address, checked against a DNS name (no resolver on the bed)."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self.server_name
        kwargs["assert_hostname"] = self.server_name
        super().init_poolmanager(*args, **kwargs)


def _csr(serial: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, serial)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def enroll(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One first enrollment per device of the CSV (serial,secret), started ``--interval`` apart."""
    with open(args.devices, newline="") as handle:
        devices = [(row["serial"], row["secret"]) for row in csv.DictReader(handle)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = requests.Session()
    session.mount("https://", _Named(args.server_name))
    began = time.monotonic()

    def one(index: int, serial: str, secret: str) -> dict[str, Any]:
        time.sleep(max(0.0, began + index * args.interval - time.monotonic()))
        started = time.time()
        result: dict[str, Any] = {"device": serial, "started": started}
        try:
            response = session.post(
                f"{args.url}/simpleenroll", data=_csr(serial), auth=(serial, secret),
                headers={"Content-Type": "application/pkcs10"}, verify=args.root, timeout=args.timeout,
            )  # fmt: skip
            result["status"] = response.status_code
            if response.status_code == 200:
                (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
                result["serial"] = format(certificate.serial_number, "x")
                (out / f"{serial}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
            else:
                result["body"] = response.text[:300]
        except requests.RequestException as exc:
            result["status"] = type(exc).__name__
        result["seconds"] = round(time.time() - started, 3)
        return result

    with ThreadPoolExecutor(args.concurrency) as pool:
        return list(pool.map(lambda item: one(item[0], *item[1]), enumerate(devices)))


def _status(content: bytes) -> str:
    parsed = ocsp.load_der_ocsp_response(content)
    if parsed.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return parsed.response_status.name.lower()  # try_later, internal_error, unauthorized …
    return parsed.certificate_status.name.lower()  # good, revoked, unknown


def ask(args: argparse.Namespace) -> dict[str, Any]:
    """Ask every responder about the certificate again and again: every answer with its time and
    latency, until each has said ``--until`` (if given) or ``--duration`` seconds passed."""
    certificate = x509.load_pem_x509_certificate(Path(args.cert).read_bytes())
    issuer = x509.load_pem_x509_certificate(Path(args.issuer).read_bytes())
    der = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1()).build().public_bytes(
        serialization.Encoding.DER
    )
    answers: dict[str, list[tuple[float, float, str]]] = {url: [] for url in args.url}
    first: dict[str, float] = {}
    pending = set(args.url)
    ends = time.monotonic() + args.duration

    def one(url: str) -> None:
        started = time.time()
        try:
            response = requests.post(
                url, data=der, headers={"Content-Type": "application/ocsp-request"}, timeout=args.timeout
            )
            status = _status(response.content) if response.status_code == 200 else f"http-{response.status_code}"
        except requests.Timeout:
            status = "timeout"
        except (requests.RequestException, ValueError) as exc:
            status = f"error-{type(exc).__name__}"
        answers[url].append((round(started, 3), round(time.time() - started, 3), status))
        if status == args.until and url not in first:
            first[url] = started
            pending.discard(url)

    with ThreadPoolExecutor(len(args.url)) as pool:
        while time.monotonic() < ends and (pending or not args.until):
            list(pool.map(one, [url for url in args.url if not args.until or url in pending]))
            time.sleep(args.pause)
    return {"first": first, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.scale.client")
    commands = parser.add_subparsers(dest="command", required=True)
    enrolling = commands.add_parser("enroll")
    enrolling.add_argument("--url", required=True)
    enrolling.add_argument("--server-name", required=True)
    enrolling.add_argument("--root", required=True)
    enrolling.add_argument("--devices", required=True)
    enrolling.add_argument("--out", required=True)
    enrolling.add_argument("--concurrency", type=int, default=4)
    enrolling.add_argument("--interval", type=float, default=0.0)
    enrolling.add_argument("--timeout", type=float, default=60)
    asking = commands.add_parser("ask")
    asking.add_argument("--url", action="append", required=True)
    asking.add_argument("--issuer", required=True)
    asking.add_argument("--cert", required=True)
    asking.add_argument("--until")
    asking.add_argument("--duration", type=float, default=30)
    asking.add_argument("--pause", type=float, default=0.02)
    asking.add_argument("--timeout", type=float, default=15)
    args = parser.parse_args()
    result = enroll(args) if args.command == "enroll" else ask(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
