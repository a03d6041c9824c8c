"""`chargepki token doctor` against real SoftHSM2 tokens: a healthy token passes every check; a wrong PIN,
a missing module, a missing token label and a token without a user PIN each fail with exit status 1 and
the explanation in plain words; no temporary key outlives a run, not even a failed one; no PIN is shown."""

from __future__ import annotations

import ctypes
import json
import secrets
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ca.config import Config, Pkcs11Settings, find_softhsm_module, write_config
from ca.errors import TokenError
from ca.issuance.profiles import key_types_in_use
from ca.keys import doctor
from ca.keys.keyspec import key_spec
from ca.keys.pkcs11_token import Token, _library
from cli.main import cli
from tests.conftest import new_token_settings


def run(home: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), "token", "doctor", *args], env=env, catch_exceptions=False)


def make_home(tmp_path: Path, settings: Pkcs11Settings) -> Path:
    """A home whose config names ``settings``; the doctor never opens its database."""
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=f"sqlite:///{home / 'chargepki.db'}", pkcs11=settings))
    return home


@pytest.fixture
def fresh(softhsm_conf: Path, tmp_path: Path) -> tuple[Pkcs11Settings, str]:
    """A token of its own: no other part of this process is logged in to it, so the PIN is really tried."""
    return new_token_settings(softhsm_conf, tmp_path)


def key_objects(settings: Pkcs11Settings, pin: str) -> set[str]:
    token = Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)
    try:
        return token.key_labels()
    finally:
        token.close()


def checks(result: Result) -> list[dict]:
    return json.loads(result.stdout)["checks"]


def test_a_healthy_token_passes_every_check_and_keeps_no_temporary_key(
    fresh: tuple[Pkcs11Settings, str], tmp_path: Path
) -> None:
    settings, pin = fresh
    token = Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)
    token.generate_key(key_spec("ec-p256"), "a-ca-key")  # a key of the CA's, which must stay
    token.close()
    before = key_objects(settings, pin)
    home = make_home(tmp_path, settings)

    result = run(home, "--json")

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["problems"] == 0
    assert document["token_label"] == settings.token_label and document["module"] == settings.module
    found = {(c["check"], c["key_type"]): c for c in document["checks"]}
    assert all(c["status"] == "ok" for c in document["checks"]), [c for c in document["checks"] if c["status"] != "ok"]
    key_types = key_types_in_use()
    assert set(found) == {(name, None) for name in ("config", "module", "slots", "token", "login", "leftover_keys")} | {
        (name, k) for name in ("mechanisms", "sign_verify") for k in key_types
    }
    token_info = found[("token", None)]["details"]
    assert token_info["label"] == settings.token_label
    assert token_info["manufacturer"] and token_info["model"] and token_info["serial"]
    assert "USER_PIN_INITIALIZED" in token_info["flags"]
    assert found[("sign_verify", "rsa-2048")]["details"]["signatures"] == ["RSA-PKCS1v15-SHA256", "RSA-PSS-SHA256"]
    assert found[("sign_verify", "ec-p384")]["details"]["signatures"] == ["ECDSA-SHA384"]
    assert found[("sign_verify", "ec-p521")]["details"]["signatures"] == ["ECDSA-SHA512"]  # ISO 15118-20
    assert all(found[("sign_verify", k)]["details"]["destroyed"] for k in key_types)
    assert key_objects(settings, pin) == before, "a temporary key was left in the token (or a CA key removed)"
    assert "a-ca-key" in before
    assert pin not in result.output

    text = run(home)
    assert text.exit_code == 0
    assert "token doctor: the token is ready" in text.stdout and "PROBLEM" not in text.stdout
    assert key_objects(settings, pin) == before and pin not in text.output


def test_a_wrong_pin_is_explained_and_exits_1(fresh: tuple[Pkcs11Settings, str], tmp_path: Path) -> None:
    settings, pin = fresh
    wrong = f"WRONG-{secrets.token_hex(6)}"
    result = run(make_home(tmp_path, settings), env={"CHARGEPKI_PKCS11_PIN": wrong})
    assert result.exit_code == 1
    assert "PROBLEM  login" in result.stdout and "CKR_PIN_INCORRECT" in result.stdout
    assert "the token refused the configured PIN" in result.stdout
    assert "the environment variable CHARGEPKI_PKCS11_PIN" in result.stdout  # where it came from
    assert "skipped: not logged in" in result.stdout
    assert wrong not in result.output and pin not in result.output

    document = run(make_home(tmp_path / "again", settings), "--json", env={"CHARGEPKI_PKCS11_PIN": wrong})
    assert document.exit_code == 1
    login = next(c for c in checks(document) if c["check"] == "login")
    assert (login["status"], login["error"]) == ("problem", "CKR_PIN_INCORRECT")
    assert "retry limit" in login["remedy"]
    assert wrong not in document.output and pin not in document.output


