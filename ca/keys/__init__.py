"""Keys: the PKCS#11 token (any HSM, SoftHSM2 embedded), token-held keys as `cryptography` keys, key types.

Public names are re-exported lazily (PEP 562), so importing the package never
imports all of its modules and cycles between packages cannot form at import time.
"""

from ca.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "ALL_KEY_TYPES": "keyspec",
        "EC_KEY_TYPES": "keyspec",
        "Finding": "doctor",
        "KEY_SPECS": "keyspec",
        "KeyMissing": "pkcs11_token",
        "KeySpec": "keyspec",
        "PinRefused": "pkcs11_token",
        "PinSource": "pkcs11_token",
        "RECONNECT_INTERVAL": "pkcs11_token",
        "Token": "pkcs11_token",
        "TokenECPrivateKey": "token_keys",
        "TokenHealth": "pkcs11_token",
        "TokenRSAPrivateKey": "token_keys",
        "create_token": "softhsm",
        "curve_signature_hash": "keyspec",
        "describe_public_key": "keyspec",
        "diagnose": "doctor",
        "key_spec": "keyspec",
        "new_key_label": "pkcs11_token",
        "public_key_signature_hash": "keyspec",
        "token_exists": "softhsm",
        "token_private_key": "token_keys",
        "write_softhsm_conf": "softhsm",
    },
)
