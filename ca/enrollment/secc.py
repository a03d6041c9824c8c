"""SECC certificates (profile ``v2g-secc``) under a CPO Sub-CA 2: two routes of the enrollment pipeline.

``issue_secc`` is what the CSMS API (``SignCertificate`` with ``certificateType=V2GCertificate``)
and the CLI call: the interface has authenticated the requester and names the charging station;
``enroll_secc`` is what EST calls under a V2G label, authenticating the caller by its TLS client
certificate. Both are ``Policy`` values run by ``ca.enrollment.pipeline.run`` with the SECC
subject rule (``ca.enrollment.subjects.SECC``): every check runs before the token signs, every
refusal is rolled back and audited (``v2g.refused``) with its reason and code, and failed
authentications are counted and locked out as on the charger routes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session

from ca.authorities.v2g import current_sub_ca_2
from ca.enrollment.authenticators import Relay, by_secc_client_certificate
from ca.enrollment.pipeline import run
from ca.enrollment.policy import DEFAULTS, Attempt, Credentials, EnrollmentSettings, Policy
from ca.enrollment.subjects import SECC
from ca.store.models import Authority, Certificate
from ca.work import Work

REFUSED = "v2g.refused"
SECC_RELAYED = Policy("secc", REFUSED, Relay(names_subject=False), SECC)
SECC_EST = Policy("secc-est", REFUSED, by_secc_client_certificate, SECC, channel_binding=True)


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
) -> Certificate:
    """Issue a ``v2g-secc`` certificate for ``secc_id`` (None: the CSR's CN) under ``environment``'s CPO Sub-CA 2.

    The interface has authenticated the requester (``work.actor``, from ``address``);
    ``device_serial`` (the charging station the request came from, when known) must be registered,
    enabled and of this environment, and an SECC ID already certified for another station is
    refused. The CSR's CN must be ``secc_id``. Returns the committed row (``row.der``); an older
    certificate of the same SECC ID is superseded (revoked now, or after ``settings.supersede_grace``).
    ``max_chain_chars``: OCPP's chain limit, when the certificate goes out through OCPP.
    """
    authority = current_sub_ca_2(work.session, environment)
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
    return run(work, SECC_RELAYED, attempt)


def enroll_secc(
    work: Work,
    *,
    authority: Authority,
    csr: bytes,
    credentials: Credentials,
    settings: EnrollmentSettings = DEFAULTS,
) -> Certificate:
    """EST under a V2G label: the TLS client certificate is a registration authority's (the CSMS,
    any SECC ID), the charging station's current charger certificate (an SECC ID not held by
    another station), or the SECC certificate being renewed (the same SECC ID)."""
    return run(work, SECC_EST, Attempt(authority, csr, credentials, settings))
