"""A charging station simulator for the example CSMS: it enrolls at the factory over EST, then
connects to the CSMS with its own certificate (OCPP 2.0.1, security profile 3), asks for its
certificate's OCSP status through `GetCertificateStatus` (and verifies the OCSP response), and can
renew that certificate through `SignCertificate` / `CertificateSigned`, as OCPP A02 describes.

    python examples/ocpp_csms/charger.py enroll --est https://localhost:8443/.well-known/est \
        --root root.pem --id CP-0001 --secret-file secret.txt --org "Acme Charging" --dir cp1
    python examples/ocpp_csms/charger.py connect --csms wss://localhost:9000/ocpp \
        --root root.pem --id CP-0001 --dir cp1 [--renew] [--as OTHER-ID]

The one-time secret comes from a file (--secret-file) or the CHARGEPKI_SECRET environment
variable, never from the command line (`ps` shows every process's arguments).

Exit status: 0 connected, own certificate `good` by OCSP (and renewed, with --renew), 3 refused
by the CSMS, 1 anything else (an OCSP answer that is not a verified `good` among them).
The key is generated here and never leaves the directory (a real charger keeps it in its secure
element); files: key.pem, cert.pem (leaf), chain.pem (leaf + issuing CA).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import ssl
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from ocpp.routing import after, on
from ocpp.v201 import ChargePoint, call
from ocpp.v201 import call_result as result
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

REFUSED = 3


def new_key_and_csr(station_id: str, organization: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, station_id),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def save_identity(directory: Path, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "key.pem").write_bytes(key_pem)
    (directory / "key.pem").chmod(0o600)
    (directory / "cert.pem").write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    (directory / "chain.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))


SECRET_ENV = "CHARGEPKI_SECRET"


def read_secret(path: str | None) -> str:
    """The one-time secret from a file or the environment: a command-line argument would show in `ps`."""
    secret = Path(path).read_text(encoding="utf-8").strip() if path else os.environ.get(SECRET_ENV, "").strip()
    if not secret:
        raise SystemExit(f"no one-time secret: give --secret-file or set {SECRET_ENV}")
    return secret


def enroll(args: argparse.Namespace) -> int:
    """Factory enrollment: EST simpleenroll with the device's one-time secret (RFC 7030)."""
    key, csr_pem = new_key_and_csr(args.id, args.org)
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    response = requests.post(
        f"{args.est}/simpleenroll",
        data=base64.encodebytes(der),
        headers={"Content-Type": "application/pkcs10"},
        auth=(args.id, read_secret(args.secret_file)),
        verify=args.root,
        timeout=30,
    )
    if response.status_code != 200:
        print(f"enrollment refused: {response.status_code} {response.text.strip()}", file=sys.stderr)
        return REFUSED
    (leaf,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    chain_response = requests.get(f"{args.est}/cacerts", verify=args.root, timeout=30)
    chain_response.raise_for_status()
    cas = pkcs7.load_der_pkcs7_certificates(base64.b64decode(chain_response.content))
    issuing = [ca for ca in cas if ca.subject == leaf.issuer]
    save_identity(Path(args.dir), key, [leaf, *issuing])
    print(f"enrolled {args.id}: serial {leaf.serial_number:x}")
    return 0


class Station(ChargePoint):
    """The charger's side of the OCPP connection: it answers CertificateSigned."""

    def __init__(self, station_id: str, connection: Any, pending_key: ec.EllipticCurvePrivateKey | None) -> None:
        super().__init__(station_id, connection)
        self.pending_key = pending_key
        self.accepted: list[x509.Certificate] | None = None
        self.signed: asyncio.Future[list[x509.Certificate]] = asyncio.get_running_loop().create_future()

    @on("CertificateSigned")
    def on_certificate_signed(self, certificate_chain: str, **_: Any) -> Any:
        chain = x509.load_pem_x509_certificates(certificate_chain.encode())
        ours = self.pending_key is not None and chain[0].public_key() == self.pending_key.public_key()
        if ours and len(chain) > 1:
            chain[0].verify_directly_issued_by(chain[1])  # raises: a chain we cannot use is rejected
            self.accepted = chain
            return result.CertificateSigned(status="Accepted")
        return result.CertificateSigned(status="Rejected")

    @after("CertificateSigned")
    def installed(self, **_: Any) -> None:
        """Runs once the answer has gone out: only then may the station switch certificates."""
        if self.accepted and not self.signed.done():
            self.signed.set_result(self.accepted)


class StatusError(Exception):
    """The CSMS's GetCertificateStatus answer is not a verified OCSP response saying `good`."""


def ocsp_request_data(certificate: x509.Certificate, issuer: x509.Certificate) -> dict[str, str]:
    """OCPP OCSPRequestDataType for ``certificate`` (SHA-256 CertID, serial in hex without leading zeros)."""
    request = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA256()).build()
    try:
        access = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        urls = [d.access_location.value for d in access if d.access_method == AuthorityInformationAccessOID.OCSP]
    except x509.ExtensionNotFound:
        urls = []
    return {
        "hash_algorithm": "SHA256",
        "issuer_name_hash": request.issuer_name_hash.hex().upper(),
        "issuer_key_hash": request.issuer_key_hash.hex().upper(),
        "serial_number": f"{request.serial_number:X}",
        "responder_url": str(urls[0]) if urls else "",
    }


def _verify_signature(signer: x509.Certificate, response: ocsp.OCSPResponse) -> None:
    key = signer.public_key()
    algorithm = response.signature_hash_algorithm
    if algorithm is None:
        raise StatusError("the OCSP response names no signature hash")
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm)
    else:
        raise StatusError(f"unexpected OCSP signer key {type(key).__name__}")


