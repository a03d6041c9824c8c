"""What an independent relying party or client needs from chargepki, on SQLite and PostgreSQL:
issuing CAs name the OCSP responder that answers for them, the URLs given to `init` reach every
later hierarchy, `/csrattrs` follows RFC 9908 for the label's CA, and the statuses docs/est.md
names are the server's."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

from asn1crypto import core
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.authorities.rotation import rotate_issuing_ca
from ca.config import Config, EstSettings, write_config
from ca.context import Pki
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device, get_device
from ca.registry.secrets import issue_secret
from ca.store.engine import Store
from ca.store.models import Authority, OcspResponse
from ca.work import Work
from cli.main import cli
from ocsp.presign import Presigner
from tests.helpers import ROOT, make_csr, make_key
from web.app import create_app

EST_DOC = ROOT / "docs" / "est.md"


def _aia_ocsp(der: bytes) -> list[str]:
    certificate = x509.load_der_x509_certificate(der)
    aia = certificate.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_INFORMATION_ACCESS).value
    return [d.access_location.value for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP]


def test_issuing_cas_name_the_responder_that_answers_for_them(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    """The root's delegated signer answers for the issuing CA's certificate, at the root's URL:
    nginx `ssl_ocsp on` and a Java PKIX validator need that URL in the issuing CA's AIA."""
    rotated = rotate_issuing_ca(Work(session=session, actor="test", status=status, token=token)).issuing
    for authority in (hierarchy.issuing, rotated):
        assert _aia_ocsp(authority.certificate_der) == [hierarchy.root.ocsp_url]
        answered = session.scalar(
            select(OcspResponse.cert_status).where(
                OcspResponse.authority_id == hierarchy.root.id, OcspResponse.serial == authority.serial
            )
        )
        assert answered == "good", "and that responder has an answer for it"


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def test_urls_given_to_init_are_saved_and_used_by_later_hierarchies(home: Path, db_url: str) -> None:
    ocsp, repository = "http://ocsp.example.com/ocsp", "http://pki.example.com/pki"
    first = run(home, "init", "--org", "Acme Charging", "--ocsp-url", ocsp, "--crl-url", repository)
    assert first.exit_code == 0 and "URLs saved" in first.output, first.output
    assert run(home, "v2g", "init", "--org", "Acme Charging").exit_code == 0
    assert run(home, "manufacturer", "init", "--org", "Acme Charging").exit_code == 0
    assert run(home, "init", "--org", "Acme Charging", "--environment", "staging").exit_code == 0
    store = Store(db_url)
    with store.session() as session:
        authorities = session.scalars(select(Authority)).all()
        session.commit()
    assert {(a.ocsp_url, a.repository_url) for a in authorities} == {(ocsp, repository)}
    sub_cas = [a for a in authorities if a.role.startswith("v2g-sub-ca")]
    assert sub_cas and all(_aia_ocsp(a.certificate_der) == [ocsp] for a in sub_cas)
    store.dispose()


class _AttributeValues(core.SetOf):
    _child_spec = core.ObjectIdentifier


class _Attribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _AttributeValues)]  # noqa: RUF012


class _AttrOrOID(core.Choice):
    _alternatives = [("oid", core.ObjectIdentifier), ("attribute", _Attribute)]  # noqa: RUF012


class _CsrAttrs(core.SequenceOf):
    _child_spec = _AttrOrOID


def _app(tmp_path: Path, db_url: str, token: Token, token_settings, key_type: str):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=db_url, pkcs11=token_settings[0]))
    pki = Pki.open(home, {}, create=True)
    with pki.store.session() as session:
        request = HierarchyRequest(organization="Acme Charging", key_type=key_type)
        init_hierarchy(Work(session=session, actor="test", status=Presigner(token), token=token), request=request)
    return pki, create_app(pki, EstSettings()).test_client()


def test_csrattrs_asks_for_the_label_ca_curve_in_rfc_9908_form(
    tmp_path: Path, db_url: str, token: Token, token_settings
) -> None:
    pki, client = _app(tmp_path, db_url, token, token_settings, "ec-p384")
    response = client.get("/.well-known/est/csrattrs")
    assert response.status_code == 200
    der = base64.b64decode(response.get_data())
    attributes = _CsrAttrs.load(der)
    parsed = [(a.name, a.chosen.native) for a in attributes]
    assert parsed == [
        ("attribute", {"type": "1.2.840.10045.2.1", "values": ["1.3.132.0.34"]}),  # id-ecPublicKey, secp384r1
        ("oid", "1.2.840.10045.4.3.3"),  # ecdsa-with-SHA384
    ]
    shown = subprocess.run(["openssl", "asn1parse", "-inform", "DER"], input=der, capture_output=True, check=True)
    assert re.search(r"id-ecPublicKey\s*\n.*SET\s*\n.*secp384r1", shown.stdout.decode()), shown.stdout.decode()
    pki.close()


def test_a_bad_csr_signature_gets_the_status_the_est_doc_names(
    tmp_path: Path, db_url: str, token: Token, token_settings
) -> None:
    pki, client = _app(tmp_path, db_url, token, token_settings, "ec-p256")
    with pki.store.session() as session:
        add_device(Work(session, "test"), serial="CP-SIG")
        secret = issue_secret(Work(session, "test"), device=get_device(session, "CP-SIG"))
    der = bytearray(x509.load_pem_x509_csr(make_csr("CP-SIG", key=make_key())).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature value: still DER, no longer a proof of possession
    auth = {"Authorization": "Basic " + base64.b64encode(f"CP-SIG:{secret}".encode()).decode()}
    response = client.post(
        "/.well-known/est/simpleenroll",
        data=base64.encodebytes(bytes(der)),
        headers={"Content-Type": "application/pkcs10", **auth},
    )
    assert "signature is invalid" in response.get_data(as_text=True)
    text = EST_DOC.read_text(encoding="utf-8")
    refusals = text[text.index("## Refusals") :].split("\n## ")[0]  # the EST refusal table
    rows = dict(re.findall(r"^\| (\d{3})[^|]*\| (.*) \|$", refusals, re.MULTILINE))
    named = [status for status, when in rows.items() if "signature is invalid" in when]
    assert named == [str(response.status_code)], (response.status_code, rows)
    pki.close()
