"""Storage: SQLAlchemy models, the engine and sessions, Alembic migrations.

Public names are re-exported lazily (PEP 562), so importing the package never
imports all of its modules and cycles between packages cannot form at import time.
"""

from ca.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "AuditCheckpoint": "models",
        "AuditEvent": "models",
        "AuditHead": "models",
        "AuditNoise": "models",
        "AuthFailure": "models",
        "Authority": "models",
        "BUSY_TIMEOUT_MS": "engine",
        "Base": "models",
        "Campaign": "models",
        "CampaignDevice": "models",
        "CrlLeader": "models",
        "Certificate": "models",
        "CsmsClient": "models",
        "CsmsSignJob": "models",
        "CsmsToken": "models",
        "Device": "models",
        "EnrollmentSecret": "models",
        "KeyOwner": "models",
        "MIGRATIONS": "engine",
        "OcspResponse": "models",
        "postgres_parameters": "engine",
        "StatusFeed": "models",
        "Store": "engine",
        "UTCDateTime": "models",
    },
)
