"""The CSMS API's OpenAPI 3.1 document, written by hand, and request validation from its own schemas.

Requests are validated against the very schemas published here (JSON Schema 2020-12, which
OpenAPI 3.1 uses), so the document cannot claim a field the API refuses or miss one it accepts;
a test checks that every route is documented and that the API's answers match their schemas.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from ca.authorities.rotation import INSTALL_CERTIFICATE_TYPES, OCPP_21
from ca.errors import InputError
from ca.ocpp_limits import (
    CERTIFICATE_CHAIN_CHARS,
    CHAIN_STATUS_ENTRIES,
    CSR_CHARS,
    IDENTITY_CHARS,
    OCSP_RESULT_CHARS,
    REQUEST_ID_MAX,
    REQUEST_ID_MIN,
    RESPONDER_URL_CHARS,
    SERIAL_NUMBER_CHARS,
    STATUS_URL_CHARS,
    STATUS_URLS,
)
from ca.registry.csms import CERTIFICATE_TYPES

_HEX = "^[0-9A-Fa-f]+$"
# The path parameters exactly as web/api.py reads them: a SHA-256 fingerprint in hex, either case,
# colons anywhere (``AB:CD:…``); a job id as the API hands it out.
FINGERPRINT_PATH = "^:*(?:[0-9A-Fa-f]:*){64}$"
_JOB_ID = "^[0-9a-f]{32}$"
_STRING = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "malformed JSON, unknown or missing field, bad value, unreadable CSR or certificate",
        401: "no or wrong CSMS credentials (`WWW-Authenticate: Bearer`)",
        403: "refused by policy (the reason says which rule)",
        404: "not found (`unknown_issuer`, `unknown_root`, `unknown_certificate` …)",
        409: "conflicts with the CA's state (`key_reuse`, `v2g_not_configured`, `root_not_current` …)",
        413: "body larger than 32 KiB",
        415: "Content-Type is not application/json",
        429: "too many failed authentications from this address (API tokens) or with this client "
        "certificate: locked out for a while, even with good credentials (`Retry-After`)",
        503: "token or database unavailable (`Retry-After`)",
    }
    statuses = (*statuses, 429) if 401 in statuses else statuses  # every authenticated call can be locked out
    return {str(status): _json("Error", meaning[status]) for status in statuses}


# OCPP HashAlgorithmEnumType → the hex length of its digests (what ``ocsp.ocpp.parse_hash_data`` requires).
HASH_HEX_LENGTHS = {"SHA256": 64, "SHA384": 96, "SHA512": 128}
# Where a schema keyword stands for a check the core makes, the refusal keeps the core's reason code.
REASONS = "x-chargepki-reasons"

_HASH_DATA = {
    "type": "object",
    "description": "OCPP CertificateHashDataType (the OCSP CertID in text)",
    "additionalProperties": False,
    "required": ["hashAlgorithm", "issuerNameHash", "issuerKeyHash", "serialNumber"],
    "properties": {
        "hashAlgorithm": {"enum": list(HASH_HEX_LENGTHS)},
        **{
            field: {
                "type": "string",
                "maxLength": max(HASH_HEX_LENGTHS.values()),
                "pattern": "^(?:[0-9A-Fa-f]{2})+$",
                "description": f"the issuer's {what} hash in hex, either case: 64, 96 or 128 digits for "
                "SHA256, SHA384 or SHA512",
            }
            for field, what in (("issuerNameHash", "DN"), ("issuerKeyHash", "public key"))
        },
        "serialNumber": {
            "type": "string",
            "minLength": 1,
            "maxLength": SERIAL_NUMBER_CHARS,
            "pattern": _HEX,
            "not": {"pattern": "^0+$"},
            REASONS: {"not": "bad_serial"},
            "description": "hex, either case, positive (leading zeros are accepted and ignored)",
        },
    },
    "allOf": [
        {
            "if": {"required": ["hashAlgorithm"], "properties": {"hashAlgorithm": {"const": algorithm}}},
            "then": {
                "properties": {
                    field: {
                        "minLength": length,
                        "maxLength": length,
                        REASONS: {"minLength": "bad_hash", "maxLength": "bad_hash"},
                    }
                    for field in ("issuerNameHash", "issuerKeyHash")
                }
            },
        }
        for algorithm, length in HASH_HEX_LENGTHS.items()
    ],
}

_REQUEST_ID = {
    "type": "integer",
    "minimum": REQUEST_ID_MIN,
    "maximum": REQUEST_ID_MAX,
    "description": "OCPP 2.1 requestId (an OCPP integer: 32 bits), echoed in the answer for CertificateSigned",
}
_SIGNED_FIELDS = {
    "certificateType": {"enum": list(CERTIFICATE_TYPES), "description": "what was asked for"},
    "requestId": {**_REQUEST_ID, "description": "the request's requestId, when it had one (OCPP 2.1)"},
    "certificateChain": {
        "type": "string",
        "maxLength": CERTIFICATE_CHAIN_CHARS,
        "description": "PEM, leaf first, sub-CAs after, root omitted",
    },
    "serialNumber": {"type": "string", "description": "upper-case hex without leading zeros"},
    "fingerprintSha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "notAfter": _TIME,
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "additionalProperties": False,
        "required": ["error", "reason"],
        "properties": {
            "error": {"type": "string", "description": "one line for people"},
            "reason": {"type": "string", "description": "machine-readable code, e.g. cn_mismatch"},
        },
    },
    "SignRequest": {
        "type": "object",
        "description": "OCPP SignCertificateRequest as the CSMS relays it, plus the station it came from",
        "additionalProperties": False,
        "required": ["chargingStationId", "csr"],
        "properties": {
            "chargingStationId": {"type": "string", "minLength": 1, "maxLength": IDENTITY_CHARS},
            "certificateType": {
                "enum": list(CERTIFICATE_TYPES),
                "default": "ChargingStationCertificate",
                "description": "V2GCertificate: an ISO 15118-2 SECC leaf; V2G20Certificate (OCPP 2.1): an "
                "ISO 15118-20 SECC leaf (P-521)",
            },
            "csr": {"type": "string", "minLength": 1, "maxLength": CSR_CHARS, "description": "PEM PKCS#10"},
            "requestId": _REQUEST_ID,
            "hashRootCertificate": {
                **_ref("CertificateHashData"),
                "description": "OCPP 2.1: the root to sign under, as its own CertificateHashData (issuer "
                "hashes of the self-signed root, its serial): a root of the CSMS's environment of the "
                "certificate type's hierarchy (the OCPP root, the ISO 15118-2 or the ISO 15118-20 V2G root); "
                "404 unknown_root, 400 root_type_mismatch, 409 root_not_current",
            },
        },
    },
    "SignResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["certificateType", "certificateChain", "serialNumber", "fingerprintSha256", "notAfter"],
        "properties": _SIGNED_FIELDS,
    },
    "SignJob": {
        "type": "object",
        "description": "an asynchronous signing request: pending, then signed or refused",
        "additionalProperties": False,
        "required": ["jobId", "status", "location"],
        "properties": {
            "jobId": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "status": {"enum": ["pending", "signed", "refused"]},
            "location": {"type": "string", "description": "where to poll"},
            **_SIGNED_FIELDS,
            "error": _STRING,
            "reason": _STRING,
        },
    },
    "CertificateHashData": _HASH_DATA,
    "CertificateInfo": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "serialNumber",
            "fingerprintSha256",
            "status",
            "profile",
            "subject",
            "issuer",
            "environment",
            "notBefore",
            "notAfter",
            "device",
            "certificateChain",
            "certificateHashData",
        ],
        "properties": {
            "serialNumber": _STRING,
            "fingerprintSha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "status": {"enum": ["good", "revoked", "expired"]},
            "revocationReason": {"type": "string", "description": "RFC 5280 reason name, when revoked"},
            "revocationTime": _TIME,
            "profile": _STRING,
            "subject": {"type": "string", "description": "RFC 4514"},
            "issuer": {"type": "string", "description": "the CA's name, e.g. production-issuing-1"},
            "environment": _STRING,
            "notBefore": _TIME,
            "notAfter": _TIME,
            "device": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["chargingStationId", "enabled", "environment"],
                        "properties": {
                            "chargingStationId": _STRING,
                            "enabled": {"type": "boolean"},
                            "environment": _STRING,
                        },
                    },
                ]
            },
            "certificateChain": {"type": "string", "description": "PEM, leaf first, sub-CAs after, root omitted"},
            "certificateHashData": {"type": "array", "items": _ref("CertificateHashData")},
        },
    },
    "OcspRequest": {
        "type": "object",
        "description": "OCPP GetCertificateStatusRequest",
        "additionalProperties": False,
        "required": ["ocspRequestData"],
        "properties": {
            "ocspRequestData": {
                "type": "object",
                "description": "OCPP OCSPRequestDataType",
                "additionalProperties": False,
                "required": [*_HASH_DATA["required"], "responderURL"],
                "properties": {
                    **_HASH_DATA["properties"],
                    "responderURL": {
                        "type": "string",
                        "maxLength": RESPONDER_URL_CHARS,
                        "description": "accepted and ignored (this is the responder); up to 2000 characters "
                        "as in OCPP 2.1 (OCPP 2.0.1: 512)",
                    },
                },
                "allOf": _HASH_DATA["allOf"],
            }
        },
    },
    "OcspResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["ocspResult", "responseStatus"],
        "properties": {
            "ocspResult": {
                "type": "string",
                "maxLength": OCSP_RESULT_CHARS,
                "description": "base64 DER OCSPResponse (OCPP ocspResult; at most 18000 characters as in OCPP "
                "2.1, about 1500 in practice, within OCPP 2.0.1's 5500)",
            },
            "responseStatus": {"enum": ["successful"]},
            "certificateStatus": {"enum": ["good", "revoked", "unknown"]},
        },
    },
    "CertificateChainStatusRequest": {
        "type": "object",
        "description": "OCPP 2.1 GetCertificateChainStatusRequest (M07) as the CSMS relays it",
        "additionalProperties": False,
        "required": ["certificateStatusRequests"],
        "properties": {
            "certificateStatusRequests": {
                "type": "array",
                "minItems": 1,
                "maxItems": CHAIN_STATUS_ENTRIES,
                REASONS: {"maxItems": "too_many_entries", "minItems": "no_entries"},
                "items": _ref("CertificateStatusRequestInfo"),
            }
        },
    },
    "CertificateStatusRequestInfo": {
        "type": "object",
        "description": "OCPP 2.1 CertificateStatusRequestInfoType: one certificate and where its status comes from",
        "additionalProperties": False,
        "required": ["certificateHashData", "source", "urls"],
        "properties": {
            "certificateHashData": _ref("CertificateHashData"),
            "source": {"enum": ["CRL", "OCSP"], "description": "OCSP: the CA's OCSP response; CRL: its published CRL"},
            "urls": {
                "type": "array",
                "minItems": 1,
                "maxItems": STATUS_URLS,
                REASONS: {"maxItems": "too_many_urls"},
                "items": {"type": "string", "maxLength": STATUS_URL_CHARS, REASONS: {"maxLength": "field_too_long"}},
                "description": "the source's URLs from the certificate; accepted and ignored (this CA is the source)",
            },
        },
    },
    "CertificateChainStatusResult": {
        "type": "object",
        "description": "OCPP 2.1 GetCertificateChainStatusResponse: one entry per request entry, in order",
        "additionalProperties": False,
        "required": ["certificateStatus"],
        "properties": {
            "certificateStatus": {
                "type": "array",
                "minItems": 1,
                "maxItems": CHAIN_STATUS_ENTRIES,
                "items": {
                    "type": "object",
                    "description": "OCPP 2.1 CertificateStatusType",
                    "additionalProperties": False,
                    "required": ["certificateHashData", "source", "status", "nextUpdate"],
                    "properties": {
                        "certificateHashData": _ref("CertificateHashData"),
                        "source": {"enum": ["CRL", "OCSP"]},
                        "status": {
                            "enum": ["Good", "Revoked", "Unknown", "Failed"],
                            "description": "Failed: the source cannot answer (no current CRL published, an "
                            "external CA, the OCSP signer unavailable)",
                        },
                        "nextUpdate": {
                            **_TIME,
                            "description": "the OCSP response's or the CRL's nextUpdate; a minute ahead when Failed",
                        },
                    },
                },
            }
        },
    },
    "InstallCertificates": {
        "type": "object",
        "description": "the roots a station of the CSMS's environment should hold, as InstallCertificate payloads",
        "additionalProperties": False,
        "required": ["environment", "ocppVersion", "installCertificates"],
        "properties": {
            "environment": _STRING,
            "ocppVersion": {"enum": list(INSTALL_CERTIFICATE_TYPES)},
            "installCertificates": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["certificateType", "certificate", "name", "notAfter", "certificateHashData"],
                    "properties": {
                        "certificateType": {
                            "enum": list(INSTALL_CERTIFICATE_TYPES[OCPP_21]),
                            "description": "InstallCertificateRequest.certificateType",
                        },
                        "certificate": {"type": "string", "description": "InstallCertificateRequest.certificate (PEM)"},
                        "name": {"type": "string", "description": "the CA's name here, e.g. production-v2g20-root-1"},
                        "notAfter": _TIME,
                        "certificateHashData": {
                            "type": "array",
                            "description": "as GetInstalledCertificateIds reports it, per hash algorithm",
                            "items": _ref("CertificateHashData"),
                        },
                    },
                },
            },
        },
    },
    "IdentityCheckRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["chargingStationId", "clientCertificate"],
        "properties": {
            "chargingStationId": {"type": "string", "minLength": 1, "maxLength": IDENTITY_CHARS},
            "clientCertificate": {
                "type": "string",
                "minLength": 1,
                "maxLength": CERTIFICATE_CHAIN_CHARS,
                "description": "PEM of the certificate the charger presented in TLS (a chain may follow)",
            },
        },
    },
    "IdentityCheckResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["allowed"],
        "properties": {
            "allowed": {"type": "boolean"},
            "reason": {
                "type": "string",
                "description": "when refused: unknown_issuer, other_environment, unknown_certificate, "
                "ca_not_active, not_a_charger_certificate, revoked, expired, not_yet_valid, cn_mismatch, "
                "wrong_organization, unknown_device, device_disabled",
            },
            "detail": _STRING,
            "serialNumber": _STRING,
        },
    },
}

_AUTH = [{"mutualTLS": []}, {"bearer": []}, {"apiKey": []}]

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "chargepki CSMS API",
        "version": "1",
        "description": "What a CSMS (OCPP 2.1 / 2.0.1 / 1.6-security) asks its CA: signing relayed CSRs "
        "(chargers, ISO 15118-2 and -20 SECC leaves), certificate lookups by OCPP hash data or fingerprint, "
        "OCSP responses for GetCertificateStatus, chain status for GetCertificateChainStatus, the roots "
        "stations install, and the identity check every charger connection needs. Errors are JSON "
        "{error, reason}.",
    },
    "components": {
        "securitySchemes": {
            "mutualTLS": {"type": "mutualTLS", "description": "a csms-client certificate (`chargepki csms add`)"},
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API token (`chargepki csms token`)"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the same token"},
        },
        "schemas": SCHEMAS,
    },
    "security": _AUTH,
    "paths": {
        "/api/v1/sign": {
            "post": {
                "summary": "Sign a charger's CSR (OCPP SignCertificate) with the same checks as EST",
                "parameters": [
                    {
                        "name": "async",
                        "in": "query",
                        "required": False,
                        "description": "1: answer 202 at once and decide later (poll the job)",
                        "schema": {"enum": ["0", "1", "true", "false"]},
                    }
                ],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("SignRequest")}}},
                "responses": {
                    "200": _json("SignResult", "signed"),
                    "202": _json("SignJob", "accepted for signing; poll `location` (also the Location header)"),
                    **_errors(400, 401, 403, 404, 409, 413, 415, 503),
                },
            }
        },
        "/api/v1/sign/{jobId}": {
            "get": {
                "summary": "An asynchronous signing job: 202 while pending, 200 once signed or refused",
                "parameters": [
                    {"name": "jobId", "in": "path", "required": True, "schema": {"type": "string", "pattern": _JOB_ID}}
                ],
                "responses": {
                    "200": _json("SignJob", "decided: signed (with the chain) or refused (with the reason)"),
                    "202": _json("SignJob", "still pending (`Retry-After`)"),
                    **_errors(401, 404, 503),
                },
            }
        },
        "/api/v1/certificates/by-hash": {
            "get": {
                "summary": "A certificate by OCPP CertificateHashData: status, device, validity, chain",
                "parameters": [
                    {
                        "name": "hashData",
                        "in": "query",
                        "required": True,
                        "description": "the four fields as query parameters: "
                        "`?hashAlgorithm=SHA256&issuerNameHash=…&issuerKeyHash=…&serialNumber=…`",
                        "style": "form",
                        "explode": True,
                        "schema": _ref("CertificateHashData"),
                    }
                ],
                "responses": {"200": _json("CertificateInfo", "found"), **_errors(400, 401, 404, 503)},
            }
        },
        "/api/v1/certificates/{fingerprint}": {
            "get": {
                "summary": "A certificate by its SHA-256 fingerprint (hex, colons allowed)",
                "parameters": [
                    {
                        "name": "fingerprint",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": FINGERPRINT_PATH},
                    }
                ],
                "responses": {"200": _json("CertificateInfo", "found"), **_errors(400, 401, 404, 503)},
            }
        },
        "/api/v1/ocsp": {
            "post": {
                "summary": "OCPP GetCertificateStatus: the DER OCSP response for a CertID, base64",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("OcspRequest")}}},
                "responses": {
                    "200": _json("OcspResult", "a signed OCSP response"),
                    **_errors(400, 401, 404, 413, 415, 503),
                },
            }
        },
        "/api/v1/certificate-chain-status": {
            "post": {
                "summary": "OCPP 2.1 GetCertificateChainStatus: 1-4 certificates, each by OCSP or by the published CRL",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CertificateChainStatusRequest")}},
                },
                "responses": {
                    "200": _json("CertificateChainStatusResult", "a status per entry, in order"),
                    **_errors(400, 401, 404, 413, 415, 503),
                },
            }
        },
        "/api/v1/install-certificates": {
            "get": {
                "summary": "The roots a station should hold, as InstallCertificate payloads (CSMS, V2G, "
                "manufacturer and OEM roots)",
                "parameters": [
                    {
                        "name": "ocppVersion",
                        "in": "query",
                        "required": False,
                        "description": "2.1 (the default) or 2.0.1, whose InstallCertificate has no OEMRootCertificate",
                        "schema": {"enum": list(INSTALL_CERTIFICATE_TYPES)},
                    }
                ],
                "responses": {"200": _json("InstallCertificates", "the bundle"), **_errors(400, 401, 404, 503)},
            }
        },
        "/api/v1/identity-check": {
            "post": {
                "summary": "Is this TLS client certificate the current one of this charging station?",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("IdentityCheckRequest")}},
                },
                "responses": {
                    "200": _json("IdentityCheckResult", "the verdict"),
                    **_errors(400, 401, 413, 415, 503),
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            }
        },
    },
}


def _pattern(validator_: Any, pattern: str, instance: object, schema: dict[str, Any]) -> Any:
    """``pattern`` as ECMA-262 reads it: ``$`` is the end of the string, not also the place before a
    final newline as in Python's ``re`` (this document puts no ``$`` inside a character class)."""
    if isinstance(instance, str) and not re.search(re.sub(r"(?<!\\)\$", r"\\Z", pattern), instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})


