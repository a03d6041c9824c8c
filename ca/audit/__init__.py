"""The tamper-evident audit log: the hash chain, anonymous-noise summaries, signed checkpoints and exports.

Public names are re-exported lazily (PEP 562), so importing the package never
imports all of its modules and cycles between packages cannot form at import time.
"""

from ca.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "ACTIVITY": "chain",
        "AUDIT_KEY_LABEL": "checkpoints",
        "Checkpoint": "checkpoints",
        "CheckpointTimer": "checkpoints",
        "CheckpointResult": "checkpoints",
        "FILE_NAME": "checkpoints",
        "GENESIS": "chain",
        "LatestCheckpoint": "checkpoints",
        "NOISE": "chain",
        "SignedExport": "exports",
        "VerifyResult": "chain",
        "audit_public_key": "checkpoints",
        "checkpoint": "checkpoints",
        "count_activity": "chain",
        "count_noise": "chain",
        "entry_hash": "chain",
        "events": "chain",
        "flush_all_noise": "chain",
        "flush_noise": "chain",
        "log": "checkpoints",
        "periodic_checkpoint": "checkpoints",
        "record": "chain",
        "sign_export": "exports",
        "verify": "chain",
    },
)
