"""A token that goes away and comes back, in-process: the same ``Token`` object resumes without a
restart, a refused PIN is never offered again (an HSM would lock it), and each change of the
token's state is audited once, with its reason and never the PIN."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pkcs11 import Mechanism
from sqlalchemy import select

from ca import audit
from ca.config import Config, Pkcs11Settings, write_config
from ca.context import Pki
from ca.errors import TokenError
from ca.keys import pkcs11_token
from ca.keys.keyspec import key_spec
from ca.keys.pkcs11_token import PinRefused, Token
from ca.store.engine import Store
from ca.store.models import AuditEvent
from tests.conftest import new_token_settings

DIGEST = hashlib.sha256(b"to be signed").digest()


@pytest.fixture
def spare(
    softhsm_conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Pkcs11Settings, str, Path]]:
    """A token of its own (its directory is moved around) and no wait between reconnections."""
    monkeypatch.setattr(pkcs11_token, "RECONNECT_INTERVAL", 0.0)
    tokens = softhsm_conf.parent / "tokens"
    before = set(tokens.iterdir())
    settings, pin = new_token_settings(softhsm_conf, tmp_path)
    (directory,) = set(tokens.iterdir()) - before
    yield settings, pin, directory
    if (tmp_path / "away").exists():  # a failed test must not leave the token away
        shutil.move(tmp_path / "away", directory)


def test_a_token_that_goes_away_and_comes_back_resumes(
    spare: tuple[Pkcs11Settings, str, Path], token: Token, tmp_path: Path
) -> None:
    settings, pin, directory = spare
    spare_token = Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)
    spare_token.generate_key(key_spec("ec-p256"), "k")
    assert spare_token.sign("k", Mechanism.ECDSA, DIGEST)
    shutil.move(directory, tmp_path / "away")
    for _ in range(3):  # the signature, then reconnections (module re-initialised) while it is away
        with pytest.raises(TokenError):
            spare_token.sign("k", Mechanism.ECDSA, DIGEST)
    assert spare_token.health.failure is not None
    shutil.move(tmp_path / "away", directory)
    assert spare_token.sign("k", Mechanism.ECDSA, DIGEST)
    assert spare_token.health.failure is None
    with token.session():  # the other token of this process reconnected after the re-initialisation
        pass


def test_a_refused_pin_is_not_offered_again_and_a_corrected_one_is_read(
    spare: tuple[Pkcs11Settings, str, Path],
) -> None:
    settings, pin, _ = spare
    current = ["not-the-pin"]

    def open_token() -> Token:
        return Token(settings.module, settings.token_label, lambda: current[0], softhsm_conf=settings.softhsm_conf)

    with pytest.raises(PinRefused) as first:
        open_token()
    assert str(first.value) == f"wrong PIN for token {settings.token_label!r}"
    with pytest.raises(PinRefused, match="not offered again until the configured PIN changes"):
        open_token()  # refused before reaching the token
    current[0] = pin
    assert open_token().health.failure is None


def test_token_outages_are_audited_once_per_change_without_the_pin(
    spare: tuple[Pkcs11Settings, str, Path], store: Store, tmp_path: Path
) -> None:
    settings, pin, directory = spare
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=store.url.render_as_string(hide_password=False), pkcs11=settings))
    pki = Pki.open(home, {})
    pki.token().generate_key(key_spec("ec-p256"), "k")
    pki.audit_token_health("test")  # nothing happened: nothing recorded
    shutil.move(directory, tmp_path / "away")
    for _ in range(3):
        with pytest.raises(TokenError):
            pki.token().sign("k", Mechanism.ECDSA, DIGEST)
        pki.audit_token_health("test")
    shutil.move(tmp_path / "away", directory)
    pki.token().sign("k", Mechanism.ECDSA, DIGEST)
    pki.audit_token_health("test")
    pki.audit_token_health("test")
    with store.session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action.like("token.%"))).all()
        assert audit.verify(session).ok
        session.commit()
    actions = [event.action for event in events]
    assert actions[0] == "token.unavailable" and actions[-1] == "token.available"
    assert len(actions) <= 3, actions  # the signature that failed, perhaps the reconnection's reason, back
    assert all(event.subject == settings.token_label for event in events)
    assert settings.token_label in events[0].details  # the reason names the token (gone, or its session)
    assert all(pin not in event.details for event in events)
    pki.close()
