"""`chargepki report …` end to end on SQLite and PostgreSQL: the three reports in the three formats, the
same bytes on stdout and in --out, and --sign: the command it prints verifies the export with openssl
alone, and fails for an export changed by one byte."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization

from ca.audit.checkpoints import AUDIT_KEY_LABEL
from ca.config import Pkcs11Settings
from ca.keys.pkcs11_token import Token
from cli.main import cli
from tests.helpers import make_csr, write


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


@pytest.fixture
def fleet(home: Path, tmp_path: Path) -> Path:
    assert run(home, "init", "--org", "Acme Charging", "--country", "DE").exit_code == 0
    for serial, model in (("CP-1", "Wallbox 22"), ("CP-2", "Pole 11")):
        assert run(home, "device", "add", serial, "--model", model).exit_code == 0
    csr = write(tmp_path / "srv.csr", make_csr("csms.example.com"))
    assert run(home, "issue", "--csr", str(csr), "--profile", "csms-server", "--validity", "10d").exit_code == 0
    return home


def _verify_command(output: str) -> list[str]:
    (line,) = [line for line in output.splitlines() if line.startswith("verify: ")]
    return shlex.split(line.removeprefix("verify: "))


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_a_signed_export_verifies_with_the_printed_openssl_command(
    fleet: Path, tmp_path: Path, token_settings: tuple[Pkcs11Settings, str], fmt: str
) -> None:
    out = tmp_path / f"expiring.{fmt}"
    result = run(fleet, "report", "expiring", "--within", "30d", "--format", fmt, "--out", str(out), "--sign")
    assert result.exit_code == 0, result.output
    command = _verify_command(result.stdout)
    assert command == [
        "openssl", "dgst", "-sha256", "-verify", f"{out}.pem", "-signature", f"{out}.sig", str(out)
    ]  # fmt: skip
    verified = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert verified.returncode == 0 and "Verified OK" in verified.stdout, verified.stdout + verified.stderr

    # The public key is the audit key's, the one `audit verify` checks the checkpoints with.
    settings, pin = token_settings
    token = Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)
    audit_key = token.public_key(AUDIT_KEY_LABEL).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token.close()
    assert Path(f"{out}.pem").read_bytes() == audit_key

    original = out.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    out.write_bytes(bytes(data))
    tampered = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert tampered.returncode != 0 and "Verification failure" in tampered.stdout + tampered.stderr

    shown = run(fleet, "audit", "show", "--action", "export.signed").stdout
    digest = hashlib.sha256(original).hexdigest()
    assert "report expiring" in shown and f'"file":"{out.name}"' in shown and f'"format":"{fmt}"' in shown
    assert f'"sha256":"{digest}"' in shown, "the audit entry names the export by its SHA-256"
    assert run(fleet, "audit", "verify").exit_code == 0


def test_every_report_in_every_format(fleet: Path, tmp_path: Path) -> None:
    expiring = json.loads(run(fleet, "report", "expiring", "--format", "json").stdout)
    assert [c["profile"] for c in expiring["certificates"]].count("csms-server") == 1
    assert {"serial", "not_after", "days_left", "ca", "device_model"} <= set(expiring["certificates"][0])
    assert list(expiring)[:3] == ["report", "generated_at", "parameters"]

    inventory = run(fleet, "report", "inventory", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(inventory.stdout, newline="")))
    assert {(r["kind"], r["model"], r["status"], r["count"]) for r in rows if r["kind"] == "device"} == {
        ("device", "Wallbox 22", "enabled", "1"), ("device", "Pole 11", "enabled", "1")
    }  # fmt: skip
    table = run(fleet, "report", "inventory").stdout
    assert "devices:" in table and "certificates:" in table and "csms-server" in table

    campaign = json.loads(run(fleet, "report", "campaign", "--format", "json").stdout)
    assert campaign["campaigns"] == [] and campaign["devices"] == []
    assert run(fleet, "report", "campaign", "--format", "csv").stdout.startswith("id,environment,from_ca,to_ca")

    out = tmp_path / "inventory.csv"
    written = run(fleet, "report", "inventory", "--format", "csv", "--out", str(out))
    assert written.exit_code == 0 and out.read_text() == inventory.stdout and not Path(f"{out}.sig").exists()
    assert f"wrote {out}" in written.stdout


def test_refusals(fleet: Path, tmp_path: Path) -> None:
    unsigned = run(fleet, "report", "inventory", "--sign")
    assert unsigned.exit_code == 2 and "--sign needs --out FILE" in unsigned.stderr
    missing = run(fleet, "report", "campaign", "42", "--format", "json")
    assert missing.exit_code == 1 and "Error: no campaign 42" in missing.stderr
    assert json.loads(missing.stdout) == {"error": {"code": "not_found", "message": "no campaign 42"}}
    nowhere = run(fleet, "report", "inventory", "--out", str(tmp_path / "no-such-dir" / "x.csv"), "--sign")
    assert nowhere.exit_code == 1 and "is not a directory" in nowhere.stderr
    assert "export.signed" not in run(fleet, "audit", "show").stdout, "nothing was signed"
