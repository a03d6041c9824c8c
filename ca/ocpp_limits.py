"""OCPP 2.0.1 / 2.1 field limits the core enforces, in one place under one name each.

Each is the ``maxLength`` of the field named, in characters, from the OCPP 2.0.1 Part 2
specification's datatypes (unchanged in 2.1 unless noted).
"""

from __future__ import annotations

IDENTITY_CHARS = 48  # identifierString[0..48]: the charging station's identity (chargingStationId)
CSR_CHARS = 5500  # SignCertificateRequest.csr: string[0..5500], PEM
CERTIFICATE_CHAIN_CHARS = 10000  # CertificateSignedRequest.certificateChain: string[0..10000], PEM
INSTALL_CERTIFICATE_CHARS = 5500  # InstallCertificateRequest.certificate: string[0..5500], PEM (2.0.1)
INSTALL_CERTIFICATE_CHARS_21 = 10000  # the same in OCPP 2.1: string[0..10000]
SERIAL_NUMBER_CHARS = 40  # CertificateHashDataType.serialNumber: string[0..40], hex
HASH_CHARS = 128  # CertificateHashDataType.issuerNameHash / issuerKeyHash: string[0..128], hex
REQUEST_ID_MIN, REQUEST_ID_MAX = -(2**31), 2**31 - 1  # OCPP's integer: 32 bits (SignCertificateRequest.requestId, 2.1)
RESPONDER_URL_CHARS = 2000  # OCSPRequestDataType.responderURL: string[0..2000] in 2.1 (512 in 2.0.1)
OCSP_RESULT_CHARS = 18000  # GetCertificateStatusResponse.ocspResult: string[0..18000] in 2.1 (5500 in 2.0.1), base64
CHAIN_STATUS_ENTRIES = 4  # GetCertificateChainStatusRequest.certificateStatusRequests: 1..4 entries (2.1)
STATUS_URLS = 5  # CertificateStatusRequestInfoType.urls: 1..5 (2.1)
STATUS_URL_CHARS = 2000  # CertificateStatusRequestInfoType.urls[]: string[0..2000] (2.1)
FIRMWARE_SIGNATURE_CHARS = 800  # FirmwareType.signature: string[0..800], base64
FIRMWARE_CERTIFICATE_CHARS = 5500  # FirmwareType.signingCertificate: string[0..5500], PEM
