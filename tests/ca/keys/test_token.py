"""CA keys live in the PKCS#11 token: generated there, never extractable, used through
``cryptography`` key objects whose signatures verify with stock verifiers."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from ca.config import Pkcs11Settings
from ca.errors import TokenError
from ca.keys import pkcs11_token
from ca.keys.keyspec import key_spec
from ca.keys.pkcs11_token import Token
from ca.keys.token_keys import TokenECPrivateKey, TokenRSAPrivateKey, token_private_key
from tests.conftest import new_token_settings

KEY_TYPES = ["ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096"]


@pytest.fixture(scope="module")
def keys(token: Token) -> dict[str, TokenECPrivateKey | TokenRSAPrivateKey]:
    """One key of every supported type, generated in the token."""
    result = {}
    for kind in KEY_TYPES:
        label = f"test-{kind}-{secrets.token_hex(4)}"
        result[kind] = token_private_key(token, label, token.generate_key(key_spec(kind), label))
    return result


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_generated_keys_are_sensitive_and_never_extractable(token: Token, keys: dict, kind: str) -> None:
    attributes = token.key_attributes(keys[kind].token_label)
    assert attributes["sensitive"] and attributes["always_sensitive"]
    assert not attributes["extractable"] and attributes["never_extractable"]
    assert attributes["local"], "the key was generated inside the token, not imported"
    assert attributes["token"] and attributes["private"]


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_the_token_refuses_to_reveal_the_private_value(token: Token, keys: dict, kind: str) -> None:
    secret = Attribute.VALUE if kind.startswith("ec") else Attribute.PRIVATE_EXPONENT
    with token.session() as session:
        (key,) = session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: keys[kind].token_label}
        )
        with pytest.raises(p11.AttributeSensitive):
            key[secret]


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_key_objects_refuse_export(keys: dict, kind: str) -> None:
    key = keys[kind]
    with pytest.raises(TokenError, match="cannot be exported"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(TokenError, match="cannot be exported"):
        key.private_numbers()


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384"])
@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384()])
def test_ecdsa_signatures_are_der_and_verify(keys: dict, kind: str, algorithm: hashes.HashAlgorithm) -> None:
    key = keys[kind]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(b"tbs", ec.ECDSA(algorithm))
    assert signature[0] == 0x30, "X.509 needs a DER SEQUENCE, not the token's raw r||s"
    key.public_key().verify(signature, b"tbs", ec.ECDSA(algorithm))


@pytest.mark.parametrize(("kind", "expected"), [("ec-p256", "sha256"), ("ec-p384", "sha384"), ("ec-p521", "sha512")])
def test_each_curve_signs_with_its_rfc_5758_hash_in_the_token(keys: dict, kind: str, expected: str) -> None:
    """SoftHSM2 has only CKM_ECDSA: the digest is made here, the token signs it. P-521 (ISO 15118-20)
    signs SHA-512 digests: the r||s halves are 66 octets each, and the DER signature verifies."""
    spec = key_spec(kind)
    assert spec.signature_hash.name == expected
    key = keys[kind]
    signature = key.sign(b"tbs", ec.ECDSA(spec.signature_hash))
    assert signature[0] == 0x30
    key.public_key().verify(signature, b"tbs", ec.ECDSA(spec.signature_hash))
    assert key.curve.name == spec.curve_name


def test_ecdsa_accepts_prehashed_digests(keys: dict) -> None:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"firmware image")
    signature = keys["ec-p256"].sign(digest.finalize(), ec.ECDSA(Prehashed(hashes.SHA256())))
    keys["ec-p256"].public_key().verify(signature, b"firmware image", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("kind", ["rsa-2048", "rsa-3072", "rsa-4096"])
def test_rsa_pkcs1v15_and_pss_signatures_verify(keys: dict, kind: str) -> None:
    key = keys[kind]
    assert isinstance(key, rsa.RSAPrivateKey)
    pkcs1 = key.sign(b"tbs", padding.PKCS1v15(), hashes.SHA256())
    key.public_key().verify(pkcs1, b"tbs", padding.PKCS1v15(), hashes.SHA256())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    signature = key.sign(b"tbs", pss, hashes.SHA256())
    key.public_key().verify(signature, b"tbs", pss, hashes.SHA256())


def test_rsa_raw_mechanism_path_hashes_outside_the_token(token: Token, keys: dict, monkeypatch) -> None:
    """Modules without SHA256_RSA_PKCS(_PSS) get a digest (DigestInfo for PKCS#1 v1.5)."""
    monkeypatch.setattr(token, "mechanisms", frozenset())
    key = keys["rsa-2048"]
    signature = key.sign(b"tbs", padding.PKCS1v15(), hashes.SHA384())
    key.public_key().verify(signature, b"tbs", padding.PKCS1v15(), hashes.SHA384())
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    key.public_key().verify(key.sign(b"tbs", pss, hashes.SHA256()), b"tbs", pss, hashes.SHA256())


def test_the_session_pool_serves_concurrent_signers(keys: dict) -> None:
    key = keys["ec-p256"]
    messages = [secrets.token_bytes(32) for _ in range(200)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        signatures = list(pool.map(lambda m: key.sign(m, ec.ECDSA(hashes.SHA256())), messages))
    for message, signature in zip(messages, signatures, strict=True):
        key.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_a_label_is_never_reused(token: Token, keys: dict) -> None:
    with pytest.raises(TokenError, match="already holds a key"):
        token.generate_key(key_spec("ec-p256"), keys["ec-p256"].token_label)


# -- clear errors -------------------------------------------------------------------------------
def test_missing_module_is_named(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match=r"PKCS#11 module not found: /nonexistent/libpkcs11\.so"):
        Token("/nonexistent/libpkcs11.so", "x", "1234")


def test_a_file_that_is_not_a_module_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not a shared object")
    with pytest.raises(TokenError, match="cannot load PKCS#11 module"):
        Token(str(bogus), "x", "1234")


def test_missing_token_is_named(token_settings: tuple[Pkcs11Settings, str]) -> None:
    settings, pin = token_settings
    with pytest.raises(TokenError, match="no token labelled 'no-such-token'"):
        Token(settings.module, "no-such-token", pin, softhsm_conf=settings.softhsm_conf)


def test_wrong_pin_is_reported(softhsm_conf: Path, tmp_path: Path) -> None:
    settings, _pin = new_token_settings(softhsm_conf, tmp_path)
    with pytest.raises(TokenError, match="wrong PIN"):
        Token(settings.module, settings.token_label, "not-the-pin", softhsm_conf=softhsm_conf)


def test_missing_key_label_is_named(token: Token) -> None:
    with pytest.raises(TokenError, match="no public key labelled 'absent'"):
        token.public_key("absent")
    with pytest.raises(TokenError, match="no private key labelled 'absent'"):
        token.key_attributes("absent")


class _FlakyModule:
    """The loaded module, except that finding the token fails ``failures`` times with ``error``: what
    SoftHSM2 answers while another process rewrites the token's file at login (CKR_GENERAL_ERROR,
    or, at C_Initialize, a slot list without the token)."""

    def __init__(self, lib: object, error: type[Exception], failures: int) -> None:
        self.lib, self.error, self.failures = lib, error, failures
        self.initialised = 0

    def get_token(self, **kwargs: object) -> object:
        if self.failures:
            self.failures -= 1
            raise self.error()
        return self.lib.get_token(**kwargs)  # type: ignore[attr-defined]

    def initialize(self) -> None:
        self.initialised += 1
        self.lib.initialize()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.lib, name)


@pytest.mark.parametrize("error", [p11.GeneralError, p11.NoSuchToken])
@pytest.mark.parametrize(("failures", "connects"), [(2, True), (50, False)])  # 50: beyond every retry
def test_a_token_missed_during_another_login_is_retried_briefly(
    token: Token,
    token_settings: tuple[Pkcs11Settings, str],
    monkeypatch: pytest.MonkeyPatch,
    error: type[Exception],
    failures: int,
    connects: bool,
) -> None:
    settings, pin = token_settings
    library = pkcs11_token._LIBRARIES[settings.module]
    flaky = _FlakyModule(library.lib, error, failures)
    monkeypatch.setattr(library, "lib", flaky)
    if connects:
        fresh = Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)
        assert fresh.mechanisms and flaky.failures == 0
        assert flaky.initialised == failures  # the module was initialised again before each retry
    else:
        message = "unavailable: GeneralError" if error is p11.GeneralError else "no token labelled"
        with pytest.raises(TokenError, match=message):
            Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)
    monkeypatch.undo()
    label = f"after-retry-{secrets.token_hex(4)}"  # the session-wide token signs on after the re-initialisations
    token.generate_key(key_spec("ec-p256"), label)
    assert len(token.sign(label, Mechanism.ECDSA, bytes(32))) == 64
    token.destroy_key(label)
