"""SECC certificates under a CPO Sub-CA 2, ISO 15118-2 (``v2g-secc``) or ISO 15118-20 (``v2g20-secc``):
two routes of the enrollment pipeline per version.

``issue_secc`` is what the CSMS API (``SignCertificate`` with ``certificateType=V2GCertificate``),
the CLI and any later interface naming the ISO version (OCPP 2.1 ``V2G20Certificate``, an
OPCP-style ``/cpo/simpleenroll/ISO15118-20`` route) call: the interface has authenticated the
requester and names the charging station and the version (``iso="15118-2"`` or ``"15118-20"``);
``enroll_secc`` is what EST calls under a V2G label, authenticating the caller by its TLS client
certificate; the label's Sub-CA 2 decides the version. Both are ``Policy`` values (``secc_policies``)
run by ``ca.enrollment.pipeline.run`` with the version's SECC subject rule
(``ca.enrollment.subjects.SECC_RULES``): every check runs before the token signs, every refusal is
rolled back and audited (``v2g.refused``) with its reason and code, and failed authentications are
counted and locked out as on the charger routes.

A station holds one leaf per version (TLS 1.2 with the -2 leaf, TLS 1.3 with the -20 one), each
with its own key: each version's profile allows only its curve (P-256, P-521), and the key's owner
is the SECC ID per version (``issuance.key_identity``), so one key never serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from ca.authorities.v2g import current_sub_ca_2
from ca.enrollment.authenticators import Relay, by_secc_client_certificate
from ca.enrollment.pipeline import run
from ca.enrollment.policy import DEFAULTS, Attempt, Credentials, EnrollmentSettings, Policy
from ca.enrollment.subjects import SECC_RULES
from ca.issuance.profiles import ISO15118_2, ISO15118_20, V2G_VERSIONS, v2g_version
from ca.store.models import Authority, Certificate
from ca.work import Work

REFUSED = "v2g.refused"


@dataclass(frozen=True)
class SeccPolicies:
    """The two SECC routes of one ISO 15118 version."""

    relayed: Policy  # an interface authenticated the requester (CSMS API, CLI): ``issue_secc``
    est: Policy  # EST under a V2G label, by TLS client certificate: ``enroll_secc``


def _policies(iso: str) -> SeccPolicies:
    rule = SECC_RULES[iso]
    suffix = "" if iso == ISO15118_2 else "-20"
    return SeccPolicies(
        Policy(f"secc{suffix}", REFUSED, Relay(names_subject=False), rule),
        Policy(f"secc{suffix}-est", REFUSED, by_secc_client_certificate, rule, channel_binding=True),
    )


SECC_POLICIES = {iso: _policies(iso) for iso in V2G_VERSIONS}
SECC_RELAYED = SECC_POLICIES[ISO15118_2].relayed
SECC_EST = SECC_POLICIES[ISO15118_2].est
SECC20_RELAYED = SECC_POLICIES[ISO15118_20].relayed
SECC20_EST = SECC_POLICIES[ISO15118_20].est


def secc_policies(iso: str = ISO15118_2) -> SeccPolicies:
    """The SECC routes of ISO 15118 version ``iso`` ("15118-2", "15118-20"); ``InputError`` for another."""
    return SECC_POLICIES[v2g_version(iso).iso]


def issue_secc(
    work: Work,
    *,
    environment: str | None,
    csr: bytes,
    secc_id: str | None = None,
    device_serial: str | None = None,
    validity: timedelta | None = None,
    settings: EnrollmentSettings = DEFAULTS,
    max_chain_chars: int | None = None,
    before_commit: Callable[[Session, Certificate], None] | None = None,
    address: str | None = None,
    iso: str = ISO15118_2,
    root: Authority | None = None,
) -> Certificate:
    """Issue an SECC certificate for ``secc_id`` (None: the CSR's CN) under ``environment``'s CPO Sub-CA 2
    of ISO 15118 version ``iso``: ``"15118-2"`` (profile ``v2g-secc``, P-256 keys; the default) or
    ``"15118-20"`` (profile ``v2g20-secc``, P-521 keys, signed with ECDSA-SHA512).

    The interface has authenticated the requester (``work.actor``, from ``address``);
    ``device_serial`` (the charging station the request came from, when known) must be registered,
    enabled and of this environment, and an SECC ID already certified for another station (in
    either version) is refused. The CSR's CN must be ``secc_id``, its key of the version's curve
    (``key_not_allowed``) and never certified for anything else, the other version included
    (``key_reuse``). Returns the committed row (``row.der``); an older certificate of the same SECC
    ID and version is superseded (revoked now, or after ``settings.supersede_grace``); the other
    version's stays. ``max_chain_chars``: OCPP's chain limit, when the certificate goes out through
    OCPP. Refusals are ``ChargepkiError``s with a ``code``, audited as ``v2g.refused``; a missing
    hierarchy of that version is a ``NotFoundError``, an unknown ``iso`` an ``InputError``. ``root``: the
    V2G root of that version the leaf must chain to (OCPP 2.1's ``hashRootCertificate``, resolved and
    checked by the caller); by default the environment's newest Sub-CA 2 of the version signs.
    """
    policies = secc_policies(iso)
    authority = current_sub_ca_2(work.session, environment, iso, root=root)
    attempt = Attempt(
        authority,
        csr,
        Credentials(principal=work.actor, address=address),
        settings,
        station=device_serial,
        secc_id=secc_id,
        validity=validity,
        max_chain_chars=max_chain_chars,
        before_commit=before_commit,
    )
    return run(work, policies.relayed, attempt)


def enroll_secc(
    work: Work,
    *,
    authority: Authority,
    csr: bytes,
    credentials: Credentials,
    settings: EnrollmentSettings = DEFAULTS,
) -> Certificate:
    """EST under a V2G label (``authority``: a CPO Sub-CA 2 of either version, which decides the
    leaf's profile): the TLS client certificate is a registration authority's (the CSMS, any SECC
    ID), the charging station's current charger certificate (an SECC ID not held by another
    station), or an SECC certificate of the SECC ID being renewed (the same SECC ID)."""
    return run(work, _policies_of(authority).est, Attempt(authority, csr, credentials, settings))


def _policies_of(authority: Authority) -> SeccPolicies:
    """The routes of the version whose Sub-CA 2 ``authority`` is (another CA: the -2 routes, whose
    subject rule refuses it inside the pipeline, audited)."""
    for iso, version in V2G_VERSIONS.items():
        if authority.role == version.sub_ca_2:
            return SECC_POLICIES[iso]
    return SECC_POLICIES[ISO15118_2]
