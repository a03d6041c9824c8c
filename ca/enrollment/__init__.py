"""Enrollment: authenticating a caller, the subject policy per route, lockouts and refusal audit around `issue()`.

Public names are re-exported lazily (PEP 562), so importing the package never
imports all of its modules and cycles between packages cannot form at import time.
"""

from ca.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "AuthLimits": "auth_limits",
        "api_request_keys": "auth_limits",
        "Credentials": "pipeline",
        "DEFAULTS": "secc",
        "EnrollmentSettings": "pipeline",
        "IssuerFactory": "pipeline",
        "Key": "auth_limits",
        "MAX_PEM_CHARS": "identity",
        "REFUSED": "secc",
        "Standing": "auth_limits",
        "Verdict": "identity",
        "check_identity": "identity",
        "device_key": "auth_limits",
        "enroll": "pipeline",
        "enroll_secc": "secc",
        "forget": "auth_limits",
        "issue_secc": "secc",
        "ocpp_chain_check": "pipeline",
        "read_leaf": "identity",
        "record_failure": "auth_limits",
        "reenroll": "pipeline",
        "request_keys": "auth_limits",
        "requested_key": "pipeline",
        "sign_relayed": "pipeline",
        "standing": "auth_limits",
    },
)
