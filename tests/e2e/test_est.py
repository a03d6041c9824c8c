"""EST (RFC 7030) end to end: `chargepki serve est` in its own process over real HTTPS on
loopback, spoken to with `requests` and with curl + openssl as independent clients.
Runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from ca import audit
from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.issuers import default_issuing_ca, issuer_for
from ca.clock import Clock, utcnow
from ca.config import EstSettings, Pkcs11Settings
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device, disable_device, get_device
from ca.registry.secrets import issue_secret
from ca.status.revocation import revoke
from ca.store.engine import Store
from ca.store.models import AuditEvent, Certificate
from ca.work import Work
from ocsp.presign import Presigner
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import b64csr, make_key

ORG = "Acme Charging"
PKCS10 = {"Content-Type": "application/pkcs10"}


class Fleet:
    """The test's view of one installation: its store, token, server and trust anchor."""

    def __init__(self, store: Store, token: Token, server: EstServer, root: Path, tmp: Path) -> None:
        self.store, self.token, self.server, self.root, self.tmp = store, token, server, root, tmp
        self.counter = 0

    def new_serial(self) -> str:
        self.counter += 1
        return f"CP-{self.server.port}-{self.counter:05d}"

    def register(self, serial: str | None = None, environment: str = "production") -> tuple[str, str]:
        serial = serial or self.new_serial()
        with self.store.session() as session:
            add_device(Work(session, "test"), serial=serial, environment=environment)
            return serial, issue_secret(Work(session, "test"), device=get_device(session, serial))

    def secret(self, serial: str, *, now: Clock = utcnow) -> str:
        with self.store.session() as session:
            return issue_secret(Work(session, "test", now=now), device=get_device(session, serial))

    def post(
        self, operation: str, body: bytes, *, auth=None, cert=None, headers=None, label: str = ""
    ) -> requests.Response:
        prefix = f"{self.server.url}/{label + '/' if label else ''}"
        return requests.post(
            prefix + operation,
            data=body,
            auth=auth,
            cert=cert,
            headers=PKCS10 if headers is None else headers,
            verify=str(self.root),
            timeout=30,
        )

    def enroll(self, serial: str, secret: str, key=None, **kwargs) -> requests.Response:
        return self.post("simpleenroll", b64csr(serial, key=key, **kwargs), auth=(serial, secret))

    def write_identity(self, response: requests.Response, key, name: str) -> tuple[str, str]:
        """The issued certificate and its key as files, for use as a TLS client identity."""
        return self.write_identity_from(certificate_from(response), key, name)

    def write_identity_from(self, certificate: x509.Certificate, key, name: str) -> tuple[str, str]:
        cert_path, key_path = self.tmp / f"{name}.pem", self.tmp / f"{name}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(cert_path), str(key_path)

    def refusals(self) -> int:
        """Refusals audited: entries of their own, and those counted into anonymous summaries (flushed on read)."""
        actions = ("enrollment.refused", "reenrollment.refused")
        with self.store.session() as session:
            audit.flush_all_noise(session)
            own = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action.in_(actions)))
            summarised = sum(
                count
                for details in session.scalars(select(AuditEvent.details).where(AuditEvent.action == audit.NOISE))
                for key, count in json.loads(details)["refusals"].items()
                if key.split(" ")[0] in actions
            )
            session.commit()
            return own + summarised


def certificate_from(response: requests.Response) -> x509.Certificate:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/pkcs7-mime")
    assert "smime-type=certs-only" in response.headers["Content-Type"]
    assert response.headers["Content-Transfer-Encoding"] == "base64"
    (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    return certificate


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request, tmp_path_factory, token: Token, token_settings: tuple[Pkcs11Settings, str]) -> Iterator[Fleet]:
    status = Presigner(token)
    tmp = tmp_path_factory.mktemp(f"est-{request.param}")
    with database(request.param, tmp) as url:
        store = Store(url)
        store.upgrade()
        with store.session() as session:
            hierarchy = init_hierarchy(
                Work(session=session, actor="test", status=status, token=token),
                request=HierarchyRequest(organization=ORG, country="DE"),
            )
            init_hierarchy(
                Work(session=session, actor="test", status=status, token=token),
                request=HierarchyRequest(organization=ORG, environment="staging"),
            )
            root = tmp / "root.pem"
            root.write_bytes(
                x509.load_der_x509_certificate(hierarchy.root.certificate_der).public_bytes(serialization.Encoding.PEM)
            )
        home = write_home(tmp / "home", url, token_settings[0], EstSettings(default_environment="production"))
        server = start_server(home, free_port())
        try:
            yield Fleet(store, token, server, root, tmp)
        finally:
            server.stop()
            store.dispose()
        log = server.log.read_text()
        assert "Traceback" not in log and '" 500 ' not in log, "no request may end in a 500 or a traceback"


