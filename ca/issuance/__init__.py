"""Issuing one certificate: profiles as data, subject rules, CSR parsing, serials, and the flow
reserve → sign → verify → record.

Public names are re-exported lazily (PEP 562), so importing the package never
imports all of its modules and cycles between packages cannot form at import time.
"""

from ca.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BACKDATE": "flow",
        "CA_ROLE_PROFILES": "profiles",
        "CsrRequest": "csr",
        "DAY": "profiles",
        "ENVIRONMENTS": "names",
        "ISO15118_20": "profiles",
        "ISO15118_20_KEY_TYPES": "profiles",
        "ISO15118_2": "profiles",
        "ISO15118_KEY_TYPES": "profiles",
        "IssueRequest": "flow",
        "MAX_CSR_BYTES": "csr",
        "PENDING_TIMEOUT": "flow",
        "PROFILES": "profiles",
        "Profile": "profiles",
        "ROOT_PROFILES": "profiles",
        "SECC_PROFILES": "profiles",
        "SERIAL_BITS": "serials",
        "UB_COMMON_NAME": "names",
        "UB_ORGANIZATION": "names",
        "V2G_VERSIONS": "profiles",
        "V2gVersion": "profiles",
        "Validity": "flow",
        "YEAR": "profiles",
        "abandon_stale_pending": "flow",
        "build_certificate": "flow",
        "ca_common_name": "names",
        "ca_profile": "profiles",
        "check_charger_identity": "names",
        "check_common_name": "names",
        "check_country": "names",
        "check_environment": "names",
        "check_hostname": "names",
        "check_issuer_role": "profiles",
        "check_key": "flow",
        "check_organization": "names",
        "check_plain_name": "names",
        "check_secc_id": "names",
        "format_serial": "serials",
        "get_profile": "profiles",
        "issue": "flow",
        "key_identity": "flow",
        "load_csr": "csr",
        "new_serial": "serials",
        "parse_serial": "serials",
        "read_csr": "csr",
        "request_from_csr": "flow",
        "subject_name": "names",
        "v2g_version": "profiles",
        "v2g_version_of": "profiles",
        "validity_window": "flow",
    },
)
