"""The CSMS API in-process (`create_app` + Flask's test client) on SQLite and PostgreSQL: signing and
its refusals, asynchronous jobs (claimed once, taken over after a crash), lookups, OCSP, the identity
check, authentication, bad input, and the OpenAPI document. Every answer is validated against the
document's schemas (tests/api_helpers.py)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from flask import Flask
from hypothesis import HealthCheck, assume, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft6Validator, Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from sqlalchemy import select, update

from ca import audit
from ca.audit import checkpoints
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.issuers import default_issuing_ca, get_authority, issuer_for
from ca.authorities.oem import import_oem_root
from ca.authorities.rotation import retire, rotate_issuing_ca
from ca.authorities.v2g import V2gRequest, init_v2g
from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.context import Pki
from ca.errors import InputError, PolicyError
from ca.issuance.csr import read_csr
from ca.issuance.flow import IssueRequest, issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.csms import add_client, caller_for, get_client, issue_token, set_enabled
from ca.registry.csms import sign as csms_sign
from ca.registry.csms_jobs import claim_next, enqueue, process
from ca.registry.devices import add_device, disable_device, get_device
from ca.status.revocation import revoke
from ca.store.models import AuditCheckpoint, AuditEvent, Certificate, CsmsSignJob
from ca.work import Work
from crl.publisher import publish_all
from ocsp.certid import issuer_hashes
from ocsp.ocpp import parse_hash_data
from ocsp.presign import Presigner
from tests.api_helpers import CHECKED, CheckedClient
from tests.helpers import make_csr, make_key, openssl
from web.api import JobRunner
from web.app import create_app
from web.openapi import DOCUMENT, Validator
from web.server import behind_front_door

ORG = "Acme Charging"
JSON = "application/json"


@dataclass
class Api:
    pki: Pki
    app: Flask
    client: CheckedClient  # authenticated with the API token of csms-1 (production)
    anonymous: CheckedClient
    token: str
    tmp: Path
    status: Presigner
    counter: int = 0

    def register(self, serial: str | None = None, environment: str = "production") -> str:
        self.counter += 1
        serial = serial or f"CP-{self.counter:04d}"
        with self.pki.store.session() as session:
            add_device(Work(session, "test"), serial=serial, environment=environment)
        return serial

    def sign(self, station: str, csr: bytes | str, query: str = "", **fields: Any) -> Any:
        body = {"chargingStationId": station, "csr": csr.decode() if isinstance(csr, bytes) else csr, **fields}
        return self.client.post(f"/api/v1/sign{query}", json=body)

    def signed(self, station: str, key: Any = None) -> tuple[dict[str, Any], Any]:
        key = key or make_key()
        response = self.sign(station, make_csr(station, key=key))
        assert response.status_code == 200, response.get_json()
        return response.get_json(), key

    def runner(self) -> JobRunner:
        return JobRunner(self.app)

    def audit(self, action: str) -> list[AuditEvent]:
        with self.pki.store.session() as session:
            events = list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))
            session.commit()
            return events


@pytest.fixture
def api(
    tmp_path: Path, migrated_db_url: str, token: Token, status: Presigner, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Api]:
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0]))
    pki = Pki.open(home, {}, create=True)
    with pki.store.session() as session:
        for environment in ("production", "staging"):
            request = HierarchyRequest(organization=ORG, country="DE", environment=environment)
            init_hierarchy(Work(session=session, actor="test", status=status, token=token), request=request)
        client = add_client(Work(session, "test"), name="csms-1", environment="production")
        secret = issue_token(Work(session, "test"), client=client)
    settings = EstSettings(
        default_environment="production", client_cert_header="X-SSL-Client-Cert", trusted_proxies=("127.0.0.1",)
    )
    app = create_app(pki, settings)
    test_client = app.test_client()
    yield Api(
        pki,
        app,
        CheckedClient(test_client, {"Authorization": f"Bearer {secret}"}),
        CheckedClient(test_client),
        secret,
        tmp_path,
        status,
    )
    pki.close()


def _pems(chain: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(chain.encode())


def _verify_chain(api: Api, chain: str, environment: str = "production") -> str:
    """`openssl verify` of the leaf with the environment's root as the only trust anchor."""
    leaf, *intermediates = _pems(chain)
    with api.pki.store.session() as session:
        root = default_issuing_ca(session, environment).parent
        assert root is not None
        root_pem = x509.load_der_x509_certificate(root.certificate_der).public_bytes(serialization.Encoding.PEM)
        session.commit()
    (api.tmp / "root.pem").write_bytes(root_pem)
    (api.tmp / "untrusted.pem").write_text(
        "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in intermediates)
    )
    (api.tmp / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    result = openssl(
        "verify",
        "-x509_strict",
        "-purpose",
        "sslclient",
        "-CAfile",
        str(api.tmp / "root.pem"),
        "-untrusted",
        str(api.tmp / "untrusted.pem"),
        str(api.tmp / "leaf.pem"),
    )
    return result.stdout + result.stderr


# -- signing -------------------------------------------------------------------------------------------
def test_sign_returns_the_chain_leaf_first_without_the_root_and_audits_the_caller(api: Api) -> None:
    station = api.register()
    result, key = api.signed(station)
    leaf, issuing = _pems(result["certificateChain"])
    assert leaf.subject.rfc4514_string() == f"CN={station},O={ORG},C=DE"
    assert leaf.issuer == issuing.subject and issuing.issuer != issuing.subject  # the root is left out
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert result["serialNumber"] == format(leaf.serial_number, "X")
    assert len(result["certificateChain"]) < 10000
    assert ": OK" in _verify_chain(api, result["certificateChain"])
    issued = [e for e in api.audit("certificate.issued") if e.subject == result["serialNumber"]]
    assert issued and issued[0].actor == "csms:csms-1"
    calls = api.audit("csms.api.sign")
    assert calls[-1].actor == "csms:csms-1" and calls[-1].subject == station
    assert json.loads(calls[-1].details)["status"] == 200
    # A renewal through the CSMS supersedes the first certificate (one current certificate per device).
    renewed, _ = api.signed(station)
    with api.pki.store.session() as session:
        first = session.scalar(select(Certificate).where(Certificate.serial == result["serialNumber"]))
        assert first is not None and first.status == "revoked" and first.revocation_reason == "superseded"
        session.commit()
    assert renewed["serialNumber"] != result["serialNumber"]


def test_sign_refusals_carry_a_machine_readable_reason_and_are_audited(api: Api) -> None:
    station = api.register()
    staging = api.register(environment="staging")
    disabled = api.register()
    with api.pki.store.session() as session:
        disable_device(Work(session, "test", status=api.status), serial=disabled)
    _taken, taken_key = api.signed(api.register())
    cases = [
        (api.sign("CP-NOT-REGISTERED", make_csr("CP-NOT-REGISTERED")), 403, "device_not_registered"),
        (api.sign(station, make_csr("CP-OTHER")), 403, "cn_mismatch"),
        (api.sign(station, make_csr(station, organization="Evil Corp")), 403, "wrong_organization"),
        (api.sign(station, make_csr(station, key=make_key("rsa-1024"))), 403, "key_not_allowed"),
        (api.sign(disabled, make_csr(disabled)), 403, "device_disabled"),
        (api.sign(staging, make_csr(staging)), 403, "other_environment"),
        (api.sign(station, make_csr(station, key=taken_key)), 409, "key_reuse"),
        (api.sign(station, make_csr(station), certificateType="V2GCertificate"), 409, "v2g_not_configured"),
        (
            api.sign(station, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
            400,
            "bad_csr",
        ),
        (api.sign("http://x", make_csr("http://x")), 403, "device_not_registered"),
    ]
    for response, status, reason in cases:
        assert (response.status_code, response.get_json()["reason"]) == (status, reason), response.get_json()
        assert response.get_json()["error"]
    refused = api.audit("csms.sign.refused")
    assert len(refused) == 9 and all(e.actor == "csms:csms-1" for e in refused)  # V2G is refused before
    calls = [json.loads(e.details) for e in api.audit("csms.api.sign")]
    assert [c["reason"] for c in calls[-len(cases) :]] == [reason for _, _, reason in cases]


def test_a_v2g_certificate_is_signed_under_the_cpo_sub_ca_2_once_v2g_exists(api: Api, token: Token) -> None:
    station = api.register()
    with api.pki.store.session() as session:
        init_v2g(
            Work(session=session, actor="test", status=api.status, token=token),
            request=V2gRequest(organization=ORG, country="DE"),
        )
    secc_id = "DE*ACM*E7001*1"
    response = api.sign(station, make_csr(secc_id), certificateType="V2GCertificate")
    assert response.status_code == 200, response.get_json()
    leaf, sub_ca_2, sub_ca_1 = _pems(response.get_json()["certificateChain"])  # leaf first, the V2G root left out
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == secc_id
    assert leaf.subject.get_attributes_for_oid(NameOID.DOMAIN_COMPONENT)[0].value == "CPO"
    leaf.verify_directly_issued_by(sub_ca_2)
    sub_ca_2.verify_directly_issued_by(sub_ca_1)
    assert sub_ca_1.issuer != sub_ca_1.subject
    # The same checks as the CLI and EST: the SECC ID now belongs to this station.
    other = api.register()
    taken = api.sign(other, make_csr(secc_id), certificateType="V2GCertificate")
    assert taken.status_code == 409, taken.get_json()
    # And the asynchronous form goes through the same path.
    queued = api.sign(station, make_csr("DE*ACM*E7002*1"), query="?async=1", certificateType="V2GCertificate")
    assert queued.status_code == 202
    assert api.runner().run_once() == "signed"
    answer = api.client.get(queued.headers["Location"]).get_json()
    assert answer["status"] == "signed" and len(_pems(answer["certificateChain"])) == 3


def test_a_chain_over_the_limit_is_refused_and_the_certificate_abandoned(api: Api) -> None:
    station = api.register()
    with api.pki.store.session() as session:
        caller = _caller(session, "csms-1")
        with pytest.raises(PolicyError) as refused:
            csms_sign(
                Work(
                    session,
                    "test",
                    status=api.status,
                    issuers=lambda authority: issuer_for(authority, api.pki.token()),
                ),
                caller=caller,
                charging_station_id=station,
                certificate_type="ChargingStationCertificate",
                csr=make_csr(station),
                max_chain_chars=1000,
            )
        assert refused.value.code == "chain_too_long"
        states = session.scalars(select(Certificate.status).where(Certificate.common_name == station)).all()
        session.commit()
    assert states == ["aborted"]  # signed, but never recorded as valid nor handed out
    # The real limit is OCPP's 10000 characters, which a P-256 chain is far below.
    assert api.signed(station)[0]["certificateChain"]


def _caller(session: Any, name: str) -> Any:
    return caller_for(session, get_client(session, name).id)


# -- asynchronous signing ------------------------------------------------------------------------------
def test_async_sign_answers_202_then_the_job_is_signed_once(api: Api) -> None:
    station = api.register()
    accepted = api.sign(station, make_csr(station), query="?async=1")
    assert accepted.status_code == 202
    location = accepted.headers["Location"]
    assert accepted.get_json() == {"jobId": location.rsplit("/", 1)[1], "location": location, "status": "pending"}
    pending = api.client.get(location)
    assert pending.status_code == 202 and pending.headers["Retry-After"] == "1"
    assert api.runner().run_once() == "signed"
    assert api.runner().run_once() is None  # nothing left to claim
    done = api.client.get(location)
    assert done.status_code == 200 and done.get_json()["status"] == "signed"
    assert ": OK" in _verify_chain(api, done.get_json()["certificateChain"])
    # Another CSMS cannot see the job.
    with api.pki.store.session() as session:
        other = issue_token(
            Work(session, "t"), client=add_client(Work(session, "test"), name="csms-2", environment="production")
        )
    assert api.anonymous.get(location, headers={"Authorization": f"Bearer {other}"}).status_code == 404
    # A refusal is reported with its reason when polled.
    refused = api.sign("CP-UNKNOWN", make_csr("CP-UNKNOWN"), query="?async=1")
    assert api.runner().run_once() == "refused"
    answer = api.client.get(refused.headers["Location"]).get_json()
    assert (answer["status"], answer["reason"]) == ("refused", "device_not_registered")
    # What can be refused at once is refused at once.
    assert api.sign(station, "not a csr", query="?async=1").get_json()["reason"] == "bad_csr"
    v2g = api.sign(station, make_csr(station), query="?async=true", certificateType="V2GCertificate")
    assert (v2g.status_code, v2g.get_json()["reason"]) == (409, "v2g_not_configured")
    assert api.client.get("/api/v1/sign/" + "0" * 32).status_code == 404
    assert api.client.get("/api/v1/sign/not-a-job").status_code == 404


def test_racing_workers_claim_each_job_exactly_once(api: Api) -> None:
    with api.pki.store.session() as session:
        caller = _caller(session, "csms-1")
        for number in range(6):
            enqueue(session, caller, f"CP-R{number}", "ChargingStationCertificate", make_csr(f"CP-R{number}").decode())
    claimed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        while True:
            with api.pki.store.session() as session:
                job = claim_next(session)
                if job is None:
                    return
                with lock:
                    claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 6 and len(set(claimed)) == 6


def test_a_job_left_by_a_dead_worker_is_taken_over_and_signed_once(api: Api) -> None:
    station = api.register()
    now = datetime.now(UTC)
    issuers = lambda authority: issuer_for(authority, api.pki.token())  # noqa: E731
    with api.pki.store.session() as a, api.pki.store.session() as b:  # two workers
        job = enqueue(a, _caller(a, "csms-1"), station, "ChargingStationCertificate", make_csr(station).decode())
        first = claim_next(a)  # worker A takes it …
        assert first is not None and first.id == job.id
        assert claim_next(b) is None  # … and nobody else may while its lease runs
        # … then A stalls past its lease: worker B takes the job over and signs it.
        later = claim_next(b, now=lambda: now + timedelta(minutes=3))
        assert later is not None and later.claim != first.claim and later.attempts == 2
        assert process(Work(b, "test", status=api.status, issuers=issuers), job=later) == "signed"
        # A wakes up and completes: its claim is gone, so its certificate is abandoned, B's stays current.
        assert process(Work(a, "test", status=api.status, issuers=issuers), job=first) == "lost"
        rows = a.execute(select(Certificate.status).where(Certificate.common_name == station)).scalars().all()
        signed = a.scalar(select(CsmsSignJob.state).where(CsmsSignJob.id == job.id))
        a.commit()
    assert sorted(rows) == ["aborted", "valid"]
    assert signed == "signed"
    # A job a crashed process left running is picked up by the serving process's runner.
    station2 = api.register()
    with api.pki.store.session() as session:
        orphan = enqueue(
            session, _caller(session, "csms-1"), station2, "ChargingStationCertificate", make_csr(station2).decode()
        )
        session.execute(
            update(CsmsSignJob)
            .where(CsmsSignJob.id == orphan.id)
            .values(state="running", claim="dead-worker", claimed_at=now - timedelta(minutes=5), attempts=1)
        )
        session.commit()
    assert api.runner().run_once() == "signed"


def test_the_runner_thread_signs_queued_jobs(api: Api) -> None:
    station = api.register()
    runner = JobRunner(api.app, poll=0.05)
    api.app.runtime.jobs = runner
    runner.start()
    try:
        location = api.sign(station, make_csr(station), query="?async=1").headers["Location"]
        for _ in range(400):  # bounded: at most ~20 s, normally a few polls
            answer = api.client.get(location)
            if answer.status_code == 200:
                break
            threading.Event().wait(0.05)
        assert answer.get_json()["status"] == "signed"
    finally:
        runner.close()


def test_the_runner_threads_of_two_workers_sign_one_audit_checkpoint_per_interval(api: Api) -> None:
    """EST workers' runner threads write the periodic checkpoints; two workers in one interval write one."""
    api.signed(api.register())  # the chain has grown
    every = timedelta(hours=1)
    first, second = JobRunner(api.app, poll=0.05, checkpoint_every=every), JobRunner(api.app, checkpoint_every=every)
    first.start()
    try:
        for _ in range(400):  # bounded: at most ~20 s, normally the thread's first turn
            if _checkpoint_count(api):
                break
            threading.Event().wait(0.05)
        assert _checkpoint_count(api) == 1
        api.signed(api.register())  # the chain grows again, within the interval
        second.checkpoint_if_due()  # the other worker's first turn: the interval's checkpoint exists
    finally:
        first.close()
    assert _checkpoint_count(api) == 1
    lines = (api.pki.config.home / checkpoints.FILE_NAME).read_text().splitlines()
    assert len(lines) == 1


def _checkpoint_count(api: Api) -> int:
    with api.pki.store.session() as session:
        count = len(session.scalars(select(AuditCheckpoint)).all())
        session.commit()
    return count


# -- lookups and OCSP ----------------------------------------------------------------------------------
def test_lookups_by_fingerprint_and_hash_report_status_device_validity_and_chain(api: Api) -> None:
    station = api.register()
    signed, _ = api.signed(station)
    fingerprint = signed["fingerprintSha256"]
    info = api.client.get(f"/api/v1/certificates/{fingerprint}").get_json()
    assert info["status"] == "good" and info["device"] == {
        "chargingStationId": station,
        "enabled": True,
        "environment": "production",
    }
    assert info["certificateChain"] == signed["certificateChain"] and info["profile"] == "charger"
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert api.client.get(f"/api/v1/certificates/{colons}").get_json()["serialNumber"] == signed["serialNumber"]
    assert {h["hashAlgorithm"] for h in info["certificateHashData"]} == {"SHA256", "SHA384", "SHA512"}
    for hash_data in info["certificateHashData"]:
        for serial in (hash_data["serialNumber"], hash_data["serialNumber"].lower()):
            query = "&".join(f"{k}={quote(v if k != 'serialNumber' else serial)}" for k, v in hash_data.items())
            found = api.client.get(f"/api/v1/certificates/by-hash?{query}")
            assert found.status_code == 200 and found.get_json()["fingerprintSha256"] == fingerprint
    with api.pki.store.session() as session:
        revoke(Work(session, "test", status=api.status), serial=signed["serialNumber"], reason="keyCompromise")
    revoked = api.client.get(f"/api/v1/certificates/{fingerprint}").get_json()
    assert (revoked["status"], revoked["revocationReason"]) == ("revoked", "keyCompromise")
    assert datetime.fromisoformat(revoked["revocationTime"]) <= datetime.now(UTC)
    # Expired (issued with a validity that ended in the backdating window).
    expired = _issue_direct(api, api.register(), validity=timedelta(seconds=1))
    assert api.client.get(f"/api/v1/certificates/{expired.fingerprint_sha256}").get_json()["status"] == "expired"
    # Unknown, and another environment's: not found.
    hash_data = dict(info["certificateHashData"][0], serialNumber="0001234")  # leading zeros are read as hex
    unknown = api.client.get("/api/v1/certificates/by-hash?" + "&".join(f"{k}={v}" for k, v in hash_data.items()))
    assert (unknown.status_code, unknown.get_json()["reason"]) == (404, "unknown_certificate")
    staging = _issue_direct(api, api.register(environment="staging"), environment="staging")
    assert api.client.get(f"/api/v1/certificates/{staging.fingerprint_sha256}").status_code == 404


def _issue_direct(api: Api, station: str, environment: str = "production", **kwargs: Any) -> Certificate:
    """A charger certificate issued in the core (for states the API cannot produce on its own)."""
    with api.pki.store.session() as session:
        authority = default_issuing_ca(session, environment)
        issuer = issuer_for(authority, api.pki.token())
        if "organization" in kwargs:
            issuer = dataclasses.replace(issuer, organization=kwargs.pop("organization"))
        device = get_device(session, station)
        request = request_from_csr(get_profile("charger"), read_csr(make_csr(station, organization=None)), issuer)
        request = IssueRequest(request.profile, request.public_key, station, device_id=device.id, **kwargs)
        row = issue(Work(session, "test", status=api.status), issuer=issuer, request=request)
        session.commit()
        return row


def test_ocsp_answers_from_the_store_or_signs_on_demand(api: Api) -> None:
    station = api.register()
    signed, _ = api.signed(station)
    info = api.client.get(f"/api/v1/certificates/{signed['fingerprintSha256']}").get_json()
    for hash_data in info["certificateHashData"]:  # SHA-2 CertIDs are not pre-signed: signed now, then stored
        answer = api.client.post(
            "/api/v1/ocsp", json={"ocspRequestData": {**hash_data, "responderURL": "http://x/ocsp"}}
        )
        assert answer.status_code == 200 and answer.get_json()["certificateStatus"] == "good"
        response = ocsp.load_der_ocsp_response(base64.b64decode(answer.get_json()["ocspResult"]))
        assert response.serial_number == int(signed["serialNumber"], 16)
        assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    with api.pki.store.session() as session:
        revoke(Work(session, "test", status=api.status), serial=signed["serialNumber"], reason="keyCompromise")
    data = {**info["certificateHashData"][0], "responderURL": "http://x/ocsp"}
    answer = api.client.post("/api/v1/ocsp", json={"ocspRequestData": data}).get_json()
    response = ocsp.load_der_ocsp_response(base64.b64decode(answer["ocspResult"]))
    assert answer["certificateStatus"] == "revoked" and response.revocation_reason == x509.ReasonFlags.key_compromise
    unknown = api.client.post("/api/v1/ocsp", json={"ocspRequestData": {**data, "serialNumber": "ABC"}})
    assert unknown.status_code == 200 and unknown.get_json()["certificateStatus"] == "unknown"
    foreign = api.client.post("/api/v1/ocsp", json={"ocspRequestData": {**data, "issuerKeyHash": "00" * 32}})
    assert (foreign.status_code, foreign.get_json()["reason"]) == (404, "unknown_issuer")


# -- OCPP 2.1 ------------------------------------------------------------------------------------------
def ocpp21_schema(name: str) -> dict[str, Any]:
    """A JSON schema shipped with the `ocpp` library for OCPP 2.1 (``ocpp/v21/schemas``)."""
    return json.loads((resources.files("ocpp") / "v21" / "schemas" / f"{name}.json").read_text(encoding="utf-8"))


def _ocpp21_valid(name: str, instance: object) -> None:
    """``instance`` is what an OCPP 2.1 message of that schema may carry, as the library's schema says."""
    Draft6Validator(ocpp21_schema(name)).validate(instance)


def _root_hash(authority: Any, algorithm: str = "SHA256", serial: str | None = None) -> dict[str, str]:
    """A root's own CertificateHashData (OCPP 2.1 hashRootCertificate): it is its own issuer."""
    (hashed,) = [
        h
        for h in issuer_hashes(x509.load_der_x509_certificate(authority.certificate_der))
        if h.hash_algorithm == algorithm.lower()
    ]
    return {
        "hashAlgorithm": algorithm,
        "issuerNameHash": hashed.name_hash.hex(),
        "issuerKeyHash": hashed.key_hash.hex(),
        "serialNumber": serial or authority.serial,
    }


@dataclass
class V2g:
    v2: Any  # the ISO 15118-2 hierarchy
    v20: Any  # the ISO 15118-20 hierarchy (root → Sub-CA 2)
    ocpp_root: Any
    staging_root: Any


def _with_v2g(api: Api, token: Token) -> V2g:
    with api.pki.store.session() as session:
        work = Work(session=session, actor="test", status=api.status, token=token)
        v2 = init_v2g(work, request=V2gRequest(organization=ORG, country="DE"))
        v20 = init_v2g(work, request=V2gRequest(organization=ORG, country="DE", iso="15118-20", sub_ca_1=False))
        ocpp_root = default_issuing_ca(session, "production").parent
        staging_root = default_issuing_ca(session, "staging").parent
        for row in (v2.root, v20.root, v20.sub_ca_2, ocpp_root, staging_root):
            session.refresh(row)
        session.expunge_all()
        session.commit()
    return V2g(v2, v20, ocpp_root, staging_root)


def _certificate_count(api: Api) -> int:
    with api.pki.store.session() as session:
        count = len(session.scalars(select(Certificate.id).where(Certificate.status == "valid")).all())
        session.commit()
    return count


def test_ocpp_2_1_sign_certificate_v2g20_with_request_id_and_a_chosen_root(api: Api, token: Token) -> None:
    station = api.register()
    v2g = _with_v2g(api, token)
    secc_id = "DE*ACM*E2101*1"
    key = make_key("ec-p521")
    response = api.sign(
        station, make_csr(secc_id, key=key), certificateType="V2G20Certificate", requestId=4711,
        hashRootCertificate=_root_hash(v2g.v20.root, "SHA384"),
    )  # fmt: skip
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert (answer["certificateType"], answer["requestId"]) == ("V2G20Certificate", 4711)
    # What the CSMS passes on is a valid OCPP 2.1 CertificateSignedRequest as it is.
    signed = {k: answer[k] for k in ("certificateChain", "certificateType", "requestId")}
    _ocpp21_valid("CertificateSignedRequest", signed)
    leaf, sub_ca_2 = _pems(answer["certificateChain"])  # -20 without Sub-CA 1: leaf, Sub-CA 2; root omitted
    root = x509.load_der_x509_certificate(v2g.v20.root.certificate_der)
    leaf.verify_directly_issued_by(sub_ca_2)
    sub_ca_2.verify_directly_issued_by(root)
    assert leaf.signature_hash_algorithm is not None and leaf.signature_hash_algorithm.name == "sha512"
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == secc_id
    # The same SECC ID under ISO 15118-2, its own key, under the -2 root chosen by hash (any algorithm).
    for algorithm in ("SHA256", "SHA512"):
        v2 = api.sign(
            station, make_csr(secc_id), certificateType="V2GCertificate", requestId=-7,
            hashRootCertificate=_root_hash(v2g.v2.root, algorithm),
        )  # fmt: skip
        assert v2.status_code == 200, v2.get_json()
        assert (v2.get_json()["certificateType"], v2.get_json()["requestId"]) == ("V2GCertificate", -7)
        assert len(_pems(v2.get_json()["certificateChain"])) == 3
    # Without a root, each type signs under its version's newest Sub-CA 2; without requestId none is echoed.
    plain = api.sign(station, make_csr("DE*ACM*E2102*1", key=make_key("ec-p521")), certificateType="V2G20Certificate")
    assert plain.status_code == 200 and "requestId" not in plain.get_json()
    # A charger certificate may name the OCPP root it is signed under (the current one).
    charger = api.sign(station, make_csr(station), requestId=1, hashRootCertificate=_root_hash(v2g.ocpp_root))
    assert charger.status_code == 200 and charger.get_json()["certificateType"] == "ChargingStationCertificate"
    # Each type takes only a root of its hierarchy, of this CSMS's environment.
    before = _certificate_count(api)
    refusals = [
        (api.sign(station, make_csr(secc_id), certificateType="V2GCertificate",
                  hashRootCertificate=_root_hash(v2g.v20.root)), 400, "root_type_mismatch"),
        (api.sign(station, make_csr(secc_id, key=make_key("ec-p521")), certificateType="V2G20Certificate",
                  hashRootCertificate=_root_hash(v2g.v2.root)), 400, "root_type_mismatch"),
        (api.sign(station, make_csr(station), hashRootCertificate=_root_hash(v2g.v20.root)), 400, "root_type_mismatch"),
        (api.sign(station, make_csr(secc_id), certificateType="V2GCertificate",
                  hashRootCertificate=_root_hash(v2g.ocpp_root)), 400, "root_type_mismatch"),
        (api.sign(station, make_csr(station), hashRootCertificate=_root_hash(v2g.staging_root)), 404, "unknown_root"),
        (api.sign(station, make_csr(station), hashRootCertificate=_root_hash(v2g.ocpp_root, serial="1A")), 404,
         "unknown_root"),
        (api.sign(station, make_csr(secc_id, key=make_key("ec-p521")), certificateType="V2G20Certificate",
                  hashRootCertificate=_root_hash(v2g.v20.sub_ca_2)), 404, "unknown_root"),  # not a root
    ]  # fmt: skip
    for number, (refused, status, reason) in enumerate(refusals):
        assert (refused.status_code, refused.get_json()["reason"]) == (status, reason), (number, refused.get_json())
    assert _certificate_count(api) == before
    audited = [json.loads(e.details) for e in api.audit("csms.api.sign")][-len(refusals) :]
    assert [a["reason"] for a in audited] == [reason for _, _, reason in refusals]

    # Asynchronously: requestId in every answer, the root checked at once and again when signed.
    queued = api.sign(
        station, make_csr("DE*ACM*E2103*1", key=make_key("ec-p521")), query="?async=1",
        certificateType="V2G20Certificate", requestId=99, hashRootCertificate=_root_hash(v2g.v20.root),
    )  # fmt: skip
    assert queued.status_code == 202 and queued.get_json()["requestId"] == 99
    assert api.client.get(queued.headers["Location"]).get_json()["requestId"] == 99
    assert api.runner().run_once() == "signed"
    done = api.client.get(queued.headers["Location"]).get_json()
    assert (done["status"], done["certificateType"], done["requestId"]) == ("signed", "V2G20Certificate", 99)
    mismatched = api.sign(
        station, make_csr(secc_id), query="?async=1", certificateType="V2GCertificate",
        hashRootCertificate=_root_hash(v2g.v20.root),
    )  # fmt: skip
    assert (mismatched.status_code, mismatched.get_json()["reason"]) == (400, "root_type_mismatch")


def test_ocpp_2_1_bad_input_is_refused_with_a_reason_audited_and_nothing_issued(api: Api, token: Token) -> None:
    station = api.register()
    # Without an ISO 15118-20 hierarchy: a state the operator fixes, at once also asynchronously.
    for query in ("", "?async=1"):
        missing = api.sign(station, make_csr("DE*ACM*E2201*1", key=make_key("ec-p521")), query=query,
                           certificateType="V2G20Certificate")  # fmt: skip
        assert (missing.status_code, missing.get_json()["reason"]) == (409, "v2g_not_configured")
    _with_v2g(api, token)
    signed, _ = api.signed(station)
    info = api.client.get(f"/api/v1/certificates/{signed['fingerprintSha256']}").get_json()
    entry = {"certificateHashData": info["certificateHashData"][0], "source": "OCSP", "urls": ["http://x/ocsp"]}
    before = _certificate_count(api)

    def chain_status(entries: Any) -> Any:
        return api.client.post("/api/v1/certificate-chain-status", json={"certificateStatusRequests": entries})

    unknown_issuer = {**entry, "certificateHashData": {**entry["certificateHashData"], "issuerKeyHash": "00" * 32}}
    cases = [
        (api.sign(station, make_csr("DE*ACM*E2202*1", key=make_key("ec-p256")), certificateType="V2G20Certificate"),
         403, "key_not_allowed"),  # a -20 CSR with a P-256 key
        (api.sign(station, make_csr("DE*ACM*E2203*1", key=make_key("ec-p521")), certificateType="V2GCertificate"),
         403, "key_not_allowed"),  # a -2 CSR with a P-521 key
        (api.sign(station, make_csr(station), hashRootCertificate=_hash_data_only("SHA256")), 404,
         "unknown_root"),
        (api.sign(station, make_csr(station), requestId=2**31), 400, "bad_value"),
        (api.sign(station, make_csr(station), requestId="1"), 400, "bad_value"),
        (api.sign(station, make_csr(station), requestId=1.5), 400, "bad_value"),
        (chain_status([entry] * 5), 400, "too_many_entries"),
        (chain_status([]), 400, "no_entries"),
        (chain_status([{**entry, "urls": ["http://x/" + "a" * 2000]}]), 400, "field_too_long"),
        (chain_status([{**entry, "urls": ["http://x/ocsp"] * 6}]), 400, "too_many_urls"),
        (chain_status([{**entry, "urls": []}]), 400, "bad_value"),
        (chain_status([{**entry, "source": "OCSP+CRL"}]), 400, "bad_value"),
        (chain_status([entry, unknown_issuer]), 404, "unknown_issuer"),
        (chain_status([{**entry, "extra": 1}]), 400, "unknown_field"),
        (api.client.post("/api/v1/ocsp", json={"ocspRequestData": {**_hash("SHA256"), "responderURL": "h" * 2001}}),
         400, "bad_value"),
        (api.client.get("/api/v1/install-certificates?ocppVersion=1.6"), 400, "bad_value"),
    ]  # fmt: skip
    for number, (response, status, reason) in enumerate(cases):
        assert (response.status_code, response.get_json()["reason"]) == (status, reason), (number, response.get_json())
        assert response.get_json()["error"]
    assert _certificate_count(api) == before  # nothing issued
    refused = [json.loads(e.details) for e in api.audit("v2g.refused")]
    assert [r["code"] for r in refused][-2:] == ["key_not_allowed", "key_not_allowed"]
    signs = [json.loads(e.details) for e in api.audit("csms.api.sign")][-6:]
    assert [c["reason"] for c in signs] == [r for _, _, r in cases[:6]]
    calls = [json.loads(e.details) for e in api.audit("csms.api.certificate-chain-status")]
    assert [c["reason"] for c in calls] == [r for _, _, r in cases[6:14]]
    assert all(c["status"] >= 400 for c in calls)
    # 2.0.1-sized fields stay accepted: a 512-character responderURL, the 2.0.1 certificate types.
    data = {**info["certificateHashData"][0], "responderURL": "h" * 512}
    assert api.client.post("/api/v1/ocsp", json={"ocspRequestData": data}).status_code == 200


def test_ocpp_2_1_certificate_chain_status_by_ocsp_and_by_the_published_crl(api: Api) -> None:
    station = api.register()
    signed, _ = api.signed(station)
    info = api.client.get(f"/api/v1/certificates/{signed['fingerprintSha256']}").get_json()
    with api.pki.store.session() as session:
        issuing = default_issuing_ca(session, "production")
        issuing_hash = _root_hash(issuing.parent, serial=issuing.serial)  # the issuing CA, named under its root
        issuing_name = issuing.name
        session.commit()
    leaf_hash = info["certificateHashData"][1]  # SHA384: any of the three

    def ask(*entries: tuple[dict[str, str], str]) -> list[dict[str, Any]]:
        body = {
            "certificateStatusRequests": [
                {"certificateHashData": data, "source": source, "urls": ["http://127.0.0.1:8081/ocsp"]}
                for data, source in entries
            ]
        }
        _ocpp21_valid("GetCertificateChainStatusRequest", body)
        response = api.client.post("/api/v1/certificate-chain-status", json=body)
        assert response.status_code == 200, response.get_json()
        _ocpp21_valid("GetCertificateChainStatusResponse", response.get_json())  # forwarded as it is
        statuses = response.get_json()["certificateStatus"]
        assert [s["certificateHashData"] for s in statuses] == [data for data, _ in entries]
        assert [s["source"] for s in statuses] == [source for _, source in entries]
        return statuses

    now = datetime.now(UTC)
    # No CRL published yet: the CRL entries cannot be answered; OCSP answers at once.
    first = ask((leaf_hash, "OCSP"), (issuing_hash, "OCSP"), (leaf_hash, "CRL"), (issuing_hash, "CRL"))
    assert [s["status"] for s in first] == ["Good", "Good", "Failed", "Failed"]
    ocsp_next = datetime.fromisoformat(first[0]["nextUpdate"])
    assert now < ocsp_next <= now + timedelta(days=8)
    assert now < datetime.fromisoformat(first[2]["nextUpdate"]) <= now + timedelta(minutes=2)  # Failed: soon

    publish_all_crls(api)
    published = ask((leaf_hash, "CRL"), (issuing_hash, "CRL"))
    assert [s["status"] for s in published] == ["Good", "Good"]
    crl = x509.load_der_x509_crl((api.pki.config.home / "pki" / f"{issuing_name}.crl").read_bytes())
    assert datetime.fromisoformat(published[0]["nextUpdate"]) == crl.next_update_utc

    # Revoked: OCSP says so at once, the CRL once republished.
    with api.pki.store.session() as session:
        revoke(Work(session, "test", status=api.status), serial=signed["serialNumber"], reason="keyCompromise")
    assert [s["status"] for s in ask((leaf_hash, "OCSP"), (leaf_hash, "CRL"))] == ["Revoked", "Good"]
    publish_all_crls(api)
    assert [s["status"] for s in ask((leaf_hash, "OCSP"), (leaf_hash, "CRL"))] == ["Revoked", "Revoked"]

    # A serial the CA never issued is Unknown by either source.
    never = {**leaf_hash, "serialNumber": "ABC"}
    assert [s["status"] for s in ask((never, "OCSP"), (never, "CRL"))] == ["Unknown", "Unknown"]
    # A CRL file that is not the CA's (tampered, or a link planted there) vouches for nothing.
    path = api.pki.config.home / "pki" / f"{issuing_name}.crl"
    path.write_bytes(path.read_bytes()[:-8] + b"\x00" * 8)
    assert ask((leaf_hash, "CRL"))[0]["status"] == "Failed"
    path.unlink()
    other = next(p for p in (api.pki.config.home / "pki").glob("*.crl") if p != path)
    path.symlink_to(other)
    assert ask((leaf_hash, "CRL"))[0]["status"] == "Failed"
    calls = [json.loads(e.details) for e in api.audit("csms.api.certificate-chain-status")]
    assert calls[-1]["status"] == 200 and calls[-1]["statuses"][0].startswith("CRL Failed")


def publish_all_crls(api: Api) -> None:
    with api.pki.store.session() as session:
        publish_all(session, api.pki.token(), api.pki.config.home / "pki")


def test_ocpp_2_1_install_certificates_lists_every_root_a_station_needs(api: Api, token: Token) -> None:
    bundle = api.client.get("/api/v1/install-certificates").get_json()
    assert (bundle["environment"], bundle["ocppVersion"]) == ("production", "2.1")
    assert [e["certificateType"] for e in bundle["installCertificates"]] == ["CSMSRootCertificate"]
    v2g = _with_v2g(api, token)
    oem = _self_signed_ca("Example Motors OEM Root")
    with api.pki.store.session() as session:
        imported = import_oem_root(Work(session, "test"), environment="production", certificate_data=oem)
        imported_name = imported.name
    entries = api.client.get("/api/v1/install-certificates").get_json()["installCertificates"]
    assert [(e["certificateType"], e["name"]) for e in entries] == [
        ("CSMSRootCertificate", v2g.ocpp_root.name),
        ("V2GRootCertificate", v2g.v2.root.name),
        ("V2GRootCertificate", v2g.v20.root.name),
        ("OEMRootCertificate", imported_name),
    ]
    for entry in entries:  # each is an OCPP 2.1 InstallCertificateRequest as it is
        _ocpp21_valid("InstallCertificateRequest", {k: entry[k] for k in ("certificateType", "certificate")})
    assert entries[-1]["certificate"].encode() == oem
    # The hash data is what GetInstalledCertificateIds reports, and names the root for hashRootCertificate.
    assert _root_hash(v2g.v20.root) in entries[2]["certificateHashData"]
    older = api.client.get("/api/v1/install-certificates?ocppVersion=2.0.1").get_json()
    assert "OEMRootCertificate" not in {e["certificateType"] for e in older["installCertificates"]}
    staging = _client_for(api, "csms-staging", "staging").get("/api/v1/install-certificates").get_json()
    assert [(e["certificateType"], e["name"]) for e in staging["installCertificates"]] == [
        ("CSMSRootCertificate", v2g.staging_root.name)
    ]


def _self_signed_ca(name: str) -> bytes:
    key = make_key("ec-p384")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(days=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


# -- identity check ------------------------------------------------------------------------------------
def _pem(der: bytes | None) -> str:
    return x509.load_der_x509_certificate(der or b"").public_bytes(serialization.Encoding.PEM).decode()


def test_identity_check_allows_only_the_station_s_own_current_certificate(api: Api) -> None:
    station, other = api.register(), api.register()
    signed, _ = api.signed(station)
    chain = signed["certificateChain"]

    def check(station_id: str, pem: str) -> dict[str, Any]:
        response = api.client.post(
            "/api/v1/identity-check", json={"chargingStationId": station_id, "clientCertificate": pem}
        )
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    assert check(station, chain) == {"allowed": True, "serialNumber": signed["serialNumber"]}
    assert check(other, chain)["reason"] == "cn_mismatch"  # a valid certificate of A connecting as B
    staging = _issue_direct(api, api.register(environment="staging"), environment="staging")
    assert check(staging.common_name or "", _pem(staging.der))["reason"] == "other_environment"
    expired = _issue_direct(api, api.register(), validity=timedelta(seconds=1))
    assert check(expired.common_name or "", _pem(expired.der))["reason"] == "expired"
    renamed = _issue_direct(api, api.register(), organization="Other CPO")
    assert check(renamed.common_name or "", _pem(renamed.der))["reason"] == "wrong_organization"
    key = make_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, station)]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, station)]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.now(UTC) - timedelta(days=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
    )
    self_signed = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    assert check(station, self_signed)["reason"] == "unknown_issuer"
    with api.pki.store.session() as session:
        csms_cert = _csms_certificate(api, session)
    assert check("csms-1", csms_cert[0])["reason"] == "not_a_charger_certificate"
    with api.pki.store.session() as session:
        disable_device(Work(session, "test", status=api.status), serial=station)
    assert check(station, chain)["reason"] == "device_disabled"
    with api.pki.store.session() as session:
        revoke(Work(session, "test", status=api.status), serial=signed["serialNumber"], reason="keyCompromise")
    verdict = check(station, chain)
    assert verdict["allowed"] is False and verdict["reason"] == "revoked" and "keyCompromise" in verdict["detail"]
    audited = [json.loads(e.details) for e in api.audit("csms.api.identity-check")]
    assert [a["reason"] for a in audited][:2] == [None, "cn_mismatch"]


