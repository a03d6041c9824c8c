"""OCPP 2.0.1 / 2.1 field limits the core enforces, in one place under one name each.

Each is the ``maxLength`` of the field named, in characters, from the OCPP 2.0.1 Part 2
specification's datatypes (unchanged in 2.1 unless noted).
"""

from __future__ import annotations

IDENTITY_CHARS = 48  # identifierString[0..48]: the charging station's identity (chargingStationId)
CSR_CHARS = 5500  # SignCertificateRequest.csr: string[0..5500], PEM
CERTIFICATE_CHAIN_CHARS = 10000  # CertificateSignedRequest.certificateChain: string[0..10000], PEM
SERIAL_NUMBER_CHARS = 40  # CertificateHashDataType.serialNumber: string[0..40], hex
HASH_CHARS = 128  # CertificateHashDataType.issuerNameHash / issuerKeyHash: string[0..128], hex
FIRMWARE_SIGNATURE_CHARS = 800  # FirmwareType.signature: string[0..800], base64
FIRMWARE_CERTIFICATE_CHARS = 5500  # FirmwareType.signingCertificate: string[0..5500], PEM