@cache
def validator(schema: str) -> Any:
    """A validator for one named schema, resolving references within this document."""
    return Validator({"$ref": f"#/components/schemas/{schema}", "components": DOCUMENT["components"]})


@cache
def query_validator(path: str, method: str) -> Any:
    """The operation's query parameters as one object schema (unknown parameters refused); an
    exploded form-style object parameter is that object schema itself."""
    parameters = [p for p in DOCUMENT["paths"][path][method].get("parameters", []) if p["in"] == "query"]
    exploded = [p for p in parameters if p.get("style") == "form" and p.get("explode")]
    if exploded:
        assert len(parameters) == 1, "an exploded object parameter stands alone"
        return Validator({**exploded[0]["schema"], "components": DOCUMENT["components"]})
    return Validator(
        {
            "type": "object",
            "additionalProperties": False,
            "required": [p["name"] for p in parameters if p.get("required")],
            "properties": {p["name"]: p["schema"] for p in parameters},
        }
    )


@cache
def path_validator(path: str, method: str, name: str) -> Any:
    """The schema of one path parameter."""
    (parameter,) = [p for p in DOCUMENT["paths"][path][method]["parameters"] if p["in"] == "path" and p["name"] == name]
    return Validator(parameter["schema"])


def check(validator_: Any, instance: object) -> None:
    """Raise an ``InputError`` naming the first problem: unknown_field, missing_field or bad_value."""
    error = best_match(validator_.iter_errors(instance))
    if error is None:
        return
    raise InputError(_describe(error), code=_reason(error))


def _reason(error: ValidationError) -> str:
    keyword = str(error.validator)
    reasons = error.schema.get(REASONS, {}) if isinstance(error.schema, dict) else {}
    if keyword in reasons:
        return str(reasons[keyword])
    return {"additionalProperties": "unknown_field", "required": "missing_field"}.get(keyword, "bad_value")


def _describe(error: ValidationError) -> str:
    where = ".".join(str(part) for part in error.absolute_path)
    message = error.message if len(error.message) <= 200 else error.message[:200] + "…"
    return f"{where}: {message}" if where else message
