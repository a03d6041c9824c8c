"""An OCPP 2.1 charging station simulator for the example CSMS: with the charger certificate
`charger.py enroll` gave it, it connects with the `ocpp2.1` subprotocol (security profile 3), takes the
roots the CSMS installs (`InstallCertificate`: CSMS, V2G, manufacturer and OEM roots), obtains its two
SECC certificates through `SignCertificate` — an ISO 15118-2 one (`V2GCertificate`, P-256) and an
ISO 15118-20 one (`V2G20Certificate`, P-521), each with a `requestId` and the installed V2G root of its
version as `hashRootCertificate` — and asks for both chains' status with `GetCertificateChainStatus`
(the leaf by OCSP, the sub-CAs by CRL), as an ISO 15118-20 station does before its TLS handshake.

    python examples/ocpp_csms/charger.py enroll ... --id CP-0001 --dir cp1      # the charger certificate
    python examples/ocpp_csms/charger21.py --csms wss://localhost:9000/ocpp --root root.pem \\
        --id CP-0001 --dir cp1 --secc-id 'DE*ACM*E0001*1'

Exit status: 0 both SECC certificates installed and every chain entry `Good`, 3 refused by the CSMS,
1 anything else. Files in --dir: secc-15118-2.key/.pem and secc-15118-20.key/.pem (the key, and the
chain leaf first as CertificateSigned brought it); the keys are generated here and never leave it.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from charger import REFUSED, client_tls
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from ocpp.routing import after, on
from ocpp.v21 import ChargePoint, call
from ocpp.v21 import call_result as result
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


@dataclass(frozen=True)
class Version:
    """One ISO 15118 version's SECC certificate as OCPP 2.1 asks for it."""

    iso: str
    certificate_type: str  # CertificateSigningUseEnumType
    curve: ec.EllipticCurve
    digest: hashes.HashAlgorithm
    request_id: int


VERSIONS = (
    Version("15118-2", "V2GCertificate", ec.SECP256R1(), hashes.SHA256(), 1),
    Version("15118-20", "V2G20Certificate", ec.SECP521R1(), hashes.SHA512(), 2),
)


class StatusError(Exception):
    """A certificate, a chain or a status the station cannot accept."""


@dataclass
class Pending:
    version: Version
    key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    chain: asyncio.Future[list[x509.Certificate]]
    accepted: list[x509.Certificate] | None = None


@dataclass
class Installed:
    roots: dict[str, list[x509.Certificate]] = field(default_factory=dict)  # by InstallCertificateUseEnumType
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def v2g_root(self, curve: ec.EllipticCurve) -> x509.Certificate | None:
        for root in self.roots.get("V2GRootCertificate", []):
            key = root.public_key()
            if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve.name:
                return root
        return None


class Station(ChargePoint):
    """The station's side: it installs roots and takes the chains CertificateSigned brings."""

    def __init__(self, station_id: str, connection: Any) -> None:
        super().__init__(station_id, connection)
        self.installed = Installed()
        self.pending: dict[int, Pending] = {}

    @on("InstallCertificate")
    def on_install_certificate(self, certificate_type: str, certificate: str, **_: Any) -> Any:
        root = x509.load_pem_x509_certificate(certificate.encode())
        try:
            root.verify_directly_issued_by(root)  # a root: self-signed (a real station also checks its policy)
        except (InvalidSignature, ValueError, TypeError):
            return result.InstallCertificate(status="Rejected")
        self.installed.roots.setdefault(certificate_type, []).append(root)
        print(f"{self.id}: installed {certificate_type} {root.subject.rfc4514_string()}")
        self.installed.changed.set()
        return result.InstallCertificate(status="Accepted")

    @on("CertificateSigned")
    def on_certificate_signed(
        self, certificate_chain: str, certificate_type: str | None = None, request_id: int | None = None, **_: Any
    ) -> Any:
        pending = self.pending.get(request_id) if request_id is not None else None
        if pending is None or certificate_type != pending.version.certificate_type:
            return result.CertificateSigned(status="Rejected")
        chain = x509.load_pem_x509_certificates(certificate_chain.encode())
        try:
            verify_chain(chain, pending.root, pending.key)
        except (StatusError, InvalidSignature, ValueError, TypeError) as exc:
            print(f"{self.id}: CertificateSigned {request_id} rejected: {exc}", file=sys.stderr)
            return result.CertificateSigned(status="Rejected")
        pending.accepted = chain
        return result.CertificateSigned(status="Accepted")

    @after("CertificateSigned")
    def installed_chain(self, request_id: int | None = None, **_: Any) -> None:
        """Once the answer has gone out, the chain is the station's."""
        pending = self.pending.get(request_id) if request_id is not None else None
        if pending is not None and pending.accepted and not pending.chain.done():
            pending.chain.set_result(pending.accepted)


