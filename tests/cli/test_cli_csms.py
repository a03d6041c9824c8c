"""`chargepki csms …`: registering CSMSs, their certificates and tokens, on SQLite and PostgreSQL."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner, Result
from cryptography import x509
from sqlalchemy import select

from ca.config import load_config
from ca.errors import AuthenticationError
from ca.registry.csms import authenticate
from ca.store.engine import Store
from ca.store.models import AuditEvent, CsmsToken
from cli.main import cli
from tests.helpers import make_csr, openssl_verify_against_chain, write


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def test_add_token_list_disable_enable(home: Path, tmp_path: Path) -> None:
    assert run(home, "init", "--org", "Acme Charging").exit_code == 0
    out = tmp_path / "out"
    added = run(home, "csms", "add", "Acme CSMS", "--out-dir", str(out))
    assert added.exit_code == 0, added.output
    assert "[production] CSMS Acme CSMS registered" in added.output
    certificate = x509.load_pem_x509_certificate((out / "Acme_CSMS.pem").read_bytes())
    assert certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "Acme CSMS"
    assert stat.S_IMODE((out / "Acme_CSMS.key").stat().st_mode) == 0o600
    chain = run(home, "ca", "chain").output
    verified = openssl_verify_against_chain(chain, out / "Acme_CSMS.pem", "sslclient")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    duplicate = run(home, "csms", "add", "Acme CSMS", "--no-certificate")
    assert duplicate.exit_code == 1 and "already registered" in duplicate.stderr
    assert run(home, "csms", "add", "bad/name", "--no-certificate").exit_code == 1
    mismatch = run(home, "csms", "certificate", "Acme CSMS", "--csr", str(write(tmp_path / "x.csr", make_csr("Other"))))
    assert mismatch.exit_code == 1 and "is not the CSMS name" in mismatch.stderr
    renewed = run(
        home,
        "csms",
        "certificate",
        "Acme CSMS",
        "--csr",
        str(write(tmp_path / "a.csr", make_csr("Acme CSMS"))),
        "--out-dir",
        str(tmp_path / "renewed"),
    )
    assert renewed.exit_code == 0 and (tmp_path / "renewed" / "Acme_CSMS.pem").exists()

    first = run(home, "csms", "token", "Acme CSMS").output.strip()
    second = run(home, "csms", "token", "Acme CSMS").output.strip()
    assert first.startswith("cpk_") and second.startswith("cpk_") and first != second
    listing = run(home, "csms", "list").output
    assert "Acme CSMS" in listing and "production" in listing and "enabled" in listing
    assert listing.splitlines()[1].split()[4:6] == ["2", "2"]  # two tokens, two current certificates
    store = Store(load_config(home, {}).database_url)
    with store.session() as session:
        assert session.scalars(select(CsmsToken.token_hash)).all() and first not in str(
            session.scalars(select(AuditEvent.details)).all()
        )  # only hashes are stored, and no token is ever audited
        assert authenticate(session, token=first, certificate_der=None).name == "Acme CSMS"
        session.commit()
    replaced = run(home, "csms", "token", "Acme CSMS", "--replace").output.strip()
    with store.session() as session:
        for old in (first, second):
            try:
                authenticate(session, token=old, certificate_der=None)
                raise AssertionError("a replaced token still works")
            except AuthenticationError:
                pass
        assert authenticate(session, token=replaced, certificate_der=None).method == "token"
        session.commit()

    disabled = run(home, "csms", "disable", "Acme CSMS", "--revoke")
    assert disabled.exit_code == 0 and "revoked 2 certificate(s)" in disabled.output
    assert "disabled" in run(home, "csms", "list").output
    assert run(home, "csms", "enable", "Acme CSMS").exit_code == 0
    with store.session() as session:  # --revoke also revoked its tokens for good
        try:
            authenticate(session, token=replaced, certificate_der=None)
            raise AssertionError("a token survived disable --revoke")
        except AuthenticationError:
            pass
        session.commit()
    store.dispose()
    unknown = run(home, "csms", "token", "Nobody")
    assert unknown.exit_code == 1 and "no CSMS named" in unknown.stderr
