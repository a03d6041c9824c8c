"""The CSMS API under ``/api/v1/``: JSON over the HTTPS of ``chargepki serve est``.

Each view parses and validates its input (against the OpenAPI document's own schemas), calls one
core function and formats the answer. Every call is authenticated (a ``csms-client`` certificate
from the TLS socket or the trusted proxy header, or an API token; failures counted and locked out
per address or certificate like EST's) and audited with its caller and outcome; every failure is
``{"error": …, "reason": …}`` with a 4xx or 503, never a 500 page.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any

from cryptography import x509
from flask import Blueprint, Flask, Response, g, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ca.audit.checkpoints import CheckpointTimer
from ca.authorities.rotation import OCPP_21, install_certificates
from ca.enrollment.identity import check_identity
from ca.errors import ChargepkiError, InputError, NotFoundError, StoreError, one_line
from ca.kinds import JobState
from ca.ocpp_limits import OCSP_RESULT_CHARS
from ca.registry import csms
from ca.registry.csms import Caller, authenticate_limited
from ca.registry.csms_jobs import claim_next, enqueue, get_job, job_certificate, process
from ca.status.certificates import ocpp_chain_pem, standing
from ca.store.engine import begin_reads
from ca.store.models import Authority, Certificate, CsmsSignJob, Device
from ocsp.certid import issuer_hashes
from ocsp.chain_status import StatusRequest
from ocsp.ocpp import find_by_hash, find_root, parse_hash_data
from web.caller import client_address, identify
from web.openapi import DOCUMENT, check, path_validator, query_validator, validator
from web.responses import UnsupportedMediaType, json_body, json_error
from web.runtime import runtime, runtime_of

api = Blueprint("api", __name__, url_prefix="/api/v1")
log = logging.getLogger("chargepki.api")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
POLL_AFTER = "1"  # seconds a CSMS should wait before polling a pending job again

View = Callable[..., Response]


def _endpoint(operation: str) -> Callable[[View], View]:
    """Authenticate, run the view with (session, caller), turn any failure into JSON, audit the call."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapper(**kwargs: Any) -> Response:
            g.api_subject, g.api_outcome = None, {}
            caller: Caller | None = None
            worker = runtime()
            g.api_address = client_address(worker.settings)  # the client behind the front door, not the proxy
            with worker.pki.store.session() as session:
                try:
                    presented = identify(worker.settings)
                    begin_reads(session)  # on SQLite, checking credentials takes no writer lock
                    caller = authenticate_limited(
                        session,
                        token=presented.token,
                        certificate_der=presented.certificate_der,
                        address=presented.address,
                        limits=worker.enrollment.limits,
                    )
                    session.commit()  # end the read: other sessions (the OCSP signer) may write next
                    response = view(session, caller, **kwargs)
                except Exception as exc:
                    session.rollback()
                    response = json_error(exc)
                    g.api_outcome = {**g.api_outcome, "reason": (response.get_json(silent=True) or {}).get("reason")}
                if g.get("api_audited") != response.status_code:  # not already with what the call wrote
                    worker.audit_call(
                        session,
                        caller,
                        operation,
                        address=g.api_address,
                        subject=g.api_subject,
                        outcome={"status": response.status_code, **g.api_outcome},
                        interface="api",
                    )
            return response

        return wrapper

    return decorate


def _json_request(schema: str) -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {request.mimetype or 'none'}")
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InputError("the body is not valid JSON", code="malformed_json") from None
    check(validator(schema), body)
    return body


def _query(path: str, method: str) -> dict[str, str]:
    repeated = [name for name in request.args if len(request.args.getlist(name)) > 1]
    if repeated:
        raise InputError(f"query parameter {repeated[0]!r} given more than once", code="bad_value")
    query = request.args.to_dict()
    check(query_validator(path, method), query)
    return query


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _signed(
    session: Session, certificate: Certificate, certificate_type: str, request_id: int | None
) -> dict[str, Any]:
    """What CertificateSignedRequest needs (certificateType, certificateChain, requestId), and more."""
    signed: dict[str, Any] = {"certificateType": certificate_type}
    if request_id is not None:
        signed["requestId"] = request_id
    return {
        **signed,
        "certificateChain": ocpp_chain_pem(session, certificate),
        "serialNumber": certificate.serial,
        "fingerprintSha256": certificate.fingerprint_sha256,
        "notAfter": _iso(certificate.not_after),
    }