def test_identity_check_refuses_certificates_under_a_revoked_or_retired_ca(api: Api, token: Token) -> None:
    """The records decide: a certificate the stored CA signed is refused once that CA (or one above it)
    is revoked or retired, even while the certificate itself is still valid in the records."""

    def check(station_id: str, pem: str) -> dict[str, Any]:
        response = api.client.post(
            "/api/v1/identity-check", json={"chargingStationId": station_id, "clientCertificate": pem}
        )
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    station = api.register()
    signed, _ = api.signed(station)
    assert check(station, signed["certificateChain"])["allowed"] is True
    with api.pki.store.session() as session:
        issuing = default_issuing_ca(session, "production")
        issuing_name, issuing_serial = issuing.name, issuing.serial
        session.commit()
    with api.pki.store.session() as session:
        revoke(Work(session, "test", status=api.status), serial=issuing_serial, reason="keyCompromise")
    verdict = check(station, signed["certificateChain"])
    assert (verdict["allowed"], verdict["reason"]) == (False, "ca_not_active"), verdict
    assert issuing_name in verdict["detail"] and "revoked" in verdict["detail"]
    with api.pki.store.session() as session:
        mine = session.scalar(select(Certificate).where(Certificate.serial == signed["serialNumber"]))
        assert mine is not None and mine.status == "valid"  # the leaf's own record still says valid
        session.commit()
    audited = json.loads(api.audit("csms.api.identity-check")[-1].details)
    assert (audited["allowed"], audited["reason"]) == (False, "ca_not_active")

    # Retired: staging's issuing CA is superseded by a rotation and then retired.
    staging_client = _client_for(api, "csms-staging", "staging")
    staging = api.register(environment="staging")
    issued = _issue_direct(api, staging, environment="staging")
    with api.pki.store.session() as session:
        old = default_issuing_ca(session, "staging")
        rotate_issuing_ca(Work(session, "test", status=api.status, token=token), environment="staging")
        retire(Work(session, "test", now=lambda: datetime.now(UTC)), authorities=[get_authority(session, old.name)])
    answer = staging_client.post(
        "/api/v1/identity-check", json={"chargingStationId": staging, "clientCertificate": _pem(issued.der)}
    ).get_json()
    assert (answer["allowed"], answer["reason"]) == (False, "ca_not_active") and "retired" in answer["detail"]