def test_a_missing_module_is_explained_and_exits_1(fresh: tuple[Pkcs11Settings, str], tmp_path: Path) -> None:
    settings, _ = fresh
    missing = Pkcs11Settings(
        module=str(tmp_path / "no-such-pkcs11.so"),
        token_label=settings.token_label,
        pin_file=settings.pin_file,
        softhsm_conf=settings.softhsm_conf,
    )
    result = run(make_home(tmp_path, missing), "--json")
    assert result.exit_code == 1
    module = next(c for c in checks(result) if c["check"] == "module")
    assert (module["status"], module["error"]) == ("problem", "module_missing")
    assert "no file at" in module["summary"] and "softhsm2" in module["remedy"]
    assert {c["status"] for c in checks(result) if c["check"] not in ("config", "module")} == {"skipped"}

    text = run(make_home(tmp_path / "text", missing))
    assert text.exit_code == 1 and "PROBLEM  module" in text.stdout and "is not there" in text.stdout


def test_a_file_that_is_no_pkcs11_module_is_explained(fresh: tuple[Pkcs11Settings, str], tmp_path: Path) -> None:
    settings, _ = fresh
    not_a_module = tmp_path / "libnot-pkcs11.so"
    not_a_module.write_bytes(b"\x7fELF not really")
    other = Pkcs11Settings(module=str(not_a_module), token_label=settings.token_label, pin_file=settings.pin_file)
    result = run(make_home(tmp_path, other), "--json")
    module = next(c for c in checks(result) if c["check"] == "module")
    assert result.exit_code == 1 and module["error"] == "module_unloadable" and "ldd" in module["remedy"]


def test_a_missing_token_label_is_explained_and_exits_1(fresh: tuple[Pkcs11Settings, str], tmp_path: Path) -> None:
    settings, _ = fresh
    absent = Pkcs11Settings(
        module=settings.module,
        token_label=f"absent-{secrets.token_hex(4)}",
        pin_file=settings.pin_file,
        softhsm_conf=settings.softhsm_conf,
    )
    result = run(make_home(tmp_path, absent))
    assert result.exit_code == 1
    assert f"no token labelled '{absent.token_label}' in any slot" in result.stdout
    assert "compare [pkcs11] token_label with the slots listed above" in result.stdout
    assert f"'{settings.token_label}'" in result.stdout, "the slots step lists the labels that do exist"
    document = run(make_home(tmp_path / "json", absent), "--json")
    token = next(c for c in checks(document) if c["check"] == "token")
    assert (token["status"], token["error"]) == ("problem", "no_such_token")


def test_a_token_without_a_user_pin_is_explained(softhsm_conf: Path, tmp_path: Path) -> None:
    """C_InitToken without C_InitPIN: the SO's half of the set-up was done, the user's was not."""
    settings = Pkcs11Settings(
        module=find_softhsm_module(),
        token_label=f"t-{secrets.token_hex(6)}",
        pin_file=tmp_path / "user.pin",
        softhsm_conf=softhsm_conf,
    )
    (tmp_path / "user.pin").write_text("123456\n")
    (tmp_path / "user.pin").chmod(0o600)
    library = _library(settings.module, softhsm_conf)
    free = next(slot for slot in library.lib.get_slots(token_present=True) if not slot.get_token().label.strip())
    module = ctypes.CDLL(settings.module)
    module.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    so_pin = secrets.token_hex(8).encode()
    assert module.C_InitToken(free.slot_id, so_pin, len(so_pin), settings.token_label.encode().ljust(32)) == 0

    result = run(make_home(tmp_path, settings), "--json")
    assert result.exit_code == 1
    login = next(c for c in checks(result) if c["check"] == "login")
    assert (login["status"], login["error"]) == ("problem", "CKR_USER_PIN_NOT_INITIALIZED")
    assert "never given a user PIN" in login["explanation"] and "--init-pin" in login["remedy"]


def test_the_temporary_key_is_destroyed_when_its_check_fails(
    fresh: tuple[Pkcs11Settings, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key pair exists in the token when the signature fails; it is destroyed all the same."""
    settings, pin = fresh
    before = key_objects(settings, pin)
    generated: list[str] = []

    def failing(token: Token, label: str, public_key: object) -> object:
        generated.append(label)
        assert label in token.key_labels(doctor.TEMPORARY_PREFIX), "the key exists when the failure happens"
        raise TokenError(f"signing with {label!r} failed: simulated")

    monkeypatch.setattr(doctor, "token_private_key", failing)
    result = run(make_home(tmp_path, settings), "--json")

    assert result.exit_code == 1
    failed = [c for c in checks(result) if c["check"] == "sign_verify"]
    assert len(failed) == len(key_types_in_use()) == len(generated)
    assert all(c["status"] == "problem" and c["details"]["destroyed"] is True for c in failed)
    assert key_objects(settings, pin) == before


def test_keys_left_by_an_interrupted_run_are_reported(fresh: tuple[Pkcs11Settings, str], tmp_path: Path) -> None:
    settings, pin = fresh
    token = Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)
    left = f"{doctor.TEMPORARY_PREFIX}0123456789abcdef"
    token.generate_key(key_spec("ec-p256"), left)
    token.close()
    result = run(make_home(tmp_path, settings), "--json")
    assert result.exit_code == 0, "a warning is no problem"
    leftover = next(c for c in checks(result) if c["check"] == "leftover_keys")
    assert leftover["status"] == "warning" and leftover["details"]["labels"] == [left]
    assert "pkcs11-tool --delete-object" in leftover["remedy"]
    assert key_objects(settings, pin) & {left}, "the doctor never deletes what it did not create"
