"""Subject names: the rules a CN must follow for each profile, and the names CAs get."""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509
from cryptography.x509.oid import NameOID

from ca.errors import PolicyError
from ca.ocpp_limits import IDENTITY_CHARS

UB_COMMON_NAME = 64  # RFC 5280 upper bounds
UB_ORGANIZATION = 64

# OCPP charging station identity: at most 48 characters, RFC 3986 unreserved characters plus
# the ones OCPP 1.6-security allows ("*-_=:+|@."). Never a URL or an IP address.
_CHARGER_IDENTITY = re.compile(rf"^[A-Za-z0-9._~*=:+|@-]{{1,{IDENTITY_CHARS}}}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# ISO 15118-2 Annex H EVSE ID (DE*ABC*E1234*1) and the ISO 15118-20 SECC ID (DE-ABC-S-…): country
# code, operator ID, ID type (E or S), then the station's own part; "*" or "-" separators optional.
_SECC_ID = re.compile(r"^[A-Za-z]{2}[*-]?[A-Za-z0-9]{3}[*-]?[EeSs][*-]?[A-Za-z0-9][A-Za-z0-9*-]*$")

ENVIRONMENTS = ("production", "staging", "factory-test")


def check_charger_identity(value: str) -> str:
    if not _CHARGER_IDENTITY.match(value):
        raise PolicyError(
            f"CN {value!r} is not a charging station identity "
            f"(1-{IDENTITY_CHARS} characters: letters, digits, ._~*=:+|@-)",
            code="bad_identity",
        )
    # Only digits and dots (IPv4) or a colon (IPv6) can be an address: the parse is skipped for the
    # rest (it ran four times per enrollment, 60 Python calls).
    if ":" not in value and not value.replace(".", "").isdigit():
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return value
    raise PolicyError(f"CN {value!r} is an IP address, not a charging station identity", code="bad_identity")


def check_secc_id(value: str) -> str:
    """The CN of an SECC certificate: an EVSE ID / SECC ID, at most 64 characters."""
    if len(value) > UB_COMMON_NAME or not _SECC_ID.match(value):
        raise PolicyError(
            f"{value!r} is not an SECC ID (ISO 15118 EVSE ID such as DE*ABC*E1234*1: country, operator, "
            "E or S, then letters and digits; at most 64 characters)",
            code="bad_secc_id",
        )
    return value


def check_hostname(value: str) -> str:
    name = value.rstrip(".").lower()
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise PolicyError(f"{value!r} is not a DNS host name")
    if labels[-1].isdigit():
        raise PolicyError(f"{value!r} is an IP address, not a DNS host name")
    return name


def check_plain_name(value: str, what: str = "CN") -> str:
    if not value or not value.strip():
        raise PolicyError(f"{what} is empty")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise PolicyError(f"{what} {value!r} contains control characters")
    return value.strip()


def check_common_name(kind: str, value: str) -> str:
    checks = {"charger": check_charger_identity, "hostname": check_hostname, "secc": check_secc_id}
    checked = checks.get(kind, check_plain_name)(value)
    if len(checked) > UB_COMMON_NAME:
        raise PolicyError(f"CN {value!r} is longer than {UB_COMMON_NAME} characters", code="bad_subject")
    return checked


def check_organization(value: str) -> str:
    value = check_plain_name(value, "organisation")
    if len(value) > UB_ORGANIZATION:
        raise PolicyError(f"organisation {value!r} is longer than {UB_ORGANIZATION} characters")
    return value


def check_country(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.fullmatch(r"[A-Z]{2}", value):
        raise PolicyError(f"country {value!r} must be a two-letter ISO 3166 code such as DE")
    return value


def check_environment(value: str) -> str:
    if value not in ENVIRONMENTS:
        raise PolicyError(f"unknown environment {value!r} (known: {', '.join(ENVIRONMENTS)})")
    return value


def subject_name(
    common_name: str,
    organization: str,
    country: str | None,
    domain_component: str | None = None,
    organizational_unit: str | None = None,
) -> x509.Name:
    attributes = []
    if country:
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if organizational_unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if domain_component:  # ISO 15118-2 Annex F: DC=V2G for the CAs, DC=CPO for SECC certificates
        attributes.append(x509.NameAttribute(NameOID.DOMAIN_COMPONENT, domain_component))
    return x509.Name(attributes)


def ca_common_name(organization: str, environment: str, role: str) -> str:
    """E.g. "Acme Charging Staging Issuing CA 1": the environment is always in the name."""
    suffix = f" {environment.title()} {role}"
    room = UB_COMMON_NAME - len(suffix)
    return organization[:room].rstrip() + suffix