# -- cacerts and csrattrs -------------------------------------------------------------------------
def test_cacerts_is_the_chain_as_base64_pkcs7(fleet: Fleet) -> None:
    response = requests.get(f"{fleet.server.url}/cacerts", verify=str(fleet.root), timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/pkcs7-mime; smime-type=certs-only"
    assert response.headers["Content-Transfer-Encoding"] == "base64"
    certificates = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    names = [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in certificates]
    # certificates is a SET OF in PKCS#7: DER sorts it, so order carries no meaning
    assert sorted(names) == ["Acme Charging Production Issuing CA 1", "Acme Charging Production Root CA"]


@pytest.mark.parametrize(
    "label, issuing", [("staging", "Staging Issuing CA 1"), ("production-issuing-1", "Production Issuing CA 1")]
)
def test_a_label_selects_the_ca(fleet: Fleet, label: str, issuing: str) -> None:
    response = requests.get(f"{fleet.server.url}/{label}/cacerts", verify=str(fleet.root), timeout=10)
    subjects = [
        c.subject.rfc4514_string() for c in pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    ]
    assert any(issuing in subject for subject in subjects), subjects


def test_unknown_labels_and_paths_are_404_in_plain_text(fleet: Fleet) -> None:
    for path in ("/no-such-ca/cacerts", "/serverkeygen", "/../../etc/passwd"):
        response = requests.get(fleet.server.url + path, verify=str(fleet.root), timeout=10)
        assert response.status_code == 404 and response.headers["Content-Type"].startswith("text/plain")


def test_csrattrs_is_base64_der(fleet: Fleet) -> None:
    response = requests.get(f"{fleet.server.url}/csrattrs", verify=str(fleet.root), timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/csrattrs"
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER"],
        input=base64.b64decode(response.content),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "id-ecPublicKey" in parsed and "prime256v1" in parsed and "ecdsa-with-SHA256" in parsed


# -- simpleenroll ------------------------------------------------------------------------------------
def test_enroll_with_a_one_time_secret(fleet: Fleet) -> None:
    serial, secret = fleet.register()
    key = make_key()
    certificate = certificate_from(fleet.enroll(serial, secret, key=key))
    assert certificate.subject.rfc4514_string() == f"CN={serial},O={ORG},C=DE"
    assert certificate.public_key() == key.public_key()
    with fleet.store.session() as session:
        row = session.scalar(
            select(Certificate).where(Certificate.fingerprint_sha256 == certificate.fingerprint(hashes.SHA256()).hex())
        )
        assert row is not None and row.device_id == get_device(session, serial).id
        assert audit.verify(session).ok


def test_a_secret_works_only_once(fleet: Fleet) -> None:
    serial, secret = fleet.register()
    assert fleet.enroll(serial, secret).status_code == 200
    again = fleet.enroll(serial, secret)
    assert again.status_code == 401 and again.headers["WWW-Authenticate"].startswith('Basic realm="chargepki EST"')


def test_a_retried_request_gets_the_certificate_its_first_attempt_produced(fleet: Fleet) -> None:
    """What a load balancer does when the first server died after its commit: the same request again."""
    serial, secret = fleet.register()
    body = b64csr(serial, key=make_key())
    first = fleet.post("simpleenroll", body, auth=(serial, secret))
    again = fleet.post("simpleenroll", body, auth=(serial, secret))
    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert certificate_from(again) == certificate_from(first)
    assert fleet.enroll(serial, secret).status_code == 401, "another key: the secret is used"


def test_twenty_parallel_enrollments_with_one_secret_yield_one_certificate(fleet: Fleet) -> None:
    serial, secret = fleet.register()
    bodies = [b64csr(serial) for _ in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(
            pool.map(lambda body: fleet.post("simpleenroll", body, auth=(serial, secret)).status_code, bodies)
        )
    assert statuses.count(200) == 1, statuses
    # The losers' spent secret counts as failed authentications: past est.auth_max_failures_per_device
    # the rest are turned away with 429 before they reach the secret.
    assert set(statuses) <= {200, 401, 409, 429}
    with fleet.store.session() as session:
        device = get_device(session, serial)
        issued = session.scalar(select(func.count()).select_from(Certificate).where(Certificate.device_id == device.id))
        assert issued == 1


@pytest.mark.parametrize("case", ["none", "wrong-secret", "unregistered", "other-device", "expired"])
def test_bad_credentials_get_401_with_a_basic_challenge(fleet: Fleet, case: str) -> None:
    serial, secret = fleet.register()
    auth = {
        "none": None,
        "wrong-secret": (serial, "not-the-secret"),
        "unregistered": ("CP-NEVER-SEEN", secret),
        "other-device": (fleet.register()[0], secret),
    }.get(case, (serial, secret))
    if case == "expired":
        expired = fleet.secret(serial, now=lambda: datetime.now(UTC) - timedelta(days=2))
        auth = (serial, expired)
    before = fleet.refusals()
    response = fleet.post("simpleenroll", b64csr(serial), auth=auth)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == 'Basic realm="chargepki EST", charset="UTF-8"'
    assert fleet.refusals() == before + 1, "every refusal is audited"
    assert secret not in response.text


def test_csr_for_another_device_is_refused_and_the_secret_survives(fleet: Fleet) -> None:
    serial, secret = fleet.register()
    other, _ = fleet.register()
    response = fleet.post("simpleenroll", b64csr(other), auth=(serial, secret))
    assert response.status_code == 403 and "is not the authenticated device" in response.text
    assert fleet.enroll(serial, secret).status_code == 200, "a refused request does not spend the secret"


@pytest.mark.parametrize(
    "case, status, reason",
    [
        ("organisation", 403, "is not the CA's organisation"),
        ("rsa-1024", 403, "key type rsa-1024 is not allowed"),
        ("disabled", 403, "is disabled"),
        ("staging-device", 403, "belongs to environment staging"),
    ],
)
def test_csr_and_device_checks(fleet: Fleet, case: str, status: int, reason: str) -> None:
    serial, secret = fleet.register(environment="staging" if case == "staging-device" else "production")
    body = b64csr(
        serial,
        organization="Evil" if case == "organisation" else ORG,
        key=make_key("rsa-1024") if case == "rsa-1024" else None,
    )
    if case == "disabled":
        with fleet.store.session() as session:
            disable_device(Work(session, "test", status=status), serial=serial)
    before = fleet.refusals()
    response = fleet.post("simpleenroll", body, auth=(serial, secret))
    assert response.status_code == status and reason in response.text
    assert response.headers["Content-Type"].startswith("text/plain") and response.text.count("\n") == 1
    assert fleet.refusals() == before + 1


def test_staging_devices_enroll_under_the_staging_label(fleet: Fleet) -> None:
    serial, secret = fleet.register(environment="staging")
    response = fleet.post("simpleenroll", b64csr(serial), auth=(serial, secret), label="staging")
    assert "Staging Issuing CA 1" in certificate_from(response).issuer.rfc4514_string()


@pytest.mark.parametrize(
    "body, headers, status",
    [
        (b"!!!! not base64 !!!!", PKCS10, 400),
        (base64.encodebytes(b"\x30\x03\x02\x01\x00"), PKCS10, 400),
        (b"", PKCS10, 400),
        (b"MIIB", {"Content-Type": "application/json"}, 415),
        (b"MIIB", {}, 415),
        (b"A" * 40000, PKCS10, 413),
    ],
)
def test_malformed_requests_get_a_clear_4xx(fleet: Fleet, body: bytes, headers: dict, status: int) -> None:
    serial, secret = fleet.register()
    response = fleet.post("simpleenroll", body, auth=(serial, secret), headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("text/plain") and "Traceback" not in response.text


def test_wrong_method_is_405_with_allow(fleet: Fleet) -> None:
    response = requests.get(f"{fleet.server.url}/simpleenroll", verify=str(fleet.root), timeout=10)
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    response = requests.post(f"{fleet.server.url}/cacerts", verify=str(fleet.root), timeout=10)
    assert response.status_code == 405


# -- anti-cloning ------------------------------------------------------------------------------------
def test_a_second_first_enrollment_needs_an_admin_reset(fleet: Fleet) -> None:
    serial, secret = fleet.register()
    first = certificate_from(fleet.enroll(serial, secret))
    refused = fleet.enroll(serial, fleet.secret(serial))
    assert refused.status_code == 409 and "already enrolled" in refused.text
    with fleet.store.session() as session:
        from ca.registry.devices import reset_device

        reset_device(Work(session, "test"), serial=serial)
    second = certificate_from(fleet.enroll(serial, fleet.secret(serial)))
    with fleet.store.session() as session:
        old = session.scalar(select(Certificate).where(Certificate.serial == format(first.serial_number, "X")))
        assert old is not None and old.status == "revoked" and old.revocation_reason == "superseded"
        current = session.scalars(
            select(Certificate).where(Certificate.device_id == old.device_id, Certificate.status == "valid")
        ).all()
        assert [c.serial for c in current] == [format(second.serial_number, "X")]


def test_a_key_certified_for_another_device_is_refused(fleet: Fleet) -> None:
    key = make_key()
    serial, secret = fleet.register()
    assert fleet.enroll(serial, secret, key=key).status_code == 200
    clone, clone_secret = fleet.register()
    response = fleet.enroll(clone, clone_secret, key=key)
    assert response.status_code == 409 and "already certified for another identity" in response.text


# -- simplereenroll -----------------------------------------------------------------------------------
def _enrolled(fleet: Fleet, name: str) -> tuple[str, tuple[str, str], object]:
    serial, secret = fleet.register()
    key = make_key()
    identity = fleet.write_identity(fleet.enroll(serial, secret, key=key), key, name)
    return serial, identity, key


def test_reenroll_renews_and_supersedes(fleet: Fleet) -> None:
    serial, identity, key = _enrolled(fleet, "renew")
    old = x509.load_pem_x509_certificate(Path(identity[0]).read_bytes())
    renewed = certificate_from(fleet.post("simplereenroll", b64csr(serial, key=key), cert=identity))
    assert renewed.subject == old.subject and renewed.serial_number != old.serial_number
    new_key = make_key()
    rekeyed = certificate_from(
        fleet.post(
            "simplereenroll", b64csr(serial, key=new_key), cert=fleet.write_identity_from(renewed, key, "renew2")
        )
    )
    assert rekeyed.public_key() == new_key.public_key()
    with fleet.store.session() as session:
        states = {
            c.serial: (c.status, c.revocation_reason)
            for c in session.scalars(select(Certificate).where(Certificate.common_name == serial))
        }
    assert states[format(old.serial_number, "X")] == ("revoked", "superseded")
    assert states[format(renewed.serial_number, "X")] == ("revoked", "superseded")
    assert states[format(rekeyed.serial_number, "X")] == ("valid", None)


def test_reenroll_requires_the_current_certificate(fleet: Fleet) -> None:
    serial, _identity, key = _enrolled(fleet, "nocert")
    response = fleet.post("simplereenroll", b64csr(serial, key=key))
    assert response.status_code == 401 and "current certificate" in response.text


def test_reenroll_with_a_revoked_certificate_is_refused(fleet: Fleet, status: Presigner) -> None:
    serial, identity, key = _enrolled(fleet, "revoked")
    with fleet.store.session() as session:
        revoke(
            Work(session, "test", status=status),
            serial=format(x509.load_pem_x509_certificate(Path(identity[0]).read_bytes()).serial_number, "X"),
            reason="keyCompromise",
        )
    response = fleet.post("simplereenroll", b64csr(serial, key=key), cert=identity)
    assert response.status_code == 401 and "revoked" in response.text


def test_reenroll_with_an_expired_certificate_is_refused(fleet: Fleet, status: Presigner) -> None:
    serial, _secret = fleet.register()
    key = make_key()
    with fleet.store.session() as session:
        authority = default_issuing_ca(session, "production")
        past = datetime.now(UTC) - timedelta(days=3)
        request = IssueRequest(
            get_profile("charger"),
            key.public_key(),
            serial,
            validity=timedelta(days=1),
            device_id=get_device(session, serial).id,
        )
        row = issue(
            Work(session, "test", status=status, now=lambda: past),
            issuer=issuer_for(authority, fleet.token),
            request=request,
        )
    identity = fleet.write_identity_from(x509.load_der_x509_certificate(row.der), key, "expired")
    try:
        response = fleet.post("simplereenroll", b64csr(serial, key=key), cert=identity)
    except requests.exceptions.SSLError:
        return  # refused already by the TLS layer: the chain is not valid now
    assert response.status_code == 401 and "expired" in response.text


def test_reenroll_across_environments_is_refused(fleet: Fleet) -> None:
    serial, secret = fleet.register(environment="staging")
    key = make_key()
    staging = fleet.post("simpleenroll", b64csr(serial, key=key), auth=(serial, secret), label="staging")
    identity = fleet.write_identity(staging, key, "staging")
    response = fleet.post("simplereenroll", b64csr(serial, key=key), cert=identity, label="production")
    assert response.status_code == 401 and "belongs to environment staging" in response.text


def test_reenroll_subject_must_match(fleet: Fleet) -> None:
    _serial, identity, key = _enrolled(fleet, "mismatch")
    response = fleet.post("simplereenroll", b64csr("CP-SOMEONE-ELSE", key=key), cert=identity)
    assert response.status_code == 403 and "does not match the certificate being renewed" in response.text


# -- registration authorities ----------------------------------------------------------------------------
def _ra_identity(fleet: Fleet, name: str, status: Presigner) -> tuple[tuple[str, str], str]:
    key = make_key()
    with fleet.store.session() as session:
        authority = default_issuing_ca(session, "production")
        row = issue(
            Work(session, "test", status=status),
            issuer=issuer_for(authority, fleet.token),
            request=IssueRequest(get_profile("ra"), key.public_key(), name),
        )
    return fleet.write_identity_from(x509.load_der_x509_certificate(row.der), key, name), row.serial


def test_an_ra_enrolls_registered_devices_without_secrets(fleet: Fleet, status: Presigner) -> None:
    identity, ra_serial = _ra_identity(fleet, "station-1", status)
    serial, _ = fleet.register()
    certificate = certificate_from(fleet.post("simpleenroll", b64csr(serial), cert=identity))
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == serial
    unregistered = fleet.post("simpleenroll", b64csr("CP-NOT-REGISTERED"), cert=identity)
    assert unregistered.status_code == 403 and "not registered" in unregistered.text
    with fleet.store.session() as session:
        revoke(Work(session, "test", status=status), serial=ra_serial, reason="privilegeWithdrawn")
    other, _ = fleet.register()
    revoked = fleet.post("simpleenroll", b64csr(other), cert=identity)
    assert revoked.status_code == 401 and "revoked" in revoked.text


def test_a_device_certificate_is_not_an_ra(fleet: Fleet) -> None:
    _serial, identity, _key = _enrolled(fleet, "notra")
    other, _ = fleet.register()
    response = fleet.post("simpleenroll", b64csr(other), cert=identity)
    assert response.status_code == 401 and "not a registration authority" in response.text


# -- an independent client: curl and openssl ------------------------------------------------------------
def test_the_rfc_7030_flow_with_curl_and_openssl(fleet: Fleet, tmp_path: Path) -> None:
    serial, secret = fleet.register()
    url, root = fleet.server.url, str(fleet.root)

    def sh(script: str) -> str:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    chain = sh(f"curl -sf --cacert {root} {url}/cacerts | base64 -d | openssl pkcs7 -inform DER -print_certs")
    assert "Production Issuing CA 1" in chain
    sh(f"""
        openssl ecparam -genkey -name prime256v1 -noout -out device.key
        openssl req -new -key device.key -subj "/O={ORG}/CN={serial}" -outform DER | base64 > device.b64
        curl -sf --cacert {root} -u {serial}:{secret} -H 'Content-Type: application/pkcs10' \
             --data-binary @device.b64 {url}/simpleenroll | base64 -d > device.p7
        openssl pkcs7 -inform DER -in device.p7 -print_certs -out device.pem
        curl -sf --cacert {root} {url}/cacerts | base64 -d | openssl pkcs7 -inform DER -print_certs -out chain.pem
        openssl verify -CAfile {root} -untrusted chain.pem -purpose sslclient device.pem
        curl -sf --cacert {root} --cert device.pem --key device.key -H 'Content-Type: application/pkcs10' \
             --data-binary @device.b64 {url}/simplereenroll | base64 -d > renewed.p7
        openssl pkcs7 -inform DER -in renewed.p7 -print_certs -out renewed.pem
        openssl verify -CAfile {root} -untrusted chain.pem renewed.pem
    """)
    subject = sh("openssl x509 -in renewed.pem -noout -subject")
    assert f"CN = {serial}" in subject
