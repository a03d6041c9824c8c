"""OCSP CertIDs (RFC 6960 §4.1.1): which hash algorithms, and an issuer's name and key hashes.

A request names its certificate's issuer by hash, not by name, so a responder serving several
CAs keeps, for every CA, the hashes a client may send: SHA-1 (what OpenSSL, Go and Java send by
default) and the SHA-2 family (SHA-256 in newer clients, SHA-256/384/512 in OCPP's
``OCSPRequestDataType``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.hazmat.primitives import serialization

# asn1crypto's names for the DigestAlgorithm OIDs, which is what the DER carries.
HASH_ALGORITHMS = ("sha1", "sha256", "sha384", "sha512")


@dataclass(frozen=True)
class CertId:
    hash_algorithm: str  # one of HASH_ALGORITHMS
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial_number: int


@dataclass(frozen=True)
class IssuerHashes:
    """What a CertID's issuer fields look like for one CA under one hash algorithm."""

    hash_algorithm: str
    name_hash: bytes
    key_hash: bytes


def issuer_hashes(issuer: x509.Certificate) -> list[IssuerHashes]:
    """The issuer fields of CertIDs for certificates ``issuer`` signed, one per hash algorithm.

    issuerNameHash covers the DER of the issuer's subject; issuerKeyHash covers the value of the
    subjectPublicKey BIT STRING (without tag, length and unused-bits octet).
    """
    name_der = issuer.subject.public_bytes()
    spki = issuer.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_bits = asn1_keys.PublicKeyInfo.load(spki)["public_key"].contents[1:]
    return [
        IssuerHashes(name, hashlib.new(name, name_der).digest(), hashlib.new(name, key_bits).digest())
        for name in HASH_ALGORITHMS
    ]
