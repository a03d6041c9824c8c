"""The admin CLI: each command end to end through click, on SQLite and PostgreSQL.
Errors are one line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from sqlalchemy import delete, select, update

from ca.config import Config, write_config
from ca.store.engine import Store
from ca.store.models import AuditCheckpoint, AuditEvent, AuditHead
from cli.main import cli
from tests.conftest import new_token_settings
from tests.helpers import make_csr, openssl_verify_against_chain, write


def run(home: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], env=env, catch_exceptions=False)


def assert_one_line_error(result: Result, pattern: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    # Besides the error, stderr may only carry the "[environment] CA name" note of the command, or
    # click's usage hint for a malformed argument (exit status 2).
    hints = ("[", "Usage: ", "Try '")
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(hints)]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and re.search(pattern, lines[0]), result.stderr


@pytest.fixture
def initialised(home: Path) -> Path:
    result = run(home, "init", "--org", "Acme Charging", "--country", "DE")
    assert result.exit_code == 0, result.output
    return home


def _serial_of(pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(pem).serial_number, "X")


def test_init_creates_the_hierarchy_and_refuses_to_run_twice(home: Path) -> None:
    first = run(home, "init", "--org", "Acme Charging", "--environment", "staging")
    assert first.exit_code == 0
    assert "staging-root-1" in first.output and "Acme Charging Staging Issuing CA 1" in first.output
    assert "OCSP signer" in first.output
    assert_one_line_error(
        run(home, "init", "--org", "Acme Charging", "--environment", "staging"), r"already initialised"
    )


def test_environments_get_separate_hierarchies(initialised: Path) -> None:
    assert run(initialised, "init", "--org", "Acme Charging", "--environment", "factory-test").exit_code == 0
    listing = run(initialised, "ca", "list").output
    for name in (
        "production-root-1",
        "production-issuing-1",
        "factory-test-root-1",
        "factory-test-issuing-1",
    ):
        assert name in listing
    assert_one_line_error(run(initialised, "ca", "chain"), "several environments exist")
    chain = run(initialised, "ca", "chain", "--environment", "factory-test")
    assert (
        "Factory-Test Issuing CA 1"
        in x509.load_pem_x509_certificates(chain.stdout.encode())[0].subject.rfc4514_string()
    )
    assert "[factory-test]" in chain.stderr


def test_ca_chain_is_issuing_ca_then_root(initialised: Path) -> None:
    result = run(initialised, "ca", "chain")
    certificates = x509.load_pem_x509_certificates(result.stdout.encode())
    assert [c.subject.rfc4514_string() for c in certificates] == [
        "CN=Acme Charging Production Issuing CA 1,O=Acme Charging,C=DE",
        "CN=Acme Charging Production Root CA,O=Acme Charging,C=DE",
    ]
    certificates[0].verify_directly_issued_by(certificates[1])


def test_issue_then_openssl_verifies_the_chain(initialised: Path, tmp_path: Path) -> None:
    csr = write(tmp_path / "cp.csr", make_csr("CP-0001"))
    result = run(initialised, "issue", "--csr", str(csr), "--profile", "charger", "--out", str(tmp_path / "cp.pem"))
    assert result.exit_code == 0 and "issued serial" in result.stderr
    verified = openssl_verify_against_chain(run(initialised, "ca", "chain").stdout, tmp_path / "cp.pem", "sslclient")
    assert verified.returncode == 0, verified.stderr


def test_issue_to_stdout_with_a_chosen_validity(initialised: Path, tmp_path: Path) -> None:
    csr = write(tmp_path / "srv.csr", make_csr("csms.example.com"))
    result = run(initialised, "issue", "--csr", str(csr), "--profile", "csms-server", "--validity", "12h")
    certificate = x509.load_pem_x509_certificate(result.stdout.encode())
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime.total_seconds() == 12 * 3600


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "charger", "--validity", "3650d"], "exceeds the maximum"),
        (["--profile", "webserver"], "unknown profile 'webserver'"),
        (["--profile", "root"], "not issued from a CSR"),
        (["--profile", "charger", "--validity", "soon"], "not a duration"),
    ],
)
def test_issue_refusals_are_one_line(initialised: Path, tmp_path: Path, args: list[str], message: str) -> None:
    csr = write(tmp_path / "cp.csr", make_csr())
    assert_one_line_error(run(initialised, "issue", "--csr", str(csr), *args), message)


@pytest.mark.parametrize(
    "content",
    [b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n-----END CERTIFICATE REQUEST-----\n", b""],
)
def test_malformed_csr_files_are_one_line(initialised: Path, tmp_path: Path, content: bytes) -> None:
    csr = write(tmp_path / "bad.csr", content)
    assert_one_line_error(run(initialised, "issue", "--csr", str(csr), "--profile", "charger"), r"CSR")


def test_cert_list_show_revoke_unhold(initialised: Path, tmp_path: Path) -> None:
    csr = write(tmp_path / "cp.csr", make_csr("CP-0009"))
    serial = _serial_of(run(initialised, "issue", "--csr", str(csr), "--profile", "charger").stdout.encode())

    listing = run(initialised, "cert", "list", "--profile", "charger").output
    assert serial in listing and "valid" in listing
    assert serial in run(initialised, "cert", "list", "--expiring-within", "3650").output
    assert serial not in run(initialised, "cert", "list", "--expiring-within", "30").output

    held = run(initialised, "revoke", serial.lower(), "--reason", "certificate-hold")
    assert held.exit_code == 0 and "[production]" in held.stderr
    assert serial in run(initialised, "cert", "list", "--status", "hold").output
    assert run(initialised, "unhold", serial).exit_code == 0
    assert (
        run(
            initialised,
            "revoke",
            serial,
            "--reason",
            "keyCompromise",
            "--invalidity-date",
            "2026-01-01T00:00:00Z",
        ).exit_code
        == 0
    )
    shown = run(initialised, "cert", "show", serial).output
    assert "status:          revoked" in shown and "reason:          keyCompromise" in shown
    assert "invalidity date: 2026-01-01 00:00:00Z" in shown and "BEGIN CERTIFICATE" in shown
    assert_one_line_error(run(initialised, "revoke", serial, "--reason", "superseded"), "already revoked")
    assert_one_line_error(run(initialised, "unhold", serial), "not on hold")


def test_revoke_refusals_are_one_line(initialised: Path) -> None:
    assert_one_line_error(run(initialised, "revoke", "DEADBEEF", "--reason", "superseded"), "no certificate")
    assert_one_line_error(run(initialised, "revoke", "zz-top", "--reason", "superseded"), "not a certificate serial")
    assert_one_line_error(run(initialised, "revoke", "AB", "--reason", "bored"), "unknown revocation reason")
    assert_one_line_error(run(initialised, "cert", "show", "ABCDEF"), "no certificate")


def test_audit_show_and_verify_then_detect_tampering(initialised: Path, db_url: str) -> None:
    shown = run(initialised, "audit", "show")
    assert "hierarchy.created" in shown.output and "certificate.issued" in shown.output
    verified = run(initialised, "audit", "verify")
    assert verified.exit_code == 0 and "intact" in verified.output

    store = Store(db_url)
    with store.session() as session:
        session.execute(update(AuditEvent).where(AuditEvent.seq == 1).values(actor="mallory"))
        session.commit()
    store.dispose()
    assert_one_line_error(run(initialised, "audit", "verify"), r"audit log broken: entry 1 was altered")


def test_commands_on_a_home_that_was_never_initialised(tmp_path: Path) -> None:
    assert_one_line_error(run(tmp_path / "nowhere", "cert", "list"), "not a chargepki home yet")


def test_wrong_pin_from_the_environment_is_one_line(tmp_path: Path, softhsm_conf: Path, db_url: str) -> None:
    settings, _pin = new_token_settings(softhsm_conf, tmp_path)
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=db_url, pkcs11=settings))
    result = run(home, "init", "--org", "Acme", env={"CHARGEPKI_PKCS11_PIN": "wrong-pin-123"})
    assert_one_line_error(result, "wrong PIN")
    assert "wrong-pin-123" not in result.output, "a PIN never appears in output"


def test_no_command_takes_a_pin_argument() -> None:
    def walk(command, path=""):
        for param in command.params:
            assert "pin" not in (param.name or "").lower(), f"{path} {param.name}"
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(cli)


def test_audit_checkpoint_then_verify_sees_a_rewritten_tail(initialised: Path, db_url: str) -> None:
    made = run(initialised, "audit", "checkpoint")
    assert made.exit_code == 0 and made.output.startswith("checkpoint of entry "), made.output
    assert len((initialised / "audit-checkpoints.jsonl").read_text().splitlines()) == 1
    verified = run(initialised, "audit", "verify")
    assert verified.exit_code == 0 and "1 signed checkpoints" in verified.output, verified.output

    store = Store(db_url)  # a database writer cuts the last two entries and moves the head back
    with store.session() as session:
        head = session.scalar(select(AuditHead.seq))
        session.execute(delete(AuditEvent).where(AuditEvent.seq > head - 2))
        kept = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == head - 2))
        session.execute(update(AuditHead).values(seq=head - 2, hash=kept))
        session.execute(delete(AuditCheckpoint))
        session.commit()
    store.dispose()
    assert_one_line_error(
        run(initialised, "audit", "verify"), rf"audit log broken: entries after {head - 2} were removed"
    )