def _client_for(api: Api, name: str, environment: str) -> CheckedClient:
    with api.pki.store.session() as session:
        secret = issue_token(
            Work(session, "t"), client=add_client(Work(session, "test"), name=name, environment=environment)
        )
    return CheckedClient(api.client.client, {"Authorization": f"Bearer {secret}"})


def _csms_certificate(api: Api, session: Any, name: str = "csms-1") -> tuple[str, str]:
    """A csms-client certificate for ``name`` (PEM) and its key (PEM), as `chargepki csms add` makes them."""
    key = make_key()
    authority = default_issuing_ca(session, "production")
    issuer = issuer_for(authority, api.pki.token())
    row = issue(
        Work(session, "t", status=api.status),
        issuer=issuer,
        request=IssueRequest(get_profile("csms-client"), key.public_key(), name),
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _pem(row.der), key_pem.decode()


# -- authentication ------------------------------------------------------------------------------------
def test_every_endpoint_needs_credentials_and_says_so_in_json(api: Api) -> None:
    station = api.register()
    calls = [
        ("POST", "/api/v1/sign", {"chargingStationId": station, "csr": make_csr(station).decode()}),
        ("GET", "/api/v1/sign/" + "a" * 32, None),
        ("GET", "/api/v1/certificates/" + "a" * 64, None),
        ("GET", "/api/v1/certificates/by-hash?hashAlgorithm=SHA256", None),
        ("POST", "/api/v1/ocsp", {}),
        ("POST", "/api/v1/identity-check", {}),
        ("POST", "/api/v1/certificate-chain-status", {}),
        ("GET", "/api/v1/install-certificates", None),
    ]
    for method, path, body in calls:
        for headers in (
            {},
            {"Authorization": "Bearer cpk_wrong"},
            {"X-API-Key": "wrong"},
            {"Authorization": "Basic eDp5"},
        ):
            response = api.anonymous.open(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.get_json()["reason"] == "unauthenticated"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # Each of them is audited, counted into its address's summary rather than an entry of its own.
    with api.pki.store.session() as session:
        audit.flush_all_noise(session)
    summaries = api.audit(audit.NOISE)  # one per minute: the calls may straddle one
    assert summaries and all(summary.actor.startswith("anonymous@") for summary in summaries)
    assert sum(json.loads(summary.details)["count"] for summary in summaries) == len(calls) * 4
    assert {key for summary in summaries for key in json.loads(summary.details)["refusals"]} == {
        f"csms.api.{operation} unauthenticated"
        for operation in (
            "sign",
            "sign-job",
            "lookup",
            "ocsp",
            "identity-check",
            "certificate-chain-status",
            "install-certificates",
        )
    }
    # X-API-Key carries the same token; a replaced token and a disabled CSMS stop working at once.
    assert api.anonymous.get("/api/v1/certificates/" + "a" * 64, headers={"X-API-Key": api.token}).status_code == 404
    with api.pki.store.session() as session:
        newer = issue_token(Work(session, "test"), client=get_client(session, "csms-1"), replace=True)
    assert api.client.get("/api/v1/certificates/" + "a" * 64).status_code == 401
    fresh = CheckedClient(api.client.client, {"Authorization": f"Bearer {newer}"})
    assert fresh.get("/api/v1/certificates/" + "a" * 64).status_code == 404
    with api.pki.store.session() as session:
        set_enabled(Work(session, "test"), name="csms-1", enabled=False)
    assert fresh.get("/api/v1/certificates/" + "a" * 64).status_code == 401


def test_a_csms_client_certificate_authenticates_and_others_do_not(api: Api) -> None:
    """Through the trusted proxy header here (the TLS socket is exercised in tests/e2e/test_api.py)."""
    with api.pki.store.session() as session:
        certificate, _key = _csms_certificate(api, session)
        unregistered, _ = _csms_certificate(api, session, name="csms-unknown")
    header = {"X-SSL-Client-Cert": quote(certificate)}
    assert api.anonymous.get("/api/v1/certificates/" + "a" * 64, headers=header).status_code == 404
    assert api.audit("csms.api.lookup")[-1].actor == "csms:csms-1"
    assert json.loads(api.audit("csms.api.lookup")[-1].details)["auth"] == "certificate"
    station = api.register()
    signed, _ = api.signed(station)
    charger = {"X-SSL-Client-Cert": quote(signed["certificateChain"])}
    for refused in (charger, {"X-SSL-Client-Cert": quote(unregistered)}):
        assert api.anonymous.get("/api/v1/certificates/" + "a" * 64, headers=refused).status_code == 401
    with api.pki.store.session() as session:
        serial = x509.load_pem_x509_certificate(certificate.encode()).serial_number
        revoke(Work(session, "test", status=api.status), serial=format(serial, "X"), reason="keyCompromise")
    assert api.anonymous.get("/api/v1/certificates/" + "a" * 64, headers=header).status_code == 401


def _limited_app(api: Api, *, per_address: int, per_certificate: int) -> CheckedClient:
    """The installation served with small lockout limits (the ``[est]`` auth_* settings)."""
    settings = EstSettings(
        default_environment="production",
        client_cert_header="X-SSL-Client-Cert",
        trusted_proxies=("127.0.0.1",),
        auth_max_failures_per_address=per_address,
        auth_max_failures_per_device=per_certificate,
    )
    return CheckedClient(create_app(api.pki, settings).test_client())


def test_bad_api_credentials_are_locked_out_by_address_or_certificate_never_the_valid_client(api: Api) -> None:
    client = _limited_app(api, per_address=5, per_certificate=3)
    path = "/api/v1/certificates/" + "a" * 64
    guesser, elsewhere = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "198.51.100.2"}

    def call(address: dict[str, str], **headers: str) -> Any:
        return client.get(path, headers={**address, **headers})

    # Token guesses count against the address they come from: 5 refusals, then 429, the right token included.
    guesses = [call(guesser, Authorization=f"Bearer cpk_guess{number}") for number in range(8)]
    assert [r.status_code for r in guesses] == [401] * 5 + [429] * 3
    locked = call(guesser, Authorization=f"Bearer {api.token}")
    assert (locked.status_code, locked.get_json()["reason"]) == (429, "rate_limited")
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    # The CSMS whose token it is keeps working from its own address, by token and by certificate …
    assert call(elsewhere, Authorization=f"Bearer {api.token}").status_code == 404
    with api.pki.store.session() as session:
        certificate, _key = _csms_certificate(api, session)
        unregistered, _ = _csms_certificate(api, session, name="csms-unknown")
    assert call(elsewhere, **{"X-SSL-Client-Cert": quote(certificate)}).status_code == 404
    # … and with its certificate even from the guesser's address (a shared NAT): another key space.
    assert call(guesser, **{"X-SSL-Client-Cert": quote(certificate)}).status_code == 404
    # A refused certificate counts against itself, from any address; the valid one is untouched.
    refused = [call(a, **{"X-SSL-Client-Cert": quote(unregistered)}) for a in (guesser, elsewhere) * 2]
    assert [r.status_code for r in refused] == [401, 401, 401, 429]
    assert call(guesser, **{"X-SSL-Client-Cert": quote(certificate)}).status_code == 404
    # The audit chain holds the two lockouts and the valid calls; the refusals are only counted.
    lockouts = api.audit("auth.locked_out")
    assert sorted(json.loads(e.details)["locked"] for e in lockouts) == ["csmscert", "token"]
    assert all(e.actor.startswith("csms:") for e in api.audit("csms.api.lookup"))
    with api.pki.store.session() as session:
        audit.flush_all_noise(session)
    summaries = api.audit(audit.NOISE)
    assert len(summaries) <= 4  # two addresses, the calls may straddle a minute
    refusals: dict[str, int] = {}
    for summary in summaries:
        for key, count in json.loads(summary.details)["refusals"].items():
            refusals[key] = refusals.get(key, 0) + count
    assert refusals == {"csms.api.lookup unauthenticated": 8, "csms.api.lookup rate_limited": 5}


def test_concurrent_token_guesses_start_exactly_one_lockout(api: Api) -> None:
    """Threads guessing at once from one address: every failure is counted in the database, the
    lockout starts once (one audit entry), and a valid CSMS elsewhere is never refused meanwhile."""
    client = _limited_app(api, per_address=10, per_certificate=5)
    path = "/api/v1/certificates/" + "a" * 64
    statuses: list[int] = []
    valid: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(5)

    def guess(worker: int) -> None:
        start.wait()
        for number in range(8):
            headers = {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer cpk_{worker}_{number}"}
            status_code = client.get(path, headers=headers).status_code
            with lock:
                statuses.append(status_code)

    def honest() -> None:
        start.wait()
        for _ in range(8):
            headers = {"X-Forwarded-For": "198.51.100.3", "Authorization": f"Bearer {api.token}"}
            status_code = client.get(path, headers=headers).status_code
            with lock:
                valid.append(status_code)

    threads = [threading.Thread(target=guess, args=(worker,)) for worker in range(4)]
    threads.append(threading.Thread(target=honest))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [401, 429] and len(statuses) == 32
    assert statuses.count(401) >= 10  # requests already past the check when the lockout began are refused 401 too
    assert valid == [404] * 8
    assert len(api.audit("auth.locked_out")) == 1
    locked = client.get(path, headers={"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {api.token}"})
    assert locked.status_code == 429


def test_behind_the_front_door_calls_are_audited_with_the_clients_address(api: Api) -> None:
    """The application as ``serve est`` runs it behind nginx (web.server.behind_front_door): the proxy is
    the Unix socket's peer (no REMOTE_ADDR) and sends the client's address in X-Forwarded-For. That
    address is audited, not the proxy's; a client reaching the application directly cannot pick its own."""
    app = create_app(api.pki, behind_front_door(EstSettings(default_environment="production")))
    client = CheckedClient(app.test_client(), {"Authorization": f"Bearer {api.token}"})
    lookup = "/api/v1/certificates/" + "a" * 64

    def audited(**kwargs: Any) -> str | None:
        assert client.get(lookup, **kwargs).status_code == 404
        return json.loads(api.audit("csms.api.lookup")[-1].details)["address"]

    from_proxy = {"REMOTE_ADDR": ""}  # gunicorn's peer address on a Unix socket
    assert audited(environ_base=from_proxy, headers={"X-Forwarded-For": "198.51.100.23"}) == "198.51.100.23"
    assert audited(environ_base=from_proxy, headers={"X-Real-IP": "2001:db8::7"}) == "2001:db8::7"
    assert audited(environ_base=from_proxy) is None  # no header: no address rather than the proxy's
    direct = {"REMOTE_ADDR": "192.0.2.44"}  # a TCP peer is no trusted proxy here: its headers are ignored
    spoofed = {"X-Forwarded-For": "198.51.100.23", "X-Real-IP": "198.51.100.23"}
    assert audited(environ_base=direct, headers=spoofed) == "192.0.2.44"
    # The same for an unauthenticated call, counted into its address's noise summary.
    assert client.get(lookup, environ_base=direct, headers={**spoofed, "Authorization": "Bearer x"}).status_code == 401
    with api.pki.store.session() as session:
        audit.flush_all_noise(session)
    assert {summary.actor for summary in api.audit(audit.NOISE)} == {"anonymous@192.0.2.44"}


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_input_is_a_json_4xx_never_a_500(api: Api) -> None:
    station = api.register()
    csr = make_csr(station).decode()
    good = {"chargingStationId": station, "csr": csr}
    post = api.client.post
    cases = [
        (post("/api/v1/sign", data="{not json", content_type=JSON), 400, "malformed_json"),
        (post("/api/v1/sign", data=b"\xff\xfe\x00", content_type=JSON), 400, "malformed_json"),
        (post("/api/v1/sign", data=json.dumps(good), content_type="text/plain"), 415, "unsupported_media_type"),
        (post("/api/v1/sign", data=json.dumps(good)), 415, "unsupported_media_type"),
        (post("/api/v1/sign", data="x" * 40000, content_type=JSON), 413, "body_too_large"),
        (post("/api/v1/sign", json={**good, "extra": 1}), 400, "unknown_field"),
        (post("/api/v1/sign", json={"csr": csr}), 400, "missing_field"),
        (post("/api/v1/sign", json={**good, "chargingStationId": 7}), 400, "bad_value"),
        (post("/api/v1/sign", json={**good, "certificateType": "Other"}), 400, "bad_value"),
        (post("/api/v1/sign", json={**good, "csr": "x" * 5501}), 400, "bad_value"),
        (post("/api/v1/sign", json=[good]), 400, "bad_value"),
        (post("/api/v1/sign", json=None, data="null", content_type=JSON), 400, "bad_value"),
        (post("/api/v1/sign?async=maybe", json=good), 400, "bad_value"),
        (post("/api/v1/sign?verbose=1", json=good), 400, "unknown_field"),
        (post("/api/v1/sign?async=1&async=1", json=good), 400, "bad_value"),
        (post("/api/v1/sign", json={**good, "csr": "-----BEGIN CERTIFICATE REQUEST-----\n!!\n"}), 400, "bad_csr"),
        (
            post("/api/v1/identity-check", json={"chargingStationId": station, "clientCertificate": "junk"}),
            400,
            "bad_certificate",
        ),
        (post("/api/v1/identity-check", json={"chargingStationId": station}), 400, "missing_field"),
        (post("/api/v1/ocsp", json={"ocspRequestData": {"hashAlgorithm": "SHA1"}}), 400, "missing_field"),
        (post("/api/v1/ocsp", json={"ocspRequestData": _hash("SHA1")}), 400, "bad_value"),
        (post("/api/v1/ocsp", json={"ocspRequestData": _hash("SHA256", name="zz" * 32)}), 400, "bad_value"),
        (post("/api/v1/ocsp", json={"ocspRequestData": _hash("SHA256", name="ab")}), 400, "bad_hash"),
        (post("/api/v1/ocsp", json={"ocspRequestData": _hash("SHA256", serial="0")}), 400, "bad_serial"),
        (post("/api/v1/ocsp", json={"ocspRequestData": {**_hash("SHA256"), "more": 1}}), 400, "unknown_field"),
        (api.client.get("/api/v1/certificates/xyz"), 400, "bad_fingerprint"),
        (api.client.get("/api/v1/certificates/by-hash?hashAlgorithm=SHA256"), 400, "missing_field"),
        (api.client.get("/api/v1/certificates/by-hash?" + _query(_hash("MD5"))), 400, "bad_value"),
        (api.client.get("/api/v1/certificates/by-hash?" + _query(_hash("SHA256", serial="1" * 41))), 400, "bad_value"),
        (api.client.get("/api/v1/certificates/" + "a" * 64 + "?x=1"), 400, "unknown_field"),
        (api.client.get("/api/v1/nothing-here"), 404, "not_found"),
        (api.client.open("DELETE", "/api/v1/sign"), 405, "method_not_allowed"),
        (api.client.get("/api/v1/sign"), 405, "method_not_allowed"),
    ]
    for number, (response, status, reason) in enumerate(cases):
        assert response.status_code == status, (number, response.get_json())
        assert response.get_json()["reason"] == reason, (number, response.get_json())
    assert "POST" in api.client.get("/api/v1/sign").headers["Allow"]


def _hash(algorithm: str, *, name: str | None = None, serial: str = "1A") -> dict[str, str]:
    size = {"SHA256": 64, "SHA384": 96, "SHA512": 128}.get(algorithm, 40)
    return {
        "hashAlgorithm": algorithm,
        "issuerNameHash": name or "ab" * (size // 2),
        "issuerKeyHash": "cd" * (size // 2),
        "serialNumber": serial,
        "responderURL": "http://127.0.0.1:8081/ocsp",
    }


def _hash_data_only(algorithm: str) -> dict[str, str]:
    return {k: v for k, v in _hash(algorithm).items() if k != "responderURL"}


def _query(data: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in data.items() if k != "responderURL")


# -- the OpenAPI document ------------------------------------------------------------------------------
def test_the_openapi_document_is_valid_served_and_documents_every_route(api: Api) -> None:
    validate_openapi(DOCUMENT)
    served = api.anonymous.get("/api/v1/openapi.json")
    assert served.status_code == 200 and served.get_json() == json.loads(json.dumps(DOCUMENT))
    routes = set()
    for rule in api.app.url_map.iter_rules():
        if rule.endpoint.startswith("api."):
            path = rule.rule
            for argument in rule.arguments:
                path = path.replace(f"<{argument}>", "{" + {"job_id": "jobId"}.get(argument, argument) + "}")
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                routes.add((path, method.lower()))
    documented = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert routes == documented


def test_the_document_follows_the_ocpp_2_1_schemas_of_the_ocpp_library() -> None:
    """Field names, enums and limits as OCPP 2.1's JSON schemas (shipped with the `ocpp` library) have
    them; the API is stricter only where OCPP leaves a value open (hex digits, a 32-bit integer)."""
    schemas = DOCUMENT["components"]["schemas"]

    def definitions(name: str) -> dict[str, Any]:
        return ocpp21_schema(name)["definitions"]

    sign = ocpp21_schema("SignCertificateRequest")
    ours = schemas["SignRequest"]["properties"]
    assert set(sign["properties"]) - {"customData"} <= set(ours)
    assert (
        ours["certificateType"]["enum"]
        == definitions("SignCertificateRequest")["CertificateSigningUseEnumType"]["enum"]
    )
    assert ours["csr"]["maxLength"] == sign["properties"]["csr"]["maxLength"]
    assert sign["properties"]["requestId"]["type"] == ours["requestId"]["type"] == "integer"
    ocpp_hash = definitions("SignCertificateRequest")["CertificateHashDataType"]
    hash_data = schemas["CertificateHashData"]
    assert hash_data["required"] == ocpp_hash["required"]
    assert (
        hash_data["properties"]["hashAlgorithm"]["enum"]
        == definitions("SignCertificateRequest")["HashAlgorithmEnumType"]["enum"]
    )
    for field in ("issuerNameHash", "issuerKeyHash", "serialNumber"):
        assert hash_data["properties"][field]["maxLength"] == ocpp_hash["properties"][field]["maxLength"]
    signed = ocpp21_schema("CertificateSignedRequest")["properties"]
    result = schemas["SignResult"]["properties"]
    assert result["certificateChain"]["maxLength"] == signed["certificateChain"]["maxLength"] == 10000
    assert result["certificateType"]["enum"] == ours["certificateType"]["enum"]

    request = ocpp21_schema("GetCertificateChainStatusRequest")
    entries = request["properties"]["certificateStatusRequests"]
    ours_entries = schemas["CertificateChainStatusRequest"]["properties"]["certificateStatusRequests"]
    assert (ours_entries["minItems"], ours_entries["maxItems"]) == (entries["minItems"], entries["maxItems"]) == (1, 4)
    info = definitions("GetCertificateChainStatusRequest")["CertificateStatusRequestInfoType"]
    ours_info = schemas["CertificateStatusRequestInfo"]
    assert set(info["properties"]) - {"customData"} == set(ours_info["properties"])
    assert sorted(info["required"]) == sorted(ours_info["required"])
    assert (
        ours_info["properties"]["source"]["enum"]
        == definitions("GetCertificateChainStatusRequest")["CertificateStatusSourceEnumType"]["enum"]
    )
    urls, ours_urls = info["properties"]["urls"], ours_info["properties"]["urls"]
    assert (ours_urls["minItems"], ours_urls["maxItems"]) == (urls["minItems"], urls["maxItems"])
    assert ours_urls["items"]["maxLength"] == urls["items"]["maxLength"] == 2000
    response = definitions("GetCertificateChainStatusResponse")
    ours_status = schemas["CertificateChainStatusResult"]["properties"]["certificateStatus"]["items"]
    assert set(response["CertificateStatusType"]["properties"]) - {"customData"} == set(ours_status["properties"])
    assert sorted(response["CertificateStatusType"]["required"]) == sorted(ours_status["required"])
    assert ours_status["properties"]["status"]["enum"] == response["CertificateStatusEnumType"]["enum"]

    status_response = ocpp21_schema("GetCertificateStatusResponse")["properties"]["ocspResult"]
    assert schemas["OcspResult"]["properties"]["ocspResult"]["maxLength"] == status_response["maxLength"] == 18000
    ocsp_request = definitions("GetCertificateStatusRequest")["OCSPRequestDataType"]["properties"]["responderURL"]
    ocsp_data = schemas["OcspRequest"]["properties"]["ocspRequestData"]["properties"]
    assert ocsp_data["responderURL"]["maxLength"] == ocsp_request["maxLength"] == 2000
    install = definitions("InstallCertificateRequest")["InstallCertificateUseEnumType"]["enum"]
    item = schemas["InstallCertificates"]["properties"]["installCertificates"]["items"]["properties"]
    assert item["certificateType"]["enum"] == install and "OEMRootCertificate" in install


# -- the document states exactly what the API accepts ---------------------------------------------------
# (field overrides, schema-valid?): every value the core would refuse is refused by the schema, and the
# API's verdict is the schema's. Some values the core alone would read (lower-case algorithm names,
# surrounding blanks, Python's "0x"/"_" in int()) are refused by the schema and so by the API.
_HEX64, _HEX96, _HEX128 = "ab" * 32, "Cd" * 48, "0F" * 64
_HASH_DATA_CASES: list[tuple[dict[str, str], bool]] = [
    ({}, True),
    ({"issuerNameHash": _HEX64.upper(), "issuerKeyHash": _HEX64}, True),
    ({"hashAlgorithm": "SHA384", "issuerNameHash": _HEX96, "issuerKeyHash": _HEX96}, True),
    ({"hashAlgorithm": "SHA512", "issuerNameHash": _HEX128, "issuerKeyHash": _HEX128}, True),
    ({"serialNumber": "1"}, True),
    ({"serialNumber": "01"}, True),  # leading zeros are read as hex (OCPP says none; chargers send them)
    ({"serialNumber": "0" * 39 + "1"}, True),
    ({"serialNumber": "f" * 40}, True),
    # lengths tied to the algorithm
    ({"hashAlgorithm": "SHA384"}, False),  # 64 digits with SHA384
    ({"hashAlgorithm": "SHA512", "issuerNameHash": _HEX128}, False),  # the key hash still 64
    ({"hashAlgorithm": "SHA256", "issuerKeyHash": _HEX96}, False),
    ({"issuerNameHash": _HEX64[:-1]}, False),  # odd
    ({"issuerNameHash": _HEX64[:-2]}, False),
    ({"issuerKeyHash": _HEX64 + "ab"}, False),
    ({"issuerKeyHash": "zz" * 32}, False),
    ({"issuerNameHash": _HEX64[:-1] + "\n"}, False),
    ({"issuerNameHash": _HEX64 + "\n"}, False),
    ({"issuerNameHash": " " + _HEX64}, False),
    ({"issuerNameHash": ""}, False),
    ({"hashAlgorithm": "sha256"}, False),
    ({"hashAlgorithm": "SHA1", "issuerNameHash": "ab" * 20, "issuerKeyHash": "ab" * 20}, False),
    # serial numbers
    ({"serialNumber": ""}, False),
    ({"serialNumber": "0"}, False),
    ({"serialNumber": "000"}, False),
    ({"serialNumber": "1" * 41}, False),
    ({"serialNumber": "0x1A"}, False),
    ({"serialNumber": "1_0"}, False),
    ({"serialNumber": "+1"}, False),
    ({"serialNumber": "-1"}, False),
    ({"serialNumber": " 1A"}, False),
    ({"serialNumber": "1A\n"}, False),
    ({"serialNumber": "\uff11"}, False),  # a full-width digit: int() reads it, the schema does not
    ({"serialNumber": "G1"}, False),
]


def _schema_accepts(schema: dict[str, Any], instance: object) -> bool:
    """Plain jsonschema against the document; its Python ``re`` lets ``$`` match before a final newline,
    where ECMA-262 (and the API's validator) does not, so such values are judged by the API's validator."""
    plain = Draft202012Validator({**schema, "components": DOCUMENT["components"]}).is_valid(instance)
    ecma = Validator({**schema, "components": DOCUMENT["components"]}).is_valid(instance)
    if not _ends_in_newline(instance):
        assert plain == ecma, instance
    return bool(ecma)


def _ends_in_newline(instance: object) -> bool:
    if isinstance(instance, dict):
        return any(_ends_in_newline(value) for value in instance.values())
    return isinstance(instance, str) and instance.endswith("\n")


def _core_accepts(data: dict[str, str]) -> bool:
    try:
        parse_hash_data(data["hashAlgorithm"], data["issuerNameHash"], data["issuerKeyHash"], data["serialNumber"])
    except InputError:
        return False
    return True


@pytest.mark.parametrize(("overrides", "valid"), _HASH_DATA_CASES)
def test_the_hash_data_schemas_accept_exactly_what_the_core_reads(overrides: dict[str, str], valid: bool) -> None:
    data = {**_hash("SHA256"), **overrides}
    ocsp_request = {"ocspRequestData": data}
    query = {k: v for k, v in data.items() if k != "responderURL"}
    by_hash = DOCUMENT["paths"]["/api/v1/certificates/by-hash"]["get"]["parameters"][0]["schema"]
    assert _schema_accepts({"$ref": "#/components/schemas/OcspRequest"}, ocsp_request) is valid
    assert _schema_accepts(by_hash, query) is valid  # CertificateHashData as exploded query parameters
    if valid:  # a schema-valid CertID is never refused by the core
        assert _core_accepts(data)


def test_the_api_refuses_exactly_the_schema_invalid_cert_ids_and_fingerprints(api: Api) -> None:
    for overrides, valid in _HASH_DATA_CASES:
        data = {**_hash("SHA256"), **overrides}
        answer = api.client.post("/api/v1/ocsp", json={"ocspRequestData": data})
        # schema-valid: the issuer hashes name no CA here (404), never a 400
        expected = (404, "unknown_issuer") if valid else (400, answer.get_json()["reason"])
        assert (answer.status_code, answer.get_json()["reason"]) == expected, (overrides, answer.get_json())
        assert valid or answer.get_json()["reason"] in ("bad_value", "bad_hash", "bad_serial"), overrides
        query = urlencode({k: v for k, v in data.items() if k != "responderURL"})
        found = api.client.get(f"/api/v1/certificates/by-hash?{query}")
        assert (found.status_code == 400) is not valid, (overrides, found.get_json())
        assert valid or found.get_json()["reason"] in ("bad_value", "bad_hash", "bad_serial"), overrides
    fingerprint_schema = DOCUMENT["paths"]["/api/v1/certificates/{fingerprint}"]["get"]["parameters"][0]["schema"]
    hex64 = "0123456789abcdef" * 4
    fingerprints = {
        hex64: True,
        hex64.upper(): True,
        ":".join(hex64[i : i + 2] for i in range(0, 64, 2)): True,
        ":" + hex64 + "::": True,
        hex64[:-1]: False,
        hex64 + "a": False,
        hex64[:-1] + "g": False,
        hex64 + "\n": False,
        " " + hex64: False,
        hex64[:32] + "-" + hex64[32:]: False,
        ":" * 64: False,
    }
    for fingerprint, valid in fingerprints.items():
        assert _schema_accepts(fingerprint_schema, fingerprint) is valid, fingerprint
        answer = api.client.get(f"/api/v1/certificates/{quote(fingerprint, safe=':')}")
        expected = (404, "unknown_certificate") if valid else (400, "bad_fingerprint")
        assert (answer.status_code, answer.get_json()["reason"]) == expected, fingerprint
    job_schema = DOCUMENT["paths"]["/api/v1/sign/{jobId}"]["get"]["parameters"][0]["schema"]
    for job_id, valid in {
        "0" * 32: True,
        "ab" * 16: True,
        "AB" * 16: False,
        "a" * 31: False,
        "a" * 32 + "\n": False,
    }.items():
        assert _schema_accepts(job_schema, job_id) is valid, job_id
        answer = api.client.get(f"/api/v1/sign/{quote(job_id)}")  # no such job either way: a 404, never a 400
        assert (answer.status_code, answer.get_json()["reason"]) == (404, "unknown_job"), job_id


# -- a short schema-driven fuzz --------------------------------------------------------------------------
_SCHEMA_REASONS = {
    "bad_value",
    "unknown_field",
    "missing_field",
    "bad_hash",
    "bad_serial",
    "too_many_entries",
    "no_entries",
    "too_many_urls",
    "field_too_long",
}


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = DOCUMENT["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _requests(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances of a document schema: objects composed here (property by property, the ``if``/``then``
    conditions applied to the properties drawn after their discriminator), strings and enums by
    hypothesis-jsonschema (whose object strategy does not run on this hypothesis)."""
    schema = _resolved(schema)
    size = schema.get("minLength")
    if schema.get("type") == "string" and size is not None and size == schema.get("maxLength") and "pattern" in schema:
        # A fixed length under a pattern: hypothesis-jsonschema would draw from the pattern and filter
        # on the length (almost never met); draw that many of the characters the pattern takes instead.
        alphabet = [c for c in string.printable if Validator({"pattern": schema["pattern"]}).is_valid(c * size)]
        return st.text(alphabet=alphabet, min_size=size, max_size=size)
    if schema.get("type") == "array":
        return st.lists(_requests(schema["items"]), min_size=schema.get("minItems", 0), max_size=schema["maxItems"])
    if schema.get("type") != "object":
        return from_schema({k: v for k, v in schema.items() if not k.startswith("x-") and k != "description"})
    conditions = [branch for branch in schema.get("allOf", []) if "if" in branch]
    deciding = {name for branch in conditions for name in branch["if"].get("properties", {})}
    names = sorted(schema["properties"], key=lambda name: name not in deciding)

    @st.composite
    def draw_object(draw: st.DrawFn) -> dict[str, Any]:
        drawn: dict[str, Any] = {}
        for name in names:
            if name not in schema.get("required", []) and not draw(st.booleans()):
                continue
            field = dict(_resolved(schema["properties"][name]))
            for branch in conditions:
                if Validator(branch["if"]).is_valid(drawn):
                    field.update(branch["then"].get("properties", {}).get(name, {}))
            drawn[name] = draw(_requests(field))
        return drawn

    return draw_object()


def test_schema_valid_requests_are_never_refused_by_the_schema_nor_answered_5xx(api: Api) -> None:
    """Generated requests for every operation through the Flask test client, every answer also checked
    against the document by ``CheckedClient``. Each operation starts from real requests that succeed
    (hypothesis' explicit examples, run in every profile) and draws both fresh instances of the schema
    and real requests with fields replaced, so the success paths are fuzzed too, not only refusals.

    Budget: the profile's examples per operation (``ci``: 40 in ``make test``); with ``API_FUZZ_SECONDS``
    (``make fuzz``) rounds of ``_FUZZ_ROUND`` examples, each from a new seed, until that many seconds
    (per database, shared by the operations) were spent."""
    real = _real_requests(api)
    operations: list[tuple[str, dict[str, Any], list[Any], Callable[[Any], Any]]] = [
        (
            "/api/v1/ocsp",
            _ref_schema("OcspRequest"),
            real["ocsp"],
            lambda body: api.client.post("/api/v1/ocsp", json=body),
        ),
        (
            "/api/v1/certificates/by-hash",
            _ref_schema("CertificateHashData"),
            real["by-hash"],
            lambda query: api.client.get(f"/api/v1/certificates/by-hash?{urlencode(query)}"),
        ),
        (
            "/api/v1/certificates/{fingerprint}",
            _path_schema("/api/v1/certificates/{fingerprint}"),
            real["fingerprint"],
            lambda fingerprint: api.client.get(f"/api/v1/certificates/{quote(fingerprint, safe=':')}"),
        ),
        (
            "/api/v1/identity-check",
            _ref_schema("IdentityCheckRequest"),
            real["identity-check"],
            lambda body: api.client.post("/api/v1/identity-check", json=body),
        ),
        (
            "/api/v1/sign",
            _ref_schema("SignRequest"),
            real["sign"],
            lambda body: api.client.post("/api/v1/sign", json=body),
        ),
        (
            "/api/v1/sign/{jobId}",
            _path_schema("/api/v1/sign/{jobId}"),
            real["job"],
            lambda job_id: api.client.get(f"/api/v1/sign/{quote(job_id, safe='')}"),
        ),
        (
            "/api/v1/certificate-chain-status",
            _ref_schema("CertificateChainStatusRequest"),
            real["chain-status"],
            lambda body: api.client.post("/api/v1/certificate-chain-status", json=body),
        ),
        (
            "/api/v1/install-certificates",
            _query_schema("/api/v1/install-certificates"),
            real["install-certificates"],
            lambda query: api.client.get(f"/api/v1/install-certificates?{urlencode(query)}"),
        ),
    ]
    budget = float(os.environ.get("API_FUZZ_SECONDS") or 0) / len(operations)
    for path, schema, examples, call in operations:
        statuses = _fuzz_one(path, schema, examples, call, seconds=budget)
        assert statuses & {200, 202}, (path, statuses)  # the real requests reached the success path


def _path_schema(path: str) -> dict[str, Any]:
    return DOCUMENT["paths"][path]["get"]["parameters"][0]["schema"]


def _query_schema(path: str) -> dict[str, Any]:
    """A GET operation's (non-exploded) query parameters as the object the API validates them as."""
    parameters = DOCUMENT["paths"][path]["get"]["parameters"]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [p["name"] for p in parameters if p.get("required")],
        "properties": {p["name"]: p["schema"] for p in parameters},
    }


def _real_requests(api: Api) -> dict[str, list[Any]]:
    """Requests that succeed against this installation: a signed charger's hash data and fingerprint,
    its identity check, a CSR of another registered station (also naming its root, OCPP 2.1), a pending
    signing job, its chain status by OCSP and by the published CRL, the InstallCertificate bundle."""
    station, signer = api.register(), api.register()
    signed, _key = api.signed(station)
    info = api.client.get(f"/api/v1/certificates/{signed['fingerprintSha256']}").get_json()
    hash_data = info["certificateHashData"]
    fingerprint = signed["fingerprintSha256"]
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    job = api.sign(signer, make_csr(signer), query="?async=1").get_json()["jobId"]  # no runner: stays pending
    with api.pki.store.session() as session:
        root = default_issuing_ca(session, "production").parent
        root_hash = _root_hash(root, "SHA512")
        session.commit()
    publish_all_crls(api)
    chain_status = [
        {"certificateHashData": data, "source": source, "urls": ["http://127.0.0.1:8081/ocsp"]}
        for data, source in zip(hash_data, ("OCSP", "CRL", "OCSP"), strict=True)
    ]
    return {
        "ocsp": [{"ocspRequestData": {**data, "responderURL": "http://127.0.0.1:8081/ocsp"}} for data in hash_data],
        "by-hash": hash_data,
        "fingerprint": [fingerprint, colons],
        "identity-check": [{"chargingStationId": station, "clientCertificate": signed["certificateChain"]}],
        "sign": [
            {"chargingStationId": signer, "csr": make_csr(signer).decode()},
            {
                "chargingStationId": signer,
                "csr": make_csr(signer).decode(),
                "certificateType": "ChargingStationCertificate",
            },
            {  # OCPP 2.1: requestId and the (current) root to sign under
                "chargingStationId": signer,
                "csr": make_csr(signer).decode(),
                "requestId": 2**31 - 1,
                "hashRootCertificate": root_hash,
            },
        ],
        "job": [job],
        "chain-status": [{"certificateStatusRequests": chain_status}, {"certificateStatusRequests": chain_status[:1]}],
        "install-certificates": [{}, {"ocppVersion": "2.0.1"}, {"ocppVersion": "2.1"}],
    }


def _near(schema: dict[str, Any], real: list[Any]) -> st.SearchStrategy[Any]:
    """A real request with some of its fields replaced by drawn ones or left out (recursively)."""
    schema = _resolved(schema)
    if schema.get("type") != "object":
        return st.one_of(st.sampled_from(real), _requests(schema))
    required = set(schema.get("required", []))

    @st.composite
    def draw_near(draw: st.DrawFn) -> dict[str, Any]:
        drawn = dict(draw(st.sampled_from(real)))
        for name, field in schema["properties"].items():
            choice = draw(st.integers(0, 5))  # mostly kept, so most instances stay close to a success
            if choice == 0:
                drawn[name] = draw(_requests(field))
            elif choice == 1 and name not in required:
                drawn.pop(name, None)
            elif choice == 2 and isinstance(drawn.get(name), dict):
                drawn[name] = draw(_near(field, [drawn[name]]))
        return drawn

    return draw_near()


_FUZZ_ROUND = 50  # examples per round under a time budget: short rounds keep its end near


def _fuzz_one(
    path: str, schema: dict[str, Any], real: list[Any], call: Callable[[Any], Any], *, seconds: float = 0
) -> set[int]:
    """Run the property over one operation (repeated until ``seconds`` were spent); the statuses seen."""
    full = Validator({**schema, "components": DOCUMENT["components"]})
    statuses: set[int] = set()

    rounds = {"max_examples": _FUZZ_ROUND} if seconds else {}

    @hypothesis_settings(deadline=None, suppress_health_check=list(HealthCheck), **rounds)
    @given(st.one_of(_requests(schema), _near(schema, real)))
    def one(instance: Any) -> None:
        assume(full.is_valid(instance))  # the document's reading of its patterns (ECMA-262's $)
        answer = call(instance)
        reason = (answer.get_json(silent=True) or {}).get("reason")
        statuses.add(answer.status_code)
        assert answer.status_code < 500, (path, instance, answer.get_json(silent=True))
        assert not (answer.status_code == 400 and reason in _SCHEMA_REASONS), (path, instance, reason)

    for instance in real:  # run first, in every profile
        assert full.is_valid(instance), (path, instance)
        one = example(instance)(one)
    end = time.monotonic() + seconds  # a budget, not an assertion: rounds until it is spent
    one()
    while time.monotonic() < end:
        one()
    return statuses


def _ref_schema(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def test_the_answers_seen_cover_every_documented_success() -> None:
    """Runs last in this module: the answers validated above include every operation's success."""
    successes = {(path, method) for path, method, status in CHECKED if status in (200, 202)}
    documented = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    if not CHECKED:
        pytest.skip("run with the rest of the module")
    assert documented <= successes, documented - successes