def verify_ocsp(ocsp_result: str, certificate: x509.Certificate, issuer: x509.Certificate) -> str:
    """Check the base64 DER OCSP response is about ``certificate`` and signed by its issuer or a
    delegated OCSP signer the issuer certified; returns the status (good, revoked, unknown)."""
    response = ocsp.load_der_ocsp_response(base64.b64decode(ocsp_result, validate=True))
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise StatusError(f"OCSP response status {response.response_status.name}")
    expected = ocsp_request_data(certificate, issuer)
    if (
        response.serial_number != certificate.serial_number
        or response.issuer_name_hash.hex().upper() != expected["issuer_name_hash"]
        or response.issuer_key_hash.hex().upper() != expected["issuer_key_hash"]
    ):
        raise StatusError("the OCSP response is about another certificate")
    signer = issuer
    if response.certificates:  # a delegated responder: certified by the issuer for OCSP signing
        signer = response.certificates[0]
        signer.verify_directly_issued_by(issuer)
        usage = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
            raise StatusError("the OCSP responder's certificate lacks id-kp-OCSPSigning")
    _verify_signature(signer, response)
    if response.next_update_utc is not None and response.next_update_utc < datetime.now(UTC):
        raise StatusError("the OCSP response is stale")
    return str(response.certificate_status.name.lower())


async def check_own_status(station: Station, directory: Path) -> str:
    """GetCertificateStatus for the station's own certificate; the verified status."""
    certificate, issuer, *_ = x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes())
    answer = await station.call(call.GetCertificateStatus(ocsp_request_data=ocsp_request_data(certificate, issuer)))
    if answer.status != "Accepted" or not answer.ocsp_result:
        raise StatusError(f"GetCertificateStatus {answer.status} {answer.status_info}")
    return verify_ocsp(answer.ocsp_result, certificate, issuer)


def client_tls(root: str, directory: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=root)
    context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
    return context


async def session(args: argparse.Namespace, directory: Path, renew: bool) -> int:
    station_id = args.as_id or args.id
    pending = new_key_and_csr(args.id, args.org) if renew else None
    try:
        async with connect(
            f"{args.csms}/{station_id}",
            ssl=client_tls(args.root, directory),
            subprotocols=["ocpp2.0.1"],
            server_hostname=args.server_name,
        ) as connection:
            station = Station(station_id, connection, pending[0] if pending else None)
            runner = asyncio.create_task(station.start())
            boot = await station.call(
                call.BootNotification(
                    charging_station={"model": "SimCharger", "vendor_name": "chargepki-example"}, reason="PowerUp"
                )
            )
            print(f"{station_id}: BootNotification {boot.status}")
            state = await check_own_status(station, directory)
            print(f"{station_id}: GetCertificateStatus Accepted, OCSP says {state} (signature verified)")
            if state != "good":
                runner.cancel()
                return 1
            if pending is not None:
                answer = await station.call(
                    call.SignCertificate(csr=pending[1].decode(), certificate_type="ChargingStationCertificate")
                )
                print(f"{station_id}: SignCertificate {answer.status}")
                chain = await asyncio.wait_for(station.signed, timeout=args.timeout)
                save_identity(directory, pending[0], chain)
                print(f"{station_id}: installed a new certificate, serial {chain[0].serial_number:x}")
            runner.cancel()
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace").strip()
        print(f"{station_id}: refused by the CSMS: {exc.response.status_code} {body}", file=sys.stderr)
        return REFUSED
    except ssl.SSLError as exc:
        print(f"{station_id}: TLS refused: {exc}", file=sys.stderr)
        return REFUSED
    except (StatusError, InvalidSignature, ValueError, x509.ExtensionNotFound) as exc:
        print(f"{station_id}: certificate status not verified: {exc}", file=sys.stderr)
        return 1
    return 0


async def connect_command(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    status = await session(args, directory, args.renew)
    if status == 0 and args.renew:
        # Prove the new certificate works: reconnect with it.
        status = await session(args, directory, renew=False)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    enroll_parser = commands.add_parser("enroll", help="factory enrollment over EST with a one-time secret")
    enroll_parser.add_argument("--est", required=True, help="EST base URL, e.g. https://localhost:8443/.well-known/est")
    enroll_parser.add_argument("--secret-file", help=f"file holding the one-time secret; else ${SECRET_ENV}")
    connect_parser = commands.add_parser("connect", help="connect to the CSMS; --renew renews through SignCertificate")
    connect_parser.add_argument("--csms", required=True, help="e.g. wss://localhost:9000/ocpp")
    connect_parser.add_argument("--renew", action="store_true")
    connect_parser.add_argument("--as", dest="as_id", help="claim another station id (an impostor, for the demo)")
    connect_parser.add_argument("--server-name", default="localhost", help="the CSMS certificate's host name")
    connect_parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for CertificateSigned")
    for sub in (enroll_parser, connect_parser):
        sub.add_argument("--root", required=True, help="chargepki's root certificate (PEM)")
        sub.add_argument("--id", required=True, help="the station id = the certificate's CN")
        sub.add_argument("--org", default="Acme Charging", help="the organisation the CA requires in O")
        sub.add_argument("--dir", required=True, help="where the station keeps its key and certificate")
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    code = enroll(args) if args.command == "enroll" else asyncio.run(connect_command(args))
    print(f"done in {(datetime.now(UTC) - started).total_seconds():.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
