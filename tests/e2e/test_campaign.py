"""A fleet re-enrollment campaign after `ca rotate`, moved by chargers renewing over the real EST
server and by a CSMS relaying SignCertificate to the CSMS API (`serve est` in its own process,
HTTPS on loopback), counted by `chargepki campaign status`. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from sqlalchemy import select

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.issuers import get_authority, issuer_for
from ca.config import EstSettings, Pkcs11Settings
from ca.enrollment.pipeline import Credentials, enroll
from ca.keys.pkcs11_token import Token
from ca.registry.csms import add_client, issue_token
from ca.registry.devices import add_device, disable_device, get_device
from ca.registry.secrets import issue_secret
from ca.store.engine import Store
from ca.store.models import Campaign, CampaignDevice
from ca.work import Work
from cli.main import cli
from ocsp.presign import Presigner
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import make_csr, make_key

ORG = "Acme Charging"


@dataclass
class Charger:
    serial: str
    key: object
    certificate: x509.Certificate


class Site:
    """One installation: its store and home, a fleet enrolled before the rotation, the EST server."""

    def __init__(self, store: Store, token: Token, home: Path, tmp: Path) -> None:
        self.store, self.token, self.home, self.tmp = store, token, home, tmp
        self.status = Presigner(token)
        self.server: EstServer | None = None
        self.csms_token = ""

    def enroll_directly(self, serial: str, environment: str = "production", ca: str | None = None) -> Charger:
        """First enrollment through the core (the fleet that exists before the rotation)."""
        key = make_key()
        with self.store.session() as session:
            add_device(Work(session, "test"), serial=serial, environment=environment)
            secret = issue_secret(Work(session, "test"), device=get_device(session, serial))
            authority = get_authority(session, ca or f"{environment}-issuing-1")
            row = enroll(
                Work(session, "test", status=self.status, issuers=lambda a: issuer_for(a, self.token)),
                authority=authority,
                csr=make_csr(serial, organization=ORG, key=key),
                credentials=Credentials(username=serial, password=secret),
            )
            return Charger(serial, key, x509.load_der_x509_certificate(row.der or b""))

    def identity(self, charger: Charger) -> tuple[str, str]:
        cert_path, key_path = self.tmp / f"{charger.serial}.pem", self.tmp / f"{charger.serial}.key"
        cert_path.write_bytes(charger.certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            charger.key.private_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(cert_path), str(key_path)

    def reenroll(self, charger: Charger, *, cn: str | None = None, label: str = "") -> requests.Response:
        """EST simplereenroll with the charger's current certificate as TLS client certificate."""
        assert self.server is not None
        csr = x509.load_pem_x509_csr(make_csr(cn or charger.serial, organization=ORG, key=charger.key))
        prefix = f"{self.server.url}/{label + '/' if label else ''}"
        response = requests.post(
            prefix + "simplereenroll",
            data=base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)),
            headers={"Content-Type": "application/pkcs10"},
            cert=self.identity(charger),
            verify=str(self.tmp / "roots.pem"),
            timeout=30,
        )
        if response.status_code == 200:
            (charger.certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
        return response

    def sign(self, station: str, key: object) -> requests.Response:
        """The CSMS API's sign, as a CSMS relays a station's SignCertificate (bearer token)."""
        assert self.server is not None
        body = {
            "chargingStationId": station,
            "certificateType": "ChargingStationCertificate",
            "csr": make_csr(station, organization=ORG, key=key).decode(),
        }
        return requests.post(
            f"https://localhost:{self.server.port}/api/v1/sign",
            json=body,
            headers={"Authorization": f"Bearer {self.csms_token}"},
            verify=str(self.tmp / "roots.pem"),
            timeout=30,
        )

    def cacerts(self, label: str = "") -> list[str]:
        assert self.server is not None
        url = f"{self.server.url}/{label + '/' if label else ''}cacerts"
        response = requests.get(url, verify=str(self.tmp / "roots.pem"), timeout=10)
        assert response.status_code == 200
        certificates = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
        return sorted(c.subject.rfc4514_string().split(",")[0].removeprefix("CN=") for c in certificates)

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(cli, ["--home", str(self.home), *args], catch_exceptions=False)

    def counts(self, *args: str) -> dict[str, int]:
        result = self.run("campaign", "status", *args)
        assert result.exit_code == 0, result.output
        assert "[production] CA production-issuing-1" in result.stderr
        found = dict(re.findall(r"^(re-enrolled|pending|failed)\s+(\d+)$", result.stdout, re.MULTILINE))
        return {state: int(count) for state, count in found.items()}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(request, tmp_path_factory, token: Token, token_settings: tuple[Pkcs11Settings, str]) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp(f"campaign-{request.param}")
    with database(request.param, tmp) as url:
        store = Store(url)
        store.upgrade()
        status = Presigner(token)
        with store.session() as session:
            for environment in ("production", "staging"):
                request_ = HierarchyRequest(organization=ORG, environment=environment)
                init_hierarchy(Work(session=session, actor="test", status=status, token=token), request=request_)
        home = write_home(tmp / "home", url, token_settings[0], EstSettings(default_environment="production"))
        installation = Site(store, token, home, tmp)
        with store.session() as session:
            client = add_client(Work(session, "test"), name="csms-1", environment="production")
            installation.csms_token = issue_token(Work(session, "test"), client=client)
        try:
            yield installation
        finally:
            if installation.server is not None:
                installation.server.stop()
                log = installation.server.log.read_text()
                assert "Traceback" not in log and '" 500 ' not in log
            store.dispose()


def _issuer_cn(certificate: x509.Certificate) -> str:
    return str(certificate.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_a_campaign_follows_the_fleet_onto_the_new_ca(site: Site) -> None:
    fleet = [site.enroll_directly(f"CP-{n}") for n in range(1, 7)]
    outsider = site.enroll_directly("CP-STAGING", environment="staging")
    assert {_issuer_cn(c.certificate) for c in fleet} == {"Acme Charging Production Issuing CA 1"}

    rotated = site.run("ca", "rotate", "--environment", "production")
    assert rotated.exit_code == 0 and "[production] CA production-issuing-2" in rotated.stderr
    started = site.run("campaign", "start", "--from-ca", "production-issuing-1")
    assert started.exit_code == 0, started.output
    assert "campaign 1: 6 device(s) to move from production-issuing-1 to production-issuing-2" in started.stdout
    assert "[production] CA production-issuing-1" in started.stderr
    assert site.counts() == {"re-enrolled": 0, "pending": 6, "failed": 0}

    site.server = start_server(site.home, free_port())
    with site.store.session() as session:
        roots = [get_authority(session, name).certificate_der for name in ("production-root-1", "staging-root-1")]
    (site.tmp / "roots.pem").write_bytes(
        b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in roots)
    )

    # cacerts: both production issuing CAs (old certificates still chain) and the root.
    assert site.cacerts() == [
        "Acme Charging Production Issuing CA 1",
        "Acme Charging Production Issuing CA 2",
        "Acme Charging Production Root CA",
    ]
    assert site.cacerts("staging") == ["Acme Charging Staging Issuing CA 1", "Acme Charging Staging Root CA"]

    # Two chargers renew with their old certificate: the new CA signs, the campaign counts them.
    for charger in fleet[:2]:
        response = site.reenroll(charger)
        assert response.status_code == 200, response.text
        assert _issuer_cn(charger.certificate) == "Acme Charging Production Issuing CA 2"
    assert site.counts() == {"re-enrolled": 2, "pending": 4, "failed": 0}

    # A disabled device and a refused renewal count as failed, with the reason.
    with site.store.session() as session:
        disable_device(Work(session, "test", status=site.status), serial="CP-3")
    refused = site.reenroll(fleet[3], cn="CP-SOMEONE-ELSE")
    assert refused.status_code == 403
    assert site.counts() == {"re-enrolled": 2, "pending": 2, "failed": 2}
    failed = site.run("campaign", "status", "--show", "failed").stdout
    assert re.search(r"CP-3\s+failed\s+device disabled", failed)
    assert re.search(r"CP-4\s+failed\s+re-enrollment refused: the CSR's CN", failed)

    # Renewing properly afterwards wins over the earlier refusal.
    assert site.reenroll(fleet[3]).status_code == 200
    assert site.counts() == {"re-enrolled": 3, "pending": 2, "failed": 1}
    # Renewing again with the new CA's certificate changes nothing in the counts.
    assert site.reenroll(fleet[0]).status_code == 200
    assert site.counts() == {"re-enrolled": 3, "pending": 2, "failed": 1}

    # The CSMS API's sign moves the campaign the same way: a refusal, then a renewal.
    reused = site.sign("CP-6", fleet[0].key)
    assert reused.status_code == 409, reused.text
    assert site.counts() == {"re-enrolled": 3, "pending": 1, "failed": 2}
    failed = site.run("campaign", "status", "--show", "failed").stdout
    assert re.search(r"CP-6\s+failed\s+re-enrollment refused: this public key is already certified", failed)
    signed = site.sign("CP-6", fleet[5].key)
    assert signed.status_code == 200, signed.text
    chain = x509.load_pem_x509_certificates(signed.json()["certificateChain"].encode())
    assert [_issuer_cn(c) for c in chain] == [
        "Acme Charging Production Issuing CA 2",
        "Acme Charging Production Root CA",
    ]
    assert site.counts() == {"re-enrolled": 4, "pending": 1, "failed": 1}

    # Environments stay apart: a staging certificate never renews under production.
    across = site.reenroll(outsider, label="production")
    assert across.status_code == 401 and "belongs to environment staging" in across.text
    assert site.reenroll(outsider, label="staging").status_code == 200
    assert _issuer_cn(outsider.certificate) == "Acme Charging Staging Issuing CA 1"

    # A charger configured with the old CA's name as its EST label follows the rotation.
    pending = site.run("campaign", "status", "--show", "pending").stdout
    assert re.search(r"CP-5\s+pending", pending)
    assert site.reenroll(fleet[4], label="production-issuing-1").status_code == 200
    assert _issuer_cn(fleet[4].certificate) == "Acme Charging Production Issuing CA 2"
    assert site.counts("--from-ca", "production-issuing-1") == {"re-enrolled": 5, "pending": 0, "failed": 1}
    assert site.counts("--watch", "--interval", "1m") == {
        "re-enrolled": 5,
        "pending": 0,
        "failed": 1,
    }  # returns: none pending

    # The campaign lives in the database.
    with site.store.session() as session:
        campaign = session.scalar(select(Campaign))
        assert campaign is not None and campaign.to_authority.name == "production-issuing-2"
        assert len(session.scalars(select(CampaignDevice)).all()) == 6
    listing = site.run("campaign", "list").stdout
    assert re.search(r"1\s+production\s+production-issuing-1\s+production-issuing-2\s+.*\s6$", listing, re.MULTILINE)


def test_campaign_refusals_are_one_line_errors(site: Site) -> None:
    for args, message in (
        (("start", "--from-ca", "production-issuing-1"), "campaign 1 already moves the devices"),
        (("start", "--from-ca", "production-issuing-2"), "is the newest issuing CA of production"),
        (("start", "--from-ca", "production-root-1"), "is a root CA"),
        (("start", "--from-ca", "nope"), "no CA named 'nope'"),
        (("status", "--id", "99"), "no campaign 99"),
    ):
        result = site.run("campaign", *args)
        assert result.exit_code == 1 and "Traceback" not in result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and message in errors[0], result.stderr


def test_a_rotation_while_est_runs_is_trusted_for_client_certificates_at_once(site: Site) -> None:
    """`ca rotate` rewrites the local server's client-CA bundle, which gunicorn reads per connection."""
    assert site.server is not None
    assert site.run("ca", "rotate", "--environment", "production").exit_code == 0
    # A certificate from the newest CA (issued directly: EST workers keep their CA for a few seconds).
    charger = site.enroll_directly("CP-NEWEST", ca="production-issuing-3")
    assert _issuer_cn(charger.certificate) == "Acme Charging Production Issuing CA 3"
    response = site.reenroll(charger)
    assert response.status_code == 200, response.text
