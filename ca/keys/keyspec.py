"""Key types chargepki knows by name, and how each one signs.

The names (``ec-p256`` …) are what operators type and what profiles list; a public key
from a CSR is described with the same vocabulary so a refusal can say exactly what was
sent and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ca.errors import InputError


@dataclass(frozen=True)
class KeySpec:
    name: str
    algorithm: str  # "ec" or "rsa"
    bits: int
    curve_name: str | None = None  # SEC name, e.g. "secp256r1"

    @property
    def signature_hash(self) -> hashes.HashAlgorithm:
        """SHA-384 for P-384 (matching strength), SHA-256 otherwise (what chargers verify)."""
        if self.curve_name == "secp384r1":
            return hashes.SHA384()
        return hashes.SHA256()

    def curve(self) -> ec.EllipticCurve:
        if self.curve_name is None:
            raise ValueError(f"{self.name} is not an elliptic-curve key type")
        return _CURVES[self.curve_name]()


_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "secp521r1": ec.SECP521R1,
}

KEY_SPECS: dict[str, KeySpec] = {
    spec.name: spec
    for spec in (
        KeySpec("ec-p256", "ec", 256, "secp256r1"),
        KeySpec("ec-p384", "ec", 384, "secp384r1"),
        KeySpec("rsa-2048", "rsa", 2048),
        KeySpec("rsa-3072", "rsa", 3072),
        KeySpec("rsa-4096", "rsa", 4096),
    )
}

ALL_KEY_TYPES = tuple(KEY_SPECS)
EC_KEY_TYPES = ("ec-p256", "ec-p384")


def key_spec(name: str) -> KeySpec:
    try:
        return KEY_SPECS[name]
    except KeyError:
        raise InputError(f"unknown key type {name!r} (known: {', '.join(KEY_SPECS)})") from None


def describe_public_key(key: PublicKeyTypes) -> str:
    """The key-type name of any public key, including ones no profile allows (for refusals)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        names = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}
        return names.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448"
    return type(key).__name__.removeprefix("_").lower()
