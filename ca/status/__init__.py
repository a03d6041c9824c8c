"""Certificate status: revocation, the status operators and relying parties see, the seam to OCSP (`StatusSigner`).

Public names are re-exported lazily (PEP 562), so importing the package never
imports all of its modules and cycles between packages cannot form at import time.
"""

from ca.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "CaImpact": "revocation",
        "NOTIFY_CHANNEL": "signal",
        "REASONS": "revocation",
        "STATUSES": "certificates",
        "Standing": "certificates",
        "StatusSigner": "signal",
        "apply_revocation": "revocation",
        "ca_impact": "revocation",
        "display_status": "certificates",
        "get_certificate": "certificates",
        "intermediates_pem": "certificates",
        "list_certificates": "certificates",
        "ocpp_chain_pem": "certificates",
        "parse_reason": "revocation",
        "pem_certificate": "certificates",
        "revoke": "revocation",
        "revoke_due": "revocation",
        "signal_change": "signal",
        "standing": "certificates",
        "unhold": "revocation",
    },
)
