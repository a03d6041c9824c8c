"""`make run`'s first run, in real processes: a fresh home gets its own SoftHSM2 token with
random PINs in owner-only files, a config without secrets, the schema and a CA hierarchy."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import database
from tests.helpers import chargepki, make_csr, openssl_verify_against_chain, write


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("first-run") / "var"
    result = chargepki(home, "run", "--setup-only", env={"CHARGEPKI_ORG": "Volt Charging"})
    assert result.returncode == 0, result.stderr
    assert "production-root-1" in result.stdout
    return home


def test_first_run_creates_an_embedded_token_with_owner_only_pins(fresh_home: Path) -> None:
    conf = fresh_home / "softhsm" / "softhsm2.conf"
    assert f"directories.tokendir = {fresh_home / 'softhsm' / 'tokens'}" in conf.read_text()
    assert any((fresh_home / "softhsm" / "tokens").iterdir())
    for pin_file in ("user.pin", "so.pin"):
        mode = stat.S_IMODE((fresh_home / "softhsm" / pin_file).stat().st_mode)
        assert mode == 0o600, f"{pin_file} is {oct(mode)}"


def test_the_config_names_the_pin_source_but_holds_no_pin(fresh_home: Path) -> None:
    config = (fresh_home / "chargepki.toml").read_text()
    pin = (fresh_home / "softhsm" / "user.pin").read_text().strip()
    assert pin not in config
    assert "pin_file" in config and "sqlite:///" in config


def test_the_second_run_reports_instead_of_reinitialising(fresh_home: Path) -> None:
    result = chargepki(fresh_home, "run", "--setup-only")
    assert result.returncode == 0 and "is initialised" in result.stdout
    again = chargepki(fresh_home, "init", "--org", "Volt Charging")
    assert again.returncode == 1 and again.stderr.startswith("Error: ") and "already initialised" in again.stderr


def test_a_first_run_home_issues_verifiable_certificates(fresh_home: Path, tmp_path: Path) -> None:
    csr = write(tmp_path / "cp.csr", make_csr("CP-1", organization="Volt Charging"))
    issued = chargepki(
        fresh_home, "issue", "--csr", str(csr), "--profile", "charger", "--out", str(tmp_path / "cp.pem")
    )
    assert issued.returncode == 0, issued.stderr
    verified = openssl_verify_against_chain(chargepki(fresh_home, "ca", "chain").stdout, tmp_path / "cp.pem")
    assert verified.returncode == 0, verified.stderr
    assert chargepki(fresh_home, "audit", "verify").returncode == 0


def test_a_first_run_on_postgresql_keeps_everything_there(tmp_path: Path) -> None:
    """`make run` with CHARGEPKI_DATABASE_URL: the home remembers PostgreSQL and never creates a SQLite file."""
    home = tmp_path / "var"
    with database("postgresql", tmp_path) as url:
        first = chargepki(home, "run", "--setup-only", env={"CHARGEPKI_DATABASE_URL": url})
        assert first.returncode == 0, first.stderr
        assert "postgresql+psycopg://" in (home / "chargepki.toml").read_text()
        csr = write(tmp_path / "cp.csr", make_csr("CP-PG-1", organization="chargepki Demo CPO"))
        issued = chargepki(home, "issue", "--csr", str(csr), "--profile", "charger", "--out", str(tmp_path / "cp.pem"))
        assert issued.returncode == 0, issued.stderr
        verified = openssl_verify_against_chain(chargepki(home, "ca", "chain").stdout, tmp_path / "cp.pem")
        assert verified.returncode == 0, verified.stderr
        again = chargepki(home, "run", "--setup-only")
        assert again.returncode == 0 and "is initialised" in again.stdout
        assert chargepki(home, "audit", "verify").returncode == 0
    assert not (home / "chargepki.db").exists()


def test_the_embedded_token_keys_are_not_extractable(fresh_home: Path) -> None:
    """Open the first-run token from a separate process and ask about every private key."""
    script = (
        "import sys, pkcs11\n"
        "from pkcs11 import Attribute, ObjectClass\n"
        f"lib = pkcs11.lib({os.fspath(_module())!r})\n"
        "token = lib.get_token(token_label='chargepki')\n"
        f"pin = open({os.fspath(fresh_home / 'softhsm' / 'user.pin')!r}).read().strip()\n"
        "with token.open(user_pin=pin) as s:\n"
        "    keys = list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))\n"
        "    print(len(keys))\n"
        "    for k in keys:\n"
        "        assert k[Attribute.SENSITIVE] and not k[Attribute.EXTRACTABLE], k.label\n"
        "        assert k[Attribute.NEVER_EXTRACTABLE] and k[Attribute.LOCAL], k.label\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(fresh_home / "softhsm" / "softhsm2.conf")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4", "root and issuing CA keys, and an OCSP signer key for each"


def _module() -> str:
    from ca.config import find_softhsm_module

    return find_softhsm_module()


def test_a_wiped_token_directory_is_recreated_with_the_same_pins(tmp_path: Path) -> None:
    home = tmp_path / "var"
    assert chargepki(home, "run", "--setup-only").returncode == 0
    pin = (home / "softhsm" / "user.pin").read_text()
    for token_dir in (home / "softhsm" / "tokens").iterdir():
        for item in token_dir.iterdir():
            item.unlink()
        token_dir.rmdir()
    (home / "chargepki.db").unlink()
    again = chargepki(home, "run", "--setup-only")
    assert again.returncode == 0, again.stderr
    assert (home / "softhsm" / "user.pin").read_text() == pin