def _root(session: Session, caller: Caller, hash_data: dict[str, str] | None) -> Authority | None:
    """The root an OCPP 2.1 ``hashRootCertificate`` names among the caller's environment's (None: not given)."""
    if hash_data is None:
        return None
    cert_id = parse_hash_data(
        hash_data["hashAlgorithm"], hash_data["issuerNameHash"], hash_data["issuerKeyHash"], hash_data["serialNumber"]
    )
    root = find_root(session, cert_id, caller.environment)
    session.commit()  # end the read
    if root is None:
        raise NotFoundError(
            "hashRootCertificate names no root certificate of this CSMS's environment", code="unknown_root"
        )
    g.api_outcome = {**g.api_outcome, "root": root.name}
    return root


# -- signing -------------------------------------------------------------------------------------------
@api.post("/sign")
@_endpoint("sign")
def sign(session: Session, caller: Caller) -> Response:
    query = _query("/api/v1/sign", "post")
    body = _json_request("SignRequest")
    station = body["chargingStationId"]
    certificate_type = body.get("certificateType", "ChargingStationCertificate")
    request_id = body.get("requestId")
    g.api_subject = station
    g.api_outcome = {"certificate_type": certificate_type}
    if request_id is not None:
        g.api_outcome["request_id"] = request_id
    root = _root(session, caller, body.get("hashRootCertificate"))
    if query.get("async") in ("1", "true"):
        job = enqueue(session, caller, station, certificate_type, body["csr"], request_id=request_id, root=root)
        g.api_outcome = {**g.api_outcome, "job": job.public_id}
        runner = runtime().jobs
        if runner is not None:
            runner.wake()
        return _job_response(session, job)
    worker = runtime()
    worker.sweep(session)
    session.commit()  # end what was read so far: the signing's checks read without SQLite's writer lock,
    begin_reads(session)  # and its writes join the group commit, as on the EST routes
    work = worker.work(session, caller.actor)
    # The call's audit entry commits with the certificate (one write fewer per call). Read here, not in
    # ``audited``: a group commit's leader may run it in another request's thread.
    address, signed, written = g.api_address, {"status": 200, **g.api_outcome}, []

    def audited(tx: Session, row: Certificate) -> None:
        outcome = {**signed, "serial": row.serial}
        csms.call_entry(caller, "sign", address=address, subject=station, outcome=outcome, now=work.now)(tx)
        written.append(row.serial)  # in the record's transaction: it committed, since the signing returned

    certificate = csms.sign(
        work,
        caller=caller,
        charging_station_id=station,
        certificate_type=certificate_type,
        csr=body["csr"].encode("utf-8"),
        settings=worker.enrollment,
        root=root,
        before_commit=audited,
    )
    if written:
        g.api_audited = 200  # the wrapper audits the call again only if its answer is not that 200
    g.api_outcome = {**g.api_outcome, "serial": certificate.serial}
    session.commit()  # the session holds the certificate only (nothing to write, nothing expires)
    begin_reads(session)  # so the chain is read without the writer lock too
    return json_body(_signed(session, certificate, certificate_type, request_id))


@api.get("/sign/<job_id>")
@_endpoint("sign-job")
def sign_job(session: Session, caller: Caller, job_id: str) -> Response:
    _query("/api/v1/sign/{jobId}", "get")
    if not path_validator("/api/v1/sign/{jobId}", "get", "jobId").is_valid(job_id) or not _JOB_ID.fullmatch(job_id):
        raise NotFoundError("no such signing job", code="unknown_job")
    g.api_subject = job_id
    return _job_response(session, get_job(session, caller, job_id))


def _job_response(session: Session, job: CsmsSignJob) -> Response:
    location = url_for("api.sign_job", job_id=job.public_id)
    body: dict[str, Any] = {"jobId": job.public_id, "location": location}
    if job.state == JobState.SIGNED:
        signed = _signed(session, job_certificate(session, job), job.certificate_type, job.request_id)
        return json_body({**body, "status": "signed", **signed})
    if job.request_id is not None:
        body["requestId"] = job.request_id
    if job.state == JobState.REFUSED:
        return json_body({**body, "status": "refused", "error": job.error or "", "reason": job.reason or "refused"})
    return json_body({**body, "status": "pending"}, 202, {"Location": location, "Retry-After": POLL_AFTER})


# -- lookups -------------------------------------------------------------------------------------------
@api.get("/certificates/by-hash")
@_endpoint("lookup")
def certificate_by_hash(session: Session, caller: Caller) -> Response:
    query = _query("/api/v1/certificates/by-hash", "get")
    cert_id = parse_hash_data(
        query["hashAlgorithm"], query["issuerNameHash"], query["issuerKeyHash"], query["serialNumber"]
    )
    g.api_subject = query["serialNumber"].upper()
    return json_body(_certificate_info(session, caller, find_by_hash(session, cert_id)))


