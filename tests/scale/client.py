"""What the bed's client host does, run inside its namespace (``python -m tests.scale.client …``):
enrollments through the load balancer, OCSP questions to the responders. One JSON document on
stdout or into ``--answer FILE``.

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
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, serial)]
    )
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
        """As a charger does: the same request again (same key, same secret) when no answer came."""
        time.sleep(max(0.0, began + index * args.interval - time.monotonic()))
        started = time.time()
        body = _csr(serial)
        result: dict[str, Any] = {"device": serial, "started": started, "attempts": 0}
        while result["attempts"] <= args.retries:
            result["attempts"] += 1
            try:
                response = session.post(
                    f"{args.url}/simpleenroll",
                    data=body,
                    auth=(serial, secret),
                    headers={"Content-Type": "application/pkcs10"},
                    verify=args.root,
                    timeout=args.timeout,
                )
            except requests.RequestException as exc:
                result["status"] = type(exc).__name__
                time.sleep(1)
                continue
            result["status"] = response.status_code
            if response.status_code == 200:
                (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
                result["serial"] = format(certificate.serial_number, "x")
                (out / f"{serial}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
                if args.again:  # the same request once more, as after an answer lost on its way back
                    again = session.post(
                        f"{args.url}/simpleenroll",
                        data=body,
                        auth=(serial, secret),
                        headers={"Content-Type": "application/pkcs10"},
                        verify=args.root,
                        timeout=args.timeout,
                    )
                    result["again_status"] = again.status_code
                    if again.status_code == 200:
                        (repeated,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(again.content))
                        result["again_serial"] = format(repeated.serial_number, "x")
                    else:
                        result["again_body"] = again.text[:300]
                break
            result["body"] = response.text[:300]
            if response.status_code not in (502, 503, 504):
                break
            time.sleep(1)
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
    """Ask each responder about the certificate again and again, each in a loop of its own (a slow
    one does not hold the others back): every answer with the time it was asked, its latency and
    the status, until each has said ``--until`` (if given; ``first``: when that answer arrived)
    or ``--duration`` seconds passed."""
    certificate = x509.load_pem_x509_certificate(Path(args.cert).read_bytes())
    issuer = x509.load_pem_x509_certificate(Path(args.issuer).read_bytes())
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    answers: dict[str, list[tuple[float, float, str]]] = {url: [] for url in args.url}
    first: dict[str, float] = {}
    ends = time.monotonic() + args.duration

    def loop(url: str) -> None:
        while time.monotonic() < ends:
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
            answered = time.time()
            answers[url].append((round(started, 3), round(answered - started, 3), status))
            if status == args.until:
                first[url] = answered
                return
            time.sleep(args.pause)

    with ThreadPoolExecutor(len(args.url)) as pool:
        list(pool.map(loop, args.url))
    return {"first": first, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.scale.client")
    parser.add_argument("--answer", help="write the JSON document here instead of stdout")
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
    enrolling.add_argument("--retries", type=int, default=0)
    enrolling.add_argument("--again", action="store_true")
    asking = commands.add_parser("ask")
    asking.add_argument("--url", action="append", required=True)
    asking.add_argument("--issuer", required=True)
    asking.add_argument("--cert", required=True)
    asking.add_argument("--until")
    asking.add_argument("--duration", type=float, default=30)
    asking.add_argument("--pause", type=float, default=0.02)
    asking.add_argument("--timeout", type=float, default=15)
    args = parser.parse_args()
    result = json.dumps(enroll(args) if args.command == "enroll" else ask(args))
    if args.answer:
        Path(args.answer).write_text(result)
    else:
        print(result)


if __name__ == "__main__":
    main()
