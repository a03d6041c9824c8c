"""Detached signatures of exported reports, made by the audit key and checked with openssl alone.

An export (a report's exact bytes) is signed ECDSA P-256 / SHA-256 by the audit key that signs
the checkpoints (``checkpoints.AUDIT_KEY_LABEL``): the installation already has one key, in the
token, that vouches for what it says about itself, whose public half auditors pin (the checkpoints'
``key``). No new key type, no certificate to manage. The signature covers the bytes as written,
with nothing around them, so ``openssl dgst -sha256 -verify KEY.pem -signature FILE.sig FILE``
checks it. Each signed export is recorded in the audit log with its SHA-256: who exported what when.

One key, two kinds of statement, never confusable: a checkpoint message starts with its own context
line, and an export that starts with it is refused (no report does; the check makes it a rule).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from ca.audit.chain import record
from ca.audit.checkpoints import _CONTEXT, _LOCK_HEAD, AUDIT_KEY_LABEL, _key_sha256, audit_public_key
from ca.errors import PolicyError
from ca.keys.pkcs11_token import Token
from ca.keys.token_keys import token_private_key


@dataclass(frozen=True)
class SignedExport:
    signature: bytes  # DER ECDSA-Sig-Value, what `openssl dgst -signature` reads
    public_key_pem: bytes  # the audit key's SubjectPublicKeyInfo
    key_sha256: str  # SHA-256 of that SPKI: the ``key`` of every checkpoint
    sha256: str  # of the export


def sign_export(
    session: Session,
    token: Token,
    data: bytes,
    *,
    actor: str,
    subject: str,
    details: dict[str, object] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> SignedExport:
    """Sign ``data`` with the audit key (created in the token on first use), verify the signature and
    record ``export.signed`` (``subject``, the export's SHA-256 and size, ``details``) in the audit log."""
    if data.startswith(_CONTEXT):
        raise PolicyError("an export may not start like an audit checkpoint message")
    # Under the audit head's lock, as checkpoints take it, so two processes never create the key at once.
    session.execute(_LOCK_HEAD)
    public_key = audit_public_key(token, create=True)
    algorithm = ec.ECDSA(hashes.SHA256())
    signature = token_private_key(token, AUDIT_KEY_LABEL, public_key).sign(data, algorithm)
    public_key.verify(signature, data, algorithm)  # every signature is checked before use
    digest = hashlib.sha256(data).hexdigest()
    key = _key_sha256(public_key)
    record(
        session,
        "export.signed",
        actor=actor,
        subject=subject,
        now=now,
        details={**(details or {}), "sha256": digest, "bytes": len(data), "key": key},
    )
    session.commit()
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SignedExport(signature, pem, key, digest)
