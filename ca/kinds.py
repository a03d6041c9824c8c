"""The closed vocabularies the store keeps: CA roles, CA and certificate statuses, job states.

``StrEnum`` members compare equal to their values, so rows read back as plain strings still
match; the database enforces the same sets with CHECK constraints (see ``ca.store.models``).
Adding a member needs a migration that widens the constraint.
"""

from __future__ import annotations

from enum import StrEnum


class CaRole(StrEnum):
    ROOT = "root"  # the OCPP root of an environment
    ISSUING = "issuing"  # signs chargers, CSMS servers, admins (pathLen 0)
    MANUFACTURER = "manufacturer"  # the manufacturer root; signs firmware signers
    V2G_ROOT = "v2g-root"
    V2G_SUB_CA_1 = "v2g-sub-ca-1"  # CPO Sub-CA 1 (pathLen 1)
    V2G_SUB_CA_2 = "v2g-sub-ca-2"  # CPO Sub-CA 2: signs SECC leaves
    # ISO 15118-20 (secp521r1): a hierarchy of its own beside the -2 one (migration 0011)
    V2G20_ROOT = "v2g20-root"
    V2G20_SUB_CA_1 = "v2g20-sub-ca-1"  # optional in -20
    V2G20_SUB_CA_2 = "v2g20-sub-ca-2"  # under Sub-CA 1 or directly under the root: signs -20 SECC leaves
    # A vehicle manufacturer's root, imported (status external) for chargers to install with OCPP 2.1's
    # InstallCertificate(OEMRootCertificate): never signs here, never in a chain (migration 0012)
    OEM_ROOT = "oem-root"


class CaStatus(StrEnum):
    ACTIVE = "active"  # signs
    RETIRED = "retired"  # superseded and its last certificate expired: never signs again
    REVOKED = "revoked"  # its own certificate is revoked: never signs again
    EXTERNAL = "external"  # a certificate only (e.g. an external V2G root): no key here


class CertStatus(StrEnum):
    PENDING = "pending"  # serial reserved, signature in progress or interrupted: never handed out
    VALID = "valid"
    REVOKED = "revoked"  # includes certificateHold (reason says which)
    ABORTED = "aborted"  # a reservation abandoned before the certificate left: its serial stays used


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SIGNED = "signed"
    REFUSED = "refused"


def sql_in(column: str, kind: type[StrEnum]) -> str:
    """``column IN ('a', 'b')`` for a CHECK constraint over ``kind``'s values."""
    return f"{column} IN ({', '.join(repr(str(member)) for member in kind)})"
