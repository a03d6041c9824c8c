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
        """The hash this key signs with: see ``curve_signature_hash``."""
        return curve_signature_hash(self.curve_name)

    def curve(self) -> ec.EllipticCurve:
        if self.curve_name is None:
            raise ValueError(f"{self.name} is not an elliptic-curve key type")
        return _CURVES[self.curve_name]()


def curve_signature_hash(curve_name: str | None) -> hashes.HashAlgorithm:
    """The one rule for the hash a CA key signs with (certificates, CRLs, OCSP responses, CSRs):
    the curve's matching strength, RFC 5758 §3.2 (P-384: ecdsa-with-SHA384, P-521:
    ecdsa-with-SHA512, as ISO 15118-20 asks); SHA-256 for P-256 and RSA (what chargers verify)."""
    if curve_name == "secp384r1":
        return hashes.SHA384()
    if curve_name == "secp521r1":
        return hashes.SHA512()
    return hashes.SHA256()


def public_key_signature_hash(key: PublicKeyTypes) -> hashes.HashAlgorithm:
    """``curve_signature_hash`` for the key itself (an OCSP signer's certificate key)."""
    return curve_signature_hash(key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else None)


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
        KeySpec("ec-p521", "ec", 521, "secp521r1"),
        KeySpec("rsa-2048", "rsa", 2048),
        KeySpec("rsa-3072", "rsa", 3072),
        KeySpec("rsa-4096", "rsa", 4096),
    )
}

# P-521 is known (ISO 15118-20's curve) but only the profiles that name it accept it: it is not in
# ALL_KEY_TYPES, so the OCPP hierarchy, its leaves, manufacturer and firmware keys never use it.
ALL_KEY_TYPES = tuple(name for name in KEY_SPECS if name != "ec-p521")
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
