"""A small OCPP 2.1 and 2.0.1 CSMS on security profile 3 (TLS with client certificates) that uses
chargepki as its CA, built on the `ocpp` library (mobilityhouse) and `websockets`. The WebSocket
subprotocol the station offers decides the version (`ocpp2.1` preferred, `ocpp2.0.1`).

What it shows, in the order a charger meets it:
1. TLS: the charger must present a certificate that chains to chargepki's root.
2. Identity binding, before the WebSocket upgrade: the CSMS asks chargepki's
   `POST /api/v1/identity-check` whether that certificate may speak for the station id in the
   URL (`/ocpp/<stationId>`). A valid certificate of station A used as station B, a revoked
   certificate, a disabled device, another environment: refused with HTTP 403 and the reason.
   OCPP requires this check of the CSMS; accepting a station by its id alone is the classic bug.
3. `SignCertificate`: answered `Accepted` at once (OCPP makes the CSMS answer before the CA has
   decided), then the CSR goes to `POST /api/v1/sign`, and the chain (leaf first, root left out)
   is pushed to the charger with `CertificateSigned`. A refusal is logged with chargepki's reason.
4. `GetCertificateStatus`: the charger's `ocspRequestData` goes to `POST /api/v1/ocsp` and the
   base64 DER OCSP response comes back as `ocspResult` (`Accepted`), or `Failed` with the reason.
OCPP 2.1 stations also get:
5. After `BootNotification`, the roots they should hold (`GET /api/v1/install-certificates`: CSMS,
   V2G -2/-20, manufacturer and OEM roots), each pushed with `InstallCertificate`.
6. `SignCertificate` with `V2GCertificate` (ISO 15118-2) or `V2G20Certificate` (ISO 15118-20),
   `requestId` and `hashRootCertificate` passed on to `POST /api/v1/sign`; `CertificateSigned`
   carries the `requestId` back.
7. `GetCertificateChainStatus` (M07): the request goes to `POST /api/v1/certificate-chain-status`
   as it is and its answer back as it is; a refusal answers every entry `Failed`.

Run (see docs/csms-api.md):
    python examples/ocpp_csms/csms.py --port 9000 --cert csms.pem --key csms.key \
        --client-ca chain.pem --api https://localhost:8443 --api-token-file token.txt --api-ca root.pem
The API token comes from a file (--api-token-file, mode 0600) or the CHARGEPKI_API_TOKEN
environment variable, never from the command line (`ps` shows every process's arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
from ocpp import v21
from ocpp.charge_point import camel_to_snake_case, snake_to_camel_case
from ocpp.routing import after, on
from ocpp.v201 import ChargePoint, call, call_result
from ocpp.v201.datatypes import StatusInfoType
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger("csms")


class Refused(Exception):
    """chargepki refused a request; ``reason`` is its machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class ChargepkiApi:
    """The calls a CSMS needs, authenticated with a per-CSMS API token."""

    base: str
    token: str
    ca_file: str

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(
            f"{self.base}/api/v1/{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            verify=self.ca_file,
            timeout=30,
        )
        document: dict[str, Any] = response.json()
        if response.status_code >= 400:
            raise Refused(document.get("reason", str(response.status_code)), document.get("error", ""))
        return document

    def identity_check(self, station_id: str, certificate_pem: str) -> tuple[bool, str]:
        answer = self._post("identity-check", {"chargingStationId": station_id, "clientCertificate": certificate_pem})
        return bool(answer["allowed"]), str(answer.get("reason", ""))

    def sign(
        self,
        station_id: str,
        csr_pem: str,
        certificate_type: str,
        request_id: int | None = None,
        hash_root: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The signed answer: certificateChain, certificateType and (OCPP 2.1) requestId among others."""
        body: dict[str, Any] = {"chargingStationId": station_id, "certificateType": certificate_type, "csr": csr_pem}
        if request_id is not None:
            body["requestId"] = request_id
        if hash_root is not None:
            body["hashRootCertificate"] = hash_root
        return self._post("sign", body)

    def ocsp(self, request_data: dict[str, str]) -> str:
        """OCPP OCSPRequestDataType (camelCase) → the base64 DER OCSP response."""
        return str(self._post("ocsp", {"ocspRequestData": request_data})["ocspResult"])

    def chain_status(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """OCPP 2.1 certificateStatusRequests (camelCase) → certificateStatus (camelCase)."""
        answer = self._post("certificate-chain-status", {"certificateStatusRequests": entries})
        return list(answer["certificateStatus"])

    def install_certificates(self) -> list[dict[str, Any]]:
        """The roots a station of this CSMS's environment should hold (OCPP 2.1 InstallCertificate payloads)."""
        response = requests.get(
            f"{self.base}/api/v1/install-certificates",
            headers={"Authorization": f"Bearer {self.token}"},
            verify=self.ca_file,
            timeout=30,
        )
        document: dict[str, Any] = response.json()
        if response.status_code >= 400:
            raise Refused(document.get("reason", str(response.status_code)), document.get("error", ""))
        return list(document["installCertificates"])


class StationHandlers:
    """What a connected station is answered, in both versions; ``call`` and ``result`` are the
    version's message modules (``ocpp.v201``, ``ocpp.v21``)."""

    call_module: Any = call
    result: Any = call_result
    version = "2.0.1"

    def __init__(self, station_id: str, connection: ServerConnection, api: ChargepkiApi) -> None:
        super().__init__(station_id, connection)  # type: ignore[call-arg]
        self.id: str = station_id
        self.api = api
        self.tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @on("BootNotification")
    def on_boot_notification(self, charging_station: dict[str, Any], reason: str, **_: Any) -> Any:
        log.info("boot %s (%s, %s, OCPP %s)", self.id, charging_station.get("model"), reason, self.version)
        return self.result.BootNotification(current_time=datetime.now(UTC).isoformat(), interval=300, status="Accepted")

    @on("Heartbeat")
    def on_heartbeat(self, **_: Any) -> Any:
        return self.result.Heartbeat(current_time=datetime.now(UTC).isoformat())

    @on("SignCertificate")
    def on_sign_certificate(
        self,
        csr: str,
        certificate_type: str | None = None,
        request_id: int | None = None,
        hash_root_certificate: dict[str, str] | None = None,
        **_: Any,
    ) -> Any:
        kind = certificate_type or "ChargingStationCertificate"
        hash_root = snake_to_camel_case(hash_root_certificate) if hash_root_certificate else None
        self._spawn(self._sign_and_push(csr, kind, request_id, hash_root))
        return self.result.SignCertificate(status="Accepted")

    async def _sign_and_push(
        self, csr: str, kind: str, request_id: int | None, hash_root: dict[str, str] | None
    ) -> None:
        try:
            signed = await asyncio.to_thread(self.api.sign, self.id, csr, kind, request_id, hash_root)
        except (Refused, requests.RequestException, ValueError) as exc:
            log.warning("SignCertificate from %s refused by the CA: %s", self.id, exc)
            return
        fields: dict[str, Any] = {"certificate_chain": signed["certificateChain"], "certificate_type": kind}
        if request_id is not None:  # OCPP 2.1 only: 2.0.1 stations send none
            fields["request_id"] = request_id
        result = await self.call(self.call_module.CertificateSigned(**fields))  # type: ignore[attr-defined]
        log.info("CertificateSigned to %s: %s (%s, requestId %s)", self.id, result.status, kind, request_id)

    @on("GetCertificateStatus")
    async def on_get_certificate_status(self, ocsp_request_data: dict[str, str], **_: Any) -> Any:
        data = ocsp_request_data  # the ocpp library hands it over in snake_case; the API speaks OCPP's names
        request_data = {
            "hashAlgorithm": data["hash_algorithm"],
            "issuerNameHash": data["issuer_name_hash"],
            "issuerKeyHash": data["issuer_key_hash"],
            "serialNumber": data["serial_number"],
            "responderURL": data["responder_url"],
        }
        try:
            ocsp_result = await asyncio.to_thread(self.api.ocsp, request_data)
        except Refused as exc:
            log.warning("GetCertificateStatus from %s refused by the CA: %s", self.id, exc)
            info = StatusInfoType(reason_code=exc.reason[:20], additional_info=str(exc)[:512])
            return self.result.GetCertificateStatus(status="Failed", status_info=info)
        except (requests.RequestException, ValueError, KeyError) as exc:
            log.warning("GetCertificateStatus from %s: the CA is unavailable: %s", self.id, exc)
            info = StatusInfoType(reason_code="CAUnavailable", additional_info=type(exc).__name__)
            return self.result.GetCertificateStatus(status="Failed", status_info=info)
        log.info("GetCertificateStatus for %s: serial %s answered", self.id, request_data["serialNumber"])
        return self.result.GetCertificateStatus(status="Accepted", ocsp_result=ocsp_result)


class Station(StationHandlers, ChargePoint):
    """One connected OCPP 2.0.1 charging station."""


class Station21(StationHandlers, v21.ChargePoint):
    """One connected OCPP 2.1 charging station: the 2.0.1 handlers on 2.1's messages, and what 2.1 adds."""

    call_module = v21.call
    result = v21.call_result
    version = "2.1"

    @after("BootNotification")
    def install_roots(self, **_: Any) -> None:
        """Once the boot is answered: push the roots the station should hold (InstallCertificate)."""
        self._spawn(self._install_roots())

    async def _install_roots(self) -> None:
        try:
            bundle = await asyncio.to_thread(self.api.install_certificates)
        except (Refused, requests.RequestException, ValueError, KeyError) as exc:
            log.warning("no roots to install on %s: %s", self.id, exc)
            return
        for entry in bundle:
            install = self.call_module.InstallCertificate(
                certificate_type=entry["certificateType"], certificate=entry["certificate"]
            )
            answer = await self.call(install)  # type: ignore[attr-defined]
            log.info(
                "InstallCertificate %s %s on %s: %s", entry["certificateType"], entry["name"], self.id, answer.status
            )

    @on("GetCertificateChainStatus")
    async def on_get_certificate_chain_status(self, certificate_status_requests: list[dict[str, Any]], **_: Any) -> Any:
        entries = snake_to_camel_case(certificate_status_requests)  # the API speaks OCPP's names
        try:
            statuses = await asyncio.to_thread(self.api.chain_status, entries)
        except (Refused, requests.RequestException, ValueError, KeyError) as exc:
            # The response has no status of its own: every entry Failed, to be asked again in a minute.
            log.warning("GetCertificateChainStatus from %s refused by the CA: %s", self.id, exc)
            again = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
            statuses = [
                {"certificateHashData": entry["certificateHashData"], "source": entry["source"], "status": "Failed",
                 "nextUpdate": again}
                for entry in entries
            ]  # fmt: skip
        summary = ", ".join(f"{status['source']} {status['status']}" for status in statuses)
        log.info("GetCertificateChainStatus for %s: %s", self.id, summary)
        return self.result.GetCertificateChainStatus(certificate_status=camel_to_snake_case(statuses))


STATIONS: dict[str, type[StationHandlers]] = {"ocpp2.1": Station21, "ocpp2.0.1": Station}  # preferred first


def station_id_of(path: str) -> str:
    return path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]


