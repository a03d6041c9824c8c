"""Certificate profiles as data: what each kind of certificate may contain and for how long.

The CA decides every extension from the profile; nothing is copied from a CSR. Adding a
profile means adding an entry here, not a subclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from ca.errors import InputError
from ca.keyspec import ALL_KEY_TYPES

DAY = timedelta(days=1)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    key_types: tuple[str, ...]
    default_validity: timedelta
    max_validity: timedelta
    key_usage: frozenset[str]  # field names of cryptography's x509.KeyUsage
    extended_key_usage: tuple[ObjectIdentifier, ...] = ()
    ca: bool = False
    path_length: int | None = None
    # How the subject's CN is checked: "charger" (OCPP identity), "hostname" or "name".
    common_name: str = "name"
    san_dns: bool = False  # add a dNSName SAN holding the CN and any requested DNS names
    key_agreement_for_ec: bool = False  # EC keys also get keyAgreement (OCPP charger, ISO 15118)
    key_encipherment_for_rsa: bool = False  # RSA keys also get keyEncipherment (TLS 1.2 RSA kx)
    aia_ocsp: bool = False
    aia_ca_issuers: bool = True
    crl_distribution_point: bool = True
    ocsp_no_check: bool = False
    from_csr: bool = True  # issued from a CSR by `chargepki issue` (else only by `chargepki init`)


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            name="root",
            description="self-signed root CA of one environment",
            key_types=ALL_KEY_TYPES,
            default_validity=20 * 365 * DAY,
            max_validity=30 * 365 * DAY,
            key_usage=frozenset({"key_cert_sign", "crl_sign"}),
            ca=True,
            aia_ca_issuers=False,
            crl_distribution_point=False,
            from_csr=False,
        ),
        Profile(
            name="issuing-ca",
            description="issuing CA under the root (pathLen 0): signs chargers, servers, OCSP signers",
            key_types=ALL_KEY_TYPES,
            default_validity=10 * 365 * DAY,
            max_validity=15 * 365 * DAY,
            key_usage=frozenset({"key_cert_sign", "crl_sign"}),
            ca=True,
            path_length=0,
            from_csr=False,
        ),
        Profile(
            name="charger",
            description="charging station client certificate (OCPP security profile 3)",
            key_types=ALL_KEY_TYPES,
            default_validity=2 * 365 * DAY,
            max_validity=5 * 365 * DAY,
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            common_name="charger",
            key_agreement_for_ec=True,
            aia_ocsp=True,
        ),
        Profile(
            name="csms-server",
            description="CSMS TLS server certificate (CN = FQDN, short-lived as OCPP recommends)",
            key_types=ALL_KEY_TYPES,
            default_validity=timedelta(hours=23),
            max_validity=90 * DAY,
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
            common_name="hostname",
            san_dns=True,
            key_encipherment_for_rsa=True,
            aia_ocsp=True,
        ),
        Profile(
            name="ocsp-signer",
            description="delegated OCSP responder certificate (id-kp-OCSPSigning, ocsp-nocheck)",
            key_types=ALL_KEY_TYPES,
            default_validity=30 * DAY,
            max_validity=90 * DAY,
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.OCSP_SIGNING,),
            ocsp_no_check=True,
            crl_distribution_point=False,  # nocheck: clients do not check its revocation
        ),
        Profile(
            name="ra",
            description="factory registration authority (EST enroll-on-behalf over mTLS)",
            key_types=ALL_KEY_TYPES,
            default_validity=365 * DAY,
            max_validity=3 * 365 * DAY,
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            aia_ocsp=True,
        ),
        Profile(
            name="firmware-signer",
            description="firmware signing certificate (codeSigning)",
            key_types=ALL_KEY_TYPES,
            default_validity=3 * 365 * DAY,
            max_validity=5 * 365 * DAY,
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.CODE_SIGNING,),
            aia_ocsp=True,
        ),
        Profile(
            name="root-link",
            description="root rollover link: one root's name and key certified by the other root (ca/rotation.py)",
            key_types=ALL_KEY_TYPES,
            default_validity=20 * 365 * DAY,
            max_validity=30 * 365 * DAY,
            key_usage=frozenset({"key_cert_sign", "crl_sign"}),
            ca=True,
            from_csr=False,
        ),
    )
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InputError(f"unknown profile {name!r} (known: {', '.join(PROFILES)})") from None