@api.get("/certificates/<fingerprint>")
@_endpoint("lookup")
def certificate_by_fingerprint(session: Session, caller: Caller, fingerprint: str) -> Response:
    _query("/api/v1/certificates/{fingerprint}", "get")
    normalised = fingerprint.replace(":", "").lower()
    documented = path_validator("/api/v1/certificates/{fingerprint}", "get", "fingerprint").is_valid(fingerprint)
    if not documented or not _FINGERPRINT.fullmatch(normalised):
        raise InputError("the fingerprint must be 64 hex digits (SHA-256), colons allowed", code="bad_fingerprint")
    g.api_subject = normalised
    found = session.scalar(select(Certificate).where(Certificate.fingerprint_sha256 == normalised))
    return json_body(_certificate_info(session, caller, found))


def _certificate_info(session: Session, caller: Caller, certificate: Certificate | None) -> dict[str, Any]:
    """Status, device, validity and chain of one of the caller's environment's certificates."""
    if (
        certificate is None
        or certificate.status not in ("valid", "revoked")
        or certificate.authority.environment != caller.environment
    ):
        raise NotFoundError("no such certificate in this CSMS's environment", code="unknown_certificate")
    state = standing(certificate, datetime.now(UTC))
    authority = certificate.authority
    device = session.get(Device, certificate.device_id) if certificate.device_id is not None else None
    info: dict[str, Any] = {
        "serialNumber": certificate.serial,
        "fingerprintSha256": certificate.fingerprint_sha256,
        "status": state.status,
        "profile": certificate.profile,
        "subject": certificate.subject,
        "issuer": authority.name,
        "environment": authority.environment,
        "notBefore": _iso(certificate.not_before),
        "notAfter": _iso(certificate.not_after),
        "device": None
        if device is None
        else {"chargingStationId": device.serial, "enabled": device.enabled, "environment": device.environment},
        "certificateChain": ocpp_chain_pem(session, certificate),
        "certificateHashData": _hash_data(authority, certificate),
    }
    if state.status == "revoked":
        info["revocationReason"] = state.reason
        if state.revoked_at is not None:
            info["revocationTime"] = _iso(state.revoked_at)
    g.api_outcome = {"serial": certificate.serial, "status": state.status}
    return info


def _hash_data(issuer: Authority, certificate: Certificate | Authority) -> list[dict[str, str]]:
    """OCPP's CertificateHashData of ``certificate`` (issued by ``issuer``; a root is its own issuer), per algorithm."""
    return [
        {
            "hashAlgorithm": hashed.hash_algorithm.upper(),
            "issuerNameHash": hashed.name_hash.hex(),
            "issuerKeyHash": hashed.key_hash.hex(),
            "serialNumber": certificate.serial,
        }
        for hashed in issuer_hashes(x509.load_der_x509_certificate(issuer.certificate_der))
        if hashed.hash_algorithm != "sha1"  # OCPP 2.0.1 and 2.1 know SHA256/384/512 only
    ]


# -- OCSP ----------------------------------------------------------------------------------------------
@api.post("/ocsp")
@_endpoint("ocsp")
def ocsp_status(session: Session, caller: Caller) -> Response:
    data = _json_request("OcspRequest")["ocspRequestData"]
    cert_id = parse_hash_data(
        data["hashAlgorithm"], data["issuerNameHash"], data["issuerKeyHash"], data["serialNumber"]
    )
    g.api_subject = data["serialNumber"].upper()
    answer = runtime().ocpp_ocsp().answer(cert_id)
    g.api_outcome = {"response_status": answer.response_status, "certificate_status": answer.certificate_status}
    if answer.response_status == "unauthorized":
        raise NotFoundError("no CA of this installation has these issuer hashes", code="unknown_issuer")
    if answer.response_status != "successful":
        raise StoreError(f"the OCSP signer answered {answer.response_status}", code="try_later")
    ocsp_result = base64.b64encode(answer.der).decode("ascii")
    if len(ocsp_result) > OCSP_RESULT_CHARS:  # OCPP 2.1's limit; never near it (about 1500 characters)
        raise StoreError(f"the OCSP response has {len(ocsp_result)} characters in base64", code="ocsp_result_too_long")
    return json_body(
        {"ocspResult": ocsp_result, "responseStatus": "successful", "certificateStatus": answer.certificate_status}
    )


