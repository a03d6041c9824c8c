"""Certificate profiles as data: what each kind of certificate may contain and for how long.

The CA decides every extension from the profile; nothing is copied from a CSR. Adding a
profile means adding an entry here, not a subclass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from ca.errors import InputError, PolicyError
from ca.keys.keyspec import ALL_KEY_TYPES, KEY_SPECS

DAY = timedelta(days=1)
YEAR = 365 * DAY
ISO15118_KEY_TYPES = ("ec-p256",)  # ISO 15118-2: secp256r1 with ECDSA-SHA256, every certificate of the chain
ISO15118_20_KEY_TYPES = ("ec-p521",)  # ISO 15118-20: secp521r1 with ECDSA-SHA512, every certificate of the chain


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
    # Which CA roles (``Authority.role``) may issue it; OCSP signers are issued by every CA.
    issuer_roles: tuple[str, ...] = ("issuing",)
    domain_component: str | None = None  # a DC attribute in the subject (ISO 15118-2: V2G, CPO)
    # CA profiles: OCSP responses about what this CA issues live at least this long (stapled by
    # chargers to the EV, refreshed about weekly); None means the [ocsp] validity_hours setting.
    ocsp_validity: timedelta | None = None
    # The issuing CA's own key type is allowed too (delegated OCSP signers have their CA's key, so
    # an ISO 15118-20 CA's signer is P-521 while no OCPP CA's can be).
    issuer_key_type: bool = False

    def allowed_key_types(self, issuer_key_type: str | None = None) -> tuple[str, ...]:
        """The key types a certificate of this profile may certify under a CA with ``issuer_key_type``."""
        if self.issuer_key_type and issuer_key_type is not None and issuer_key_type not in self.key_types:
            return (*self.key_types, issuer_key_type)
        return self.key_types


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
            aia_ocsp=True,  # the root's signer answers for it: TLS stacks checking the chain need the URL
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
            issuer_key_type=True,
            crl_distribution_point=False,  # nocheck: clients do not check its revocation
            # Every response carries this certificate, and whoever checks it already has the CA's
            # certificate: caIssuers would only add bytes (V2G responses are stapled to EVs).
            aia_ca_issuers=False,
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
        # -- the manufacturer hierarchy: firmware signers directly under the root (OCPP) ----------
        Profile(
            name="manufacturer-root",
            description="self-signed manufacturer root: firmware signers are issued directly under it",
            key_types=ALL_KEY_TYPES,
            default_validity=20 * YEAR,
            max_validity=30 * YEAR,
            key_usage=frozenset({"key_cert_sign", "crl_sign"}),
            ca=True,
            path_length=0,  # OCPP: no intermediate between the manufacturer root and a firmware signer
            aia_ca_issuers=False,
            crl_distribution_point=False,
            from_csr=False,
        ),
        Profile(
            name="csms-client",
            description="CSMS client certificate for the CSMS API (mTLS; CN = the CSMS name)",
            key_types=ALL_KEY_TYPES,
            default_validity=365 * DAY,
            max_validity=3 * 365 * DAY,
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            aia_ocsp=True,
        ),
        Profile(
            name="admin",
            description="operator client certificate for the read-only fleet console (mTLS; CN = the admin's name)",
            key_types=ALL_KEY_TYPES,
            default_validity=90 * DAY,
            max_validity=365 * DAY,  # a person's access: renewed often, and revoked when they leave
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            aia_ocsp=True,
        ),
        Profile(
            name="firmware-signer",
            description="firmware signing certificate (codeSigning) for OCPP SignedUpdateFirmware",
            key_types=("ec-p256",),  # ECDSA P-256 with SHA-256: what charging stations verify
            default_validity=3 * YEAR,
            max_validity=5 * YEAR,
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.CODE_SIGNING,),
            aia_ocsp=True,
            issuer_roles=("manufacturer",),
        ),
        # -- ISO 15118-2 Plug & Charge: V2G root -> CPO Sub-CA 1 -> CPO Sub-CA 2 -> SECC -----------
        # Every certificate must fit the 800-byte certificateType of the ISO 15118-2 schema, so
        # none carries caIssuers or a CRL distribution point: EVs check revocation by OCSP.
        Profile(
            name="v2g-root",
            description="ISO 15118-2 V2G root CA (DC=V2G, secp256r1)",
            key_types=ISO15118_KEY_TYPES,
            default_validity=20 * YEAR,
            max_validity=40 * YEAR,
            key_usage=frozenset({"key_cert_sign", "crl_sign"}),
            ca=True,
            aia_ca_issuers=False,
            crl_distribution_point=False,
            from_csr=False,
            domain_component="V2G",
            ocsp_validity=14 * DAY,
        ),
        Profile(
            name="v2g-sub-ca-1",
            description="ISO 15118-2 CPO Sub-CA 1 (pathLen 1, at most 4 years)",
            key_types=ISO15118_KEY_TYPES,
            default_validity=4 * YEAR,
            max_validity=4 * YEAR + DAY,  # four calendar years include a leap day
            key_usage=frozenset({"key_cert_sign", "crl_sign"}),
            ca=True,
            path_length=1,
            aia_ocsp=True,
            aia_ca_issuers=False,
            crl_distribution_point=False,
            from_csr=False,
            issuer_roles=("v2g-root",),
            domain_component="V2G",
            ocsp_validity=14 * DAY,
        ),
        Profile(
            name="v2g-sub-ca-2",
            description="ISO 15118-2 CPO Sub-CA 2 (pathLen 0, at most 2 years), issues SECC certificates",
            key_types=ISO15118_KEY_TYPES,
            default_validity=YEAR,
            max_validity=2 * YEAR,
            key_usage=frozenset({"key_cert_sign", "crl_sign"}),
            ca=True,
            path_length=0,
            aia_ocsp=True,
            aia_ca_issuers=False,
            crl_distribution_point=False,
            from_csr=False,
            issuer_roles=("v2g-sub-ca-1",),
            domain_component="V2G",
            ocsp_validity=14 * DAY,
        ),
        Profile(
            name="v2g-secc",
            description="ISO 15118-2 SECC leaf (CN = SECC ID, DC=CPO, short-lived)",
            key_types=ISO15118_KEY_TYPES,
            default_validity=60 * DAY,
            max_validity=90 * DAY,  # ISO 15118-2: two to three months
            key_usage=frozenset({"digital_signature", "key_agreement"}),
            common_name="secc",
            aia_ocsp=True,
            aia_ca_issuers=False,
            crl_distribution_point=False,
            issuer_roles=("v2g-sub-ca-2",),
            domain_component="CPO",
        ),
    )
}


def _iso15118_20(name: str, description: str, issuer_roles: tuple[str, ...] | None = None) -> Profile:
    """An ISO 15118-20 profile: its ISO 15118-2 counterpart (``v2g-…``) on secp521r1 with ECDSA-SHA512,
    with the same extensions and lifetimes; only the names, key types and issuers differ."""
    counterpart = PROFILES[name.replace("v2g20-", "v2g-")]
    return replace(
        counterpart,
        name=name,
        description=description,
        key_types=ISO15118_20_KEY_TYPES,
        issuer_roles=counterpart.issuer_roles if issuer_roles is None else issuer_roles,
    )


# -- ISO 15118-20: the same chain on secp521r1; Sub-CA 1 is optional, so a Sub-CA 2 is issued by
# Sub-CA 1 or directly by the root. Then the root rollover's link profile.
PROFILES.update(
    (profile.name, profile)
    for profile in (
        _iso15118_20("v2g20-root", "ISO 15118-20 V2G root CA (DC=V2G, secp521r1)"),
        _iso15118_20(
            "v2g20-sub-ca-1",
            "ISO 15118-20 CPO Sub-CA 1 (pathLen 1, at most 4 years; optional in -20)",
            ("v2g20-root",),
        ),
        _iso15118_20(
            "v2g20-sub-ca-2",
            "ISO 15118-20 CPO Sub-CA 2 (pathLen 0, at most 2 years), issues -20 SECC certificates",
            ("v2g20-sub-ca-1", "v2g20-root"),
        ),
        _iso15118_20(
            "v2g20-secc",
            "ISO 15118-20 SECC leaf (CN = SECC ID, DC=CPO, secp521r1, TLS 1.3, short-lived)",
            ("v2g20-sub-ca-2",),
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
            issuer_roles=("root",),
        ),
    )
)


# The profile of each CA role's own certificate.
CA_ROLE_PROFILES: dict[str, str] = {
    "root": "root",
    "issuing": "issuing-ca",
    "manufacturer": "manufacturer-root",
    "v2g-root": "v2g-root",
    "v2g-sub-ca-1": "v2g-sub-ca-1",
    "v2g-sub-ca-2": "v2g-sub-ca-2",
    "v2g20-root": "v2g20-root",
    "v2g20-sub-ca-1": "v2g20-sub-ca-1",
    "v2g20-sub-ca-2": "v2g20-sub-ca-2",
}
# Self-signed: nobody answers for their status, and they cannot be revoked (retire the hierarchy).
ROOT_PROFILES = frozenset({"root", "manufacturer-root", "v2g-root", "v2g20-root"})


@dataclass(frozen=True)
class V2gVersion:
    """One ISO 15118 version's V2G PKI as data: its CA roles (each also the name of the CA's
    profile), its SECC leaf profile and the key type of every certificate in its chain.

    The versions are distinct sets of CAs (different curves), side by side in one environment:
    a station holds one SECC leaf of each, never with the same key.
    """

    iso: str  # what operators and callers name it by: "15118-2", "15118-20"
    root: str
    sub_ca_1: str
    sub_ca_2: str
    secc: str  # the leaf profile
    key_type: str
    sub_ca_1_optional: bool  # ISO 15118-20 allows root → Sub-CA 2 → leaf

    @property
    def roles(self) -> tuple[str, str, str]:
        return (self.root, self.sub_ca_1, self.sub_ca_2)

    @property
    def title(self) -> str:
        return f"ISO {self.iso}"


ISO15118_2 = "15118-2"
ISO15118_20 = "15118-20"
V2G_VERSIONS: dict[str, V2gVersion] = {
    version.iso: version
    for version in (
        V2gVersion(ISO15118_2, "v2g-root", "v2g-sub-ca-1", "v2g-sub-ca-2", "v2g-secc", "ec-p256", False),
        V2gVersion(ISO15118_20, "v2g20-root", "v2g20-sub-ca-1", "v2g20-sub-ca-2", "v2g20-secc", "ec-p521", True),
    )
}
SECC_PROFILES = tuple(version.secc for version in V2G_VERSIONS.values())


def v2g_version(iso: str) -> V2gVersion:
    """The ISO 15118 version named ``iso`` ("15118-2", "15118-20"); an ``InputError`` otherwise."""
    try:
        return V2G_VERSIONS[iso]
    except KeyError:
        raise InputError(f"unknown ISO 15118 version {iso!r} (known: {', '.join(V2G_VERSIONS)})") from None


def v2g_version_of(role_or_profile: str) -> V2gVersion | None:
    """The ISO 15118 version a V2G CA role or SECC profile belongs to (None: not a V2G one)."""
    for version in V2G_VERSIONS.values():
        if role_or_profile in (*version.roles, version.secc):
            return version
    return None


def key_types_in_use() -> tuple[str, ...]:
    """Every key type some profile allows (``ec-p521`` too, which only the ISO 15118-20 profiles name), in
    ``KEY_SPECS`` order: what the token must generate and sign with."""
    allowed = {key_type for profile in PROFILES.values() for key_type in profile.key_types}
    return tuple(key_type for key_type in KEY_SPECS if key_type in allowed)


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InputError(f"unknown profile {name!r} (known: {', '.join(PROFILES)})") from None


def ca_profile(role: str) -> Profile | None:
    """The profile of a CA role's own certificate (None for a role this version does not know)."""
    name = CA_ROLE_PROFILES.get(role)
    return None if name is None else PROFILES[name]


def check_issuer_role(profile: Profile, role: str, ca_name: str) -> None:
    """Refuse to issue ``profile`` under a CA of the wrong kind (a SECC leaf from the OCPP issuing CA…)."""
    if role not in profile.issuer_roles and profile.name != "ocsp-signer":
        raise PolicyError(
            f"profile {profile.name} is issued by a {' or '.join(profile.issuer_roles)} CA, "
            f"not by {ca_name} (a {role} CA)"
        )