def verify_chain(chain: list[x509.Certificate], root: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Leaf first, each certificate signed by the next, the last by ``root``; the leaf is for ``key``."""
    if not chain or chain[0].public_key() != key.public_key():
        raise StatusError("the chain's leaf is not for our key")
    for certificate, issuer in zip(chain, [*chain[1:], root], strict=True):
        certificate.verify_directly_issued_by(issuer)


def hash_data(certificate: x509.Certificate, issuer: x509.Certificate) -> dict[str, str]:
    """OCPP CertificateHashDataType of ``certificate`` (SHA-256); a root is its own issuer."""
    request = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA256()).build()
    return {
        "hash_algorithm": "SHA256",
        "issuer_name_hash": request.issuer_name_hash.hex(),
        "issuer_key_hash": request.issuer_key_hash.hex(),
        "serial_number": f"{request.serial_number:X}",
    }


def status_urls(certificate: x509.Certificate) -> list[str]:
    """Where the certificate says its status is: CRL distribution points, else its OCSP responder."""
    urls = []
    try:
        points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        urls += [
            name.value
            for point in points
            for name in point.full_name or []
            if isinstance(name, x509.UniformResourceIdentifier)
        ]
    except x509.ExtensionNotFound:
        pass
    try:
        access = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        urls += [d.access_location.value for d in access if d.access_method == AuthorityInformationAccessOID.OCSP]
    except x509.ExtensionNotFound:
        pass
    return [str(url) for url in urls][:5] or ["http://localhost/"]


async def obtain(station: Station, version: Version, args: argparse.Namespace) -> list[x509.Certificate]:
    """SignCertificate for one SECC certificate under the installed V2G root of its version."""
    root = station.installed.v2g_root(version.curve)
    if root is None:
        raise StatusError(f"no {version.iso} V2G root installed")
    key = ec.generate_private_key(version.curve)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, args.org), x509.NameAttribute(NameOID.COMMON_NAME, args.secc_id)]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, version.digest)
    pending = Pending(version, key, root, asyncio.get_running_loop().create_future())
    station.pending[version.request_id] = pending
    answer = await station.call(
        call.SignCertificate(
            csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
            certificate_type=version.certificate_type,
            request_id=version.request_id,
            hash_root_certificate=hash_data(root, root),
        )
    )
    print(f"{station.id}: SignCertificate {version.certificate_type} requestId {version.request_id} {answer.status}")
    chain = await asyncio.wait_for(pending.chain, timeout=args.timeout)
    directory = Path(args.dir)
    key_file = directory / f"secc-{version.iso}.key"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    (directory / f"secc-{version.iso}.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    )
    curve = chain[0].public_key().curve.name  # type: ignore[union-attr]
    print(f"{station.id}: installed the {version.iso} SECC certificate, serial {chain[0].serial_number:X} ({curve})")
    return chain


async def chain_status(
    station: Station, version: Version, chain: list[x509.Certificate], root: x509.Certificate
) -> bool:
    """GetCertificateChainStatus for the chain below the root: the leaf by OCSP, the sub-CAs by CRL."""
    issuers = [*chain[1:], root]
    entries = [
        {
            "certificate_hash_data": hash_data(certificate, issuer),
            "source": "OCSP" if number == 0 else "CRL",
            "urls": status_urls(certificate),
        }
        for number, (certificate, issuer) in enumerate(zip(chain, issuers, strict=True))
    ][:4]
    answer = await station.call(call.GetCertificateChainStatus(certificate_status_requests=entries))
    statuses = answer.certificate_status
    good = len(statuses) == len(entries)
    for entry, status in zip(entries, statuses, strict=False):
        same = status["certificate_hash_data"] == entry["certificate_hash_data"] and status["source"] == entry["source"]
        good = good and same and status["status"] == "Good"
        serial = entry["certificate_hash_data"]["serial_number"]
        print(f"{station.id}: {version.iso} chain status {serial} by {status['source']}: {status['status']} "
              f"until {status['next_update']}")  # fmt: skip
    return good


async def session(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        async with connect(
            f"{args.csms}/{args.id}",
            ssl=client_tls(args.root, directory),
            subprotocols=["ocpp2.1"],
            server_hostname=args.server_name,
        ) as connection:
            if connection.subprotocol != "ocpp2.1":
                raise StatusError(f"the CSMS chose {connection.subprotocol}, not ocpp2.1")
            station = Station(args.id, connection)
            runner = asyncio.create_task(station.start())
            boot = await station.call(
                call.BootNotification(
                    charging_station={"model": "SimCharger21", "vendor_name": "chargepki-example"}, reason="PowerUp"
                )
            )
            print(f"{args.id}: BootNotification {boot.status} (OCPP 2.1)")
            deadline = asyncio.get_running_loop().time() + args.timeout
            while not all(station.installed.v2g_root(v.curve) for v in VERSIONS):  # the CSMS installs the roots
                station.installed.changed.clear()
                await asyncio.wait_for(station.installed.changed.wait(), deadline - asyncio.get_running_loop().time())
            good = True
            for version in VERSIONS:
                chain = await obtain(station, version, args)
                root = station.installed.v2g_root(version.curve)
                assert root is not None
                good = await chain_status(station, version, chain, root) and good
            runner.cancel()
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace").strip()
        print(f"{args.id}: refused by the CSMS: {exc.response.status_code} {body}", file=sys.stderr)
        return REFUSED
    except ssl.SSLError as exc:
        print(f"{args.id}: TLS refused: {exc}", file=sys.stderr)
        return REFUSED
    except (StatusError, TimeoutError, InvalidSignature, ValueError) as exc:
        print(f"{args.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0 if good else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csms", required=True, help="e.g. wss://localhost:9000/ocpp")
    parser.add_argument("--root", required=True, help="chargepki's root certificate (PEM): verifies the CSMS")
    parser.add_argument("--id", required=True, help="the station id = its charger certificate's CN")
    parser.add_argument("--dir", required=True, help="where `charger.py enroll` put its key and certificate")
    parser.add_argument("--secc-id", required=True, help="the SECC ID both SECC certificates are for (their CN)")
    parser.add_argument("--org", default="Acme Charging", help="the organisation the CA requires in O")
    parser.add_argument("--server-name", default="localhost", help="the CSMS certificate's host name")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the CSMS each time")
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    code = asyncio.run(session(args))
    print(f"done in {(datetime.now(UTC) - started).total_seconds():.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