@api.post("/certificate-chain-status")
@_endpoint("certificate-chain-status")
def certificate_chain_status(session: Session, caller: Caller) -> Response:
    """OCPP 2.1 GetCertificateChainStatus: the request's shape in, the response's shape out."""
    entries = _json_request("CertificateChainStatusRequest")["certificateStatusRequests"]
    requests = []
    for entry in entries:
        data = entry["certificateHashData"]
        cert_id = parse_hash_data(
            data["hashAlgorithm"], data["issuerNameHash"], data["issuerKeyHash"], data["serialNumber"]
        )
        requests.append(StatusRequest(entry["source"], cert_id))
    g.api_subject = ",".join(entry["certificateHashData"]["serialNumber"].upper() for entry in entries)
    statuses = runtime().chain_status().answer(session, requests, datetime.now(UTC))
    g.api_outcome = {"statuses": [f"{s.source} {s.status} ({s.detail})" for s in statuses]}
    return json_body(
        {
            "certificateStatus": [
                {
                    "certificateHashData": entry["certificateHashData"],
                    "source": status.source,
                    "status": status.status,
                    "nextUpdate": _iso(status.next_update),
                }
                for entry, status in zip(entries, statuses, strict=True)
            ]
        }
    )


# -- what stations install -----------------------------------------------------------------------------
@api.get("/install-certificates")
@_endpoint("install-certificates")
def install_certificates_view(session: Session, caller: Caller) -> Response:
    query = _query("/api/v1/install-certificates", "get")
    version = query.get("ocppVersion", OCPP_21)
    g.api_subject = caller.environment
    bundle = install_certificates(session, caller.environment, ocpp=version)
    entries = [
        {
            **entry.payload,
            "name": entry.authority.name,
            "notAfter": _iso(entry.authority.not_after),
            "certificateHashData": _hash_data(entry.authority, entry.authority),
        }
        for entry in bundle
    ]
    session.commit()  # end the read
    g.api_outcome = {"roots": [f"{entry['certificateType']} {entry['name']}" for entry in entries]}
    return json_body({"environment": caller.environment, "ocppVersion": version, "installCertificates": entries})


# -- identity check ------------------------------------------------------------------------------------
@api.post("/identity-check")
@_endpoint("identity-check")
def identity_check(session: Session, caller: Caller) -> Response:
    body = _json_request("IdentityCheckRequest")
    g.api_subject = body["chargingStationId"]
    verdict = check_identity(
        session, body["chargingStationId"], body["clientCertificate"], environment=caller.environment
    )
    result: dict[str, Any] = {"allowed": verdict.allowed}
    if not verdict.allowed:
        result.update(reason=verdict.reason, detail=verdict.detail)
    if verdict.certificate is not None:
        result["serialNumber"] = verdict.certificate.serial
    g.api_outcome = {"allowed": verdict.allowed, "reason": verdict.reason}
    return json_body(result)


@api.get("/openapi.json")
def openapi() -> Response:
    """Public: the document says nothing a client could not learn by calling the API."""
    return json_body(DOCUMENT)


# -- the asynchronous signer ---------------------------------------------------------------------------
class JobRunner:
    """Signs queued jobs in a thread of the serving process (one per gunicorn worker).

    Jobs are claimed in the database, so any number of runners in any number of processes share
    the queue; a job whose runner died is taken over once its lease has run out (``ca.registry.csms_jobs``).
    With ``checkpoint_every`` it also signs a checkpoint of the audit chain that often when the
    chain grew (``checkpoints.periodic_checkpoint``: one per interval however many runners try).
    """

    def __init__(self, app: Flask, *, poll: float = 1.0, checkpoint_every: timedelta | None = None) -> None:
        self.app = app
        self.poll = poll
        self._checkpoints = CheckpointTimer(checkpoint_every, name="EST worker") if checkpoint_every else None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def start(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="csms-sign-jobs", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout=10)

    def run_once(self) -> str | None:
        """Claim and decide one job; None when there was none to claim."""
        worker = runtime_of(self.app)
        with self.app.app_context(), worker.pki.store.session() as session:
            job = claim_next(session)
            if job is None:
                return None
            work = worker.work(session, "system:csms-jobs")
            outcome = process(work, job=job, settings=worker.enrollment)
            log.info("signing job %s: %s", job.public_id, outcome)
            return outcome

    def checkpoint_if_due(self) -> None:
        if self._checkpoints is None or not self._checkpoints.due():
            return
        pki = runtime_of(self.app).pki
        with self.app.app_context(), pki.store.session() as session:
            self._checkpoints.run(session, pki.token, pki.config.home)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.checkpoint_if_due()
                outcome = self.run_once()
            except (SQLAlchemyError, ChargepkiError) as exc:
                # The database or the token is away: one line, and the jobs wait in the database.
                log.warning("signing job runner: %s", one_line(exc))
                outcome = None
            except Exception:  # anything else is a bug worth its traceback in the log
                log.exception("signing job runner")
                outcome = None
            if outcome is None:
                self._wake.wait(self.poll)
                self._wake.clear()
