"""Token keys dressed as ``cryptography`` private keys, so the stock builders sign in the token.

``CertificateBuilder.sign``, ``CertificateRevocationListBuilder.sign`` and
``OCSPResponseBuilder.sign`` call ``key.sign(data, …)``; these classes send that call to the
PKCS#11 token and refuse every way of reading the private value. Where the module offers
the combined hash-and-sign mechanism it gets the data; otherwise (SoftHSM2 has only
``CKM_ECDSA``) the hash is computed here and the token signs the digest.
"""

from __future__ import annotations

from typing import Any, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import MGF, Mechanism

from ca.errors import TokenError
from ca.keys.pkcs11_token import Token

# DER prefixes of PKCS#1 v1.5 DigestInfo (RFC 8017 §9.2, note 1), for CKM_RSA_PKCS.
_DIGEST_INFO_PREFIX = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_ECDSA_COMBINED = {
    "sha256": Mechanism.ECDSA_SHA256,
    "sha384": Mechanism.ECDSA_SHA384,
    "sha512": Mechanism.ECDSA_SHA512,
}
_RSA_COMBINED = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_PSS_COMBINED = {
    "sha256": Mechanism.SHA256_RSA_PKCS_PSS,
    "sha384": Mechanism.SHA384_RSA_PKCS_PSS,
    "sha512": Mechanism.SHA512_RSA_PKCS_PSS,
}
_PSS_HASH = {
    "sha256": (Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512, MGF.SHA512),
}


def _digest(data: bytes, algorithm: Any) -> tuple[bytes, hashes.HashAlgorithm, bool]:
    """(digest, hash algorithm, was the caller's data already a digest)."""
    if isinstance(algorithm, Prehashed):
        return data, algorithm._algorithm, True
    if not isinstance(algorithm, hashes.HashAlgorithm):
        raise TokenError(f"unsupported signature hash {algorithm!r}")
    if algorithm.name not in _DIGEST_INFO_PREFIX:
        raise TokenError(f"token keys sign with SHA-256, SHA-384 or SHA-512, not {algorithm.name}")
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm, False


class _TokenKeyMixin:
    """What both key classes share: where the key lives and the refusals to export it."""

    _token: Token
    _label: str

    @property
    def token_label(self) -> str:
        return self._label

    @property
    def token(self) -> Token:
        return self._token

    def _refuse(self, *_: object, **__: object) -> NoReturn:
        raise TokenError(f"private key {self._label!r} lives in the PKCS#11 token and cannot be exported")

    private_bytes = _refuse
    private_numbers = _refuse

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Any:
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._label!r} in {self._token.label!r}>"


class TokenECPrivateKey(_TokenKeyMixin, ec.EllipticCurvePrivateKey):
    def __init__(self, token: Token, label: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self._token = token
        self._label = label
        self._public = public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TokenError(f"key {self._label!r} is a signing key; it does not do key agreement")

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TokenError(f"EC token keys sign with ECDSA, not {signature_algorithm!r}")
        algorithm = signature_algorithm.algorithm
        combined = None if isinstance(algorithm, Prehashed) else _ECDSA_COMBINED.get(algorithm.name)
        if combined is not None and combined in self._token.mechanisms:
            raw = self._token.sign(self._label, combined, data)
        else:
            digest, _, _ = _digest(data, algorithm)
            raw = self._token.sign(self._label, Mechanism.ECDSA, digest)
        # PKCS#11 returns r || s; X.509, CRLs and OCSP carry the DER SEQUENCE of two INTEGERs.
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


class TokenRSAPrivateKey(_TokenKeyMixin, rsa.RSAPrivateKey):
    def __init__(self, token: Token, label: str, public_key: rsa.RSAPublicKey) -> None:
        self._token = token
        self._label = label
        self._public = public_key

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise TokenError(f"key {self._label!r} is a signing key; it does not decrypt")

    def sign(self, data: bytes, padding_: padding.AsymmetricPadding, algorithm: Any) -> bytes:
        prehashed = isinstance(algorithm, Prehashed)
        name = algorithm._algorithm.name if prehashed else getattr(algorithm, "name", None)
        if name not in _DIGEST_INFO_PREFIX:
            raise TokenError(f"token keys sign with SHA-256, SHA-384 or SHA-512, not {name}")
        if isinstance(padding_, padding.PKCS1v15):
            combined = _RSA_COMBINED[name]
            if not prehashed and combined in self._token.mechanisms:
                return self._token.sign(self._label, combined, data)
            digest, _, _ = _digest(data, algorithm)
            return self._token.sign(self._label, Mechanism.RSA_PKCS, _DIGEST_INFO_PREFIX[name] + digest)
        if isinstance(padding_, padding.PSS):
            param = self._pss_param(padding_, name)
            combined = _PSS_COMBINED[name]
            if not prehashed and combined in self._token.mechanisms:
                return self._token.sign(self._label, combined, data, param)
            digest, _, _ = _digest(data, algorithm)
            return self._token.sign(self._label, Mechanism.RSA_PKCS_PSS, digest, param)
        raise TokenError(f"unsupported RSA padding {type(padding_).__name__}")

    def _pss_param(self, pss: padding.PSS, hash_name: str) -> tuple[Mechanism, MGF, int]:
        mgf = pss.mgf
        if not isinstance(mgf, padding.MGF1) or mgf._algorithm.name != hash_name:
            raise TokenError("RSA-PSS signing requires MGF1 with the same hash as the signature")
        hash_mechanism, mgf_id = _PSS_HASH[hash_name]
        digest_size = mgf._algorithm.digest_size
        salt = pss._salt_length
        if salt is padding.PSS.DIGEST_LENGTH:
            salt_length = digest_size
        elif salt is padding.PSS.MAX_LENGTH:
            salt_length = (self.key_size + 7) // 8 - digest_size - 2
        elif isinstance(salt, int):
            salt_length = salt
        else:
            raise TokenError("RSA-PSS signing needs an explicit salt length (AUTO is for verification)")
        return hash_mechanism, mgf_id, salt_length


def token_private_key(token: Token, label: str, public_key: PublicKeyTypes) -> TokenECPrivateKey | TokenRSAPrivateKey:
    """The signer for ``label``: a ``cryptography`` private key whose ``sign()`` runs in the token."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return TokenECPrivateKey(token, label, public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        return TokenRSAPrivateKey(token, label, public_key)
    raise TokenError(f"key {label!r} has an unsupported type {type(public_key).__name__}")
