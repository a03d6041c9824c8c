"""CLI for the registry, one-time secrets and RAs, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from sqlalchemy import select

from ca.registry.secrets import secret_is_valid
from ca.store.engine import Store
from ca.store.models import AuditEvent, EnrollmentSecret
from cli.main import cli
from tests.helpers import make_csr, openssl_verify_against_chain, write


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


@pytest.fixture
def initialised(home: Path) -> Path:
    assert run(home, "init", "--org", "Acme Charging").exit_code == 0
    return home


def test_add_list_show_disable_enable_reset(initialised: Path) -> None:
    assert run(initialised, "device", "add", "CP-1", "--model", "Wallbox 22").exit_code == 0
    duplicate = run(initialised, "device", "add", "CP-1")
    assert duplicate.exit_code == 1 and "already registered" in duplicate.stderr
    invalid = run(initialised, "device", "add", "http://cp/1")
    assert invalid.exit_code == 1 and "charging station identity" in invalid.stderr
    listing = run(initialised, "device", "list").output
    assert "CP-1" in listing and "Wallbox 22" in listing and "enabled" in listing
    assert "first enrollment: open" in run(initialised, "device", "show", "CP-1").output
    assert run(initialised, "device", "disable", "CP-1").exit_code == 0
    assert "disabled" in run(initialised, "device", "list").output
    refused = run(initialised, "token", "issue", "CP-1")
    assert refused.exit_code == 1 and "disabled" in refused.stderr
    assert run(initialised, "device", "enable", "CP-1").exit_code == 0
    assert run(initialised, "device", "reset", "CP-1").exit_code == 0
    unknown = run(initialised, "device", "show", "CP-404")
    assert unknown.exit_code == 1 and "not registered" in unknown.stderr


def test_import_reports_accepted_and_refused_rows_with_line_numbers(initialised: Path, tmp_path: Path) -> None:
    rows = [
        "serial,model,environment",
        "CP-A,M1,production",
        "CP-B,,",
        "bad serial!,M1,",
        "CP-A,M1,",
        "CP-C,M2,moon",
        "CP-D,M2,staging",
        "CP-E,M2,production,surplus",
    ]
    source = write(tmp_path / "devices.csv", "\n".join(rows).encode())
    result = run(initialised, "device", "import", str(source))
    assert result.exit_code == 0
    assert "accepted 3, refused 4" in result.output
    assert "line 4: CN 'bad serial!'" in result.output
    assert "line 5: device CP-A appears twice" in result.output
    assert "line 6: unknown environment 'moon'" in result.output
    assert "line 8: too many columns" in result.output
    assert "CP-D" in run(initialised, "device", "list", "--environment", "staging").output


def test_import_without_a_serial_column_is_refused(initialised: Path, tmp_path: Path) -> None:
    source = write(tmp_path / "bad.csv", b"id,model\n1,x\n")
    result = run(initialised, "device", "import", str(source))
    assert result.exit_code == 1 and "'serial' column" in result.stderr


def test_token_issue_prints_a_secret_once_and_stores_only_its_hash(initialised: Path, db_url: str) -> None:
    run(initialised, "device", "add", "CP-9")
    result = run(initialised, "token", "issue", "CP-9", "--ttl", "2h")
    secret = result.stdout.strip()
    assert result.exit_code == 0 and len(secret) >= 32
    store = Store(db_url)
    with store.session() as session:
        stored = session.scalars(select(EnrollmentSecret.secret_hash)).all()
        assert stored and secret not in stored
        assert all(
            secret not in (event.details + (event.subject or "")) for event in session.scalars(select(AuditEvent))
        )
    store.dispose()
    assert "not a duration" in run(initialised, "token", "issue", "CP-9", "--ttl", "forever").stderr


def test_batch_secrets_go_to_an_owner_only_csv(initialised: Path, tmp_path: Path) -> None:
    for serial in ("CP-X1", "CP-X2", "CP-X3"):
        run(initialised, "device", "add", serial)
    serials = write(tmp_path / "batch.txt", b"CP-X1\nCP-X2\nCP-X3\n")
    out = tmp_path / "secrets.csv"
    result = run(initialised, "token", "issue-batch", "--file", str(serials), "--out", str(out))
    assert result.exit_code == 0 and "3 secrets written" in result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = list(csv.DictReader(out.open()))
    assert [r["serial"] for r in rows] == ["CP-X1", "CP-X2", "CP-X3"] and len({r["secret"] for r in rows}) == 3
    missing = write(tmp_path / "missing.txt", b"CP-X1\nCP-NOPE\n")
    refused = run(initialised, "token", "issue-batch", "--file", str(missing), "--out", str(tmp_path / "m.csv"))
    assert refused.exit_code == 1 and "CP-NOPE is not registered" in refused.stderr
    assert not (tmp_path / "m.csv").exists(), "all or nothing"


def test_ra_add_writes_a_verifiable_client_certificate(initialised: Path, tmp_path: Path) -> None:
    result = run(initialised, "ra", "add", "Station 1", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    certificate = x509.load_pem_x509_certificate((tmp_path / "Station_1.pem").read_bytes())
    assert certificate.subject.rfc4514_string().startswith("CN=Station 1,")
    assert stat.S_IMODE((tmp_path / "Station_1.key").stat().st_mode) == 0o600
    verified = openssl_verify_against_chain(
        run(initialised, "ca", "chain").stdout, tmp_path / "Station_1.pem", "sslclient"
    )
    assert verified.returncode == 0, verified.stderr


def test_ra_add_with_a_csr_checks_the_name(initialised: Path, tmp_path: Path) -> None:
    csr = write(tmp_path / "ra.csr", make_csr("Station 2"))
    assert run(initialised, "ra", "add", "Station 2", "--csr", str(csr), "--out-dir", str(tmp_path)).exit_code == 0
    wrong = run(initialised, "ra", "add", "Station 3", "--csr", str(csr), "--out-dir", str(tmp_path))
    assert wrong.exit_code == 1 and "is not the RA name" in wrong.stderr


def _secret_usable(store: Store, serial: str, secret: str) -> bool:
    with store.session() as session:
        usable = secret_is_valid(session, serial, secret)
        session.commit()
    return usable


def test_secrets_can_be_withdrawn_and_a_new_one_withdraws_the_older(
    initialised: Path, db_url: str, tmp_path: Path
) -> None:
    for serial in ("CP-W1", "CP-W2", "CP-W3"):
        assert run(initialised, "device", "add", serial).exit_code == 0
    store = Store(db_url)
    first = run(initialised, "token", "issue", "CP-W1").stdout.strip()
    kept = run(initialised, "token", "issue", "CP-W1", "--keep-older").stdout.strip()
    assert _secret_usable(store, "CP-W1", first) and _secret_usable(store, "CP-W1", kept)
    newest = run(initialised, "token", "issue", "CP-W1").stdout.strip()
    assert not _secret_usable(store, "CP-W1", first) and not _secret_usable(store, "CP-W1", kept)
    assert _secret_usable(store, "CP-W1", newest), "only the newest secret works"

    revoked = run(initialised, "token", "revoke", "CP-W1")
    assert revoked.exit_code == 0 and "withdrew 1 unspent secret(s) of 1 device(s)" in revoked.stdout
    assert not _secret_usable(store, "CP-W1", newest)
    assert "withdrew 0" in run(initialised, "token", "revoke", "CP-W1").stdout

    # A leaked batch CSV: withdraw exactly the secrets it holds, all or nothing.
    write(tmp_path / "serials.txt", b"CP-W2\nCP-W3\n")
    batch = run(
        initialised, "token", "issue-batch", "--file", str(tmp_path / "serials.txt"), "--out", str(tmp_path / "s.csv")
    )
    assert batch.exit_code == 0, batch.output
    leaked = {row["serial"]: row["secret"] for row in csv.DictReader((tmp_path / "s.csv").open())}
    later = run(initialised, "token", "issue", "CP-W3", "--keep-older").stdout.strip()
    bad = write(tmp_path / "bad.csv", f"serial,secret\nCP-W2,{leaked['CP-W2']}\nCP-404,x\n".encode())
    refused = run(initialised, "token", "revoke", "--file", str(bad))
    assert refused.exit_code == 1 and "not registered" in refused.stderr
    assert _secret_usable(store, "CP-W2", leaked["CP-W2"]), "a refused batch withdraws nothing"
    result = run(initialised, "token", "revoke", "--file", str(tmp_path / "s.csv"))
    assert result.exit_code == 0 and "withdrew 2 unspent secret(s) of 2 device(s)" in result.stdout
    assert not any(_secret_usable(store, serial, secret) for serial, secret in leaked.items())
    assert _secret_usable(store, "CP-W3", later), "a secret not in the file stays valid"
    usage = run(initialised, "token", "revoke")
    assert usage.exit_code == 2

    with store.session() as session:
        withdrawn = session.scalars(select(AuditEvent).where(AuditEvent.action == "secret.withdrawn")).all()
        session.commit()
    assert [(e.subject, e.actor.startswith("cli:")) for e in withdrawn] == [
        ("CP-W1", True),  # the new secret withdrew the two older ones
        ("CP-W1", True),  # token revoke
        ("CP-W2", True),
        ("CP-W3", True),
    ]
    assert '"count":2' in withdrawn[0].details and "a new secret was issued" in withdrawn[0].details
    assert "withdrawn by an operator" in withdrawn[1].details
    store.dispose()