def make_server_tls(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED  # security profile 3: no client certificate, no connection
    context.load_verify_locations(client_ca)
    return context


TOKEN_ENV = "CHARGEPKI_API_TOKEN"


def read_token(path: str | None) -> str:
    """The API token from a file or the environment: a command-line argument would show in `ps`."""
    token = Path(path).read_text(encoding="utf-8").strip() if path else os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise SystemExit(f"no API token: give --api-token-file or set {TOKEN_ENV}")
    return token


async def main(args: argparse.Namespace) -> None:
    api = ChargepkiApi(args.api, read_token(args.api_token_file), args.api_ca)

    async def check_identity(connection: ServerConnection, request: Request) -> Response | None:
        """Before the upgrade: may this TLS client certificate speak for the station in the URL?"""
        station_id = station_id_of(request.path)
        ssl_object = connection.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if not der:
            return connection.respond(HTTPStatus.FORBIDDEN, "client certificate required\n")
        try:
            allowed, reason = await asyncio.to_thread(api.identity_check, station_id, ssl.DER_cert_to_PEM_cert(der))
        except (Refused, requests.RequestException, ValueError) as exc:
            log.warning("identity check for %s failed: %s", station_id, exc)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "identity check unavailable\n")
        if not allowed:
            log.warning("refused %s: %s", station_id, reason)
            return connection.respond(HTTPStatus.FORBIDDEN, f"refused: {reason}\n")
        return None

    async def handler(connection: ServerConnection) -> None:
        kind = STATIONS.get(connection.subprotocol or "", Station)
        station = kind(station_id_of(connection.request.path if connection.request else ""), connection, api)
        log.info("connected %s (%s)", station.id, connection.subprotocol)
        try:
            await station.start()  # type: ignore[attr-defined]
        except ConnectionClosed as exc:
            log.info("disconnected %s (%s)", station.id, exc.rcvd.code if exc.rcvd else "no close frame")

    tls = make_server_tls(args.cert, args.key, args.client_ca)
    async with serve(
        handler, args.host, args.port, ssl=tls, subprotocols=list(STATIONS), process_request=check_identity
    ) as server:
        log.info("CSMS listening on wss://%s:%d/ocpp/<stationId>", args.host, args.port)
        await server.serve_forever()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--cert", required=True, help="the CSMS's TLS certificate chain (PEM, leaf first)")
    parser.add_argument("--key", required=True, help="its private key (PEM)")
    parser.add_argument("--client-ca", required=True, help="chargepki's issuing CA + root (PEM)")
    parser.add_argument("--api", required=True, help="chargepki's EST/API base URL, e.g. https://localhost:8443")
    parser.add_argument(
        "--api-token-file", help=f"file holding this CSMS's API token (`chargepki csms token`); else ${TOKEN_ENV}"
    )
    parser.add_argument("--api-ca", required=True, help="root that verifies chargepki's API server (PEM)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main(parse_args()))
