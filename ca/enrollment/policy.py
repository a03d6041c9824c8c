"""The enrollment pipeline's vocabulary: what a request carries, what authentication establishes,
and a route as data (``Policy``: an authenticator, a subject rule, a few switches).

The pipeline (``ca.enrollment.pipeline.run``) is one function; a route is a ``Policy`` value:

    authenticate (``Authenticator``)  →  subject policy per profile (``SubjectRule``)  →  ``issue()``

wrapped once for lockouts, refusal audit and codes. Authenticators live in
``ca.enrollment.authenticators`` (one-time secret, RA, current certificate, a CSMS or operator
relaying the request, SECC client certificate); subject rules in ``ca.enrollment.subjects``
(charger, SECC). A new way to authenticate (e.g. a manufacturer's device certificate) is one
more authenticator returning ``Authenticated``; a new leaf kind one more ``SubjectRule``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from sqlalchemy.orm import Session

from ca.enrollment.auth_limits import AuthLimits
from ca.errors import PolicyError
from ca.issuance.csr import CsrRequest
from ca.store.models import Authority, Certificate, Device
from ca.work import Work


@dataclass(frozen=True)
class Credentials:
    """What the transport established about the caller."""

    username: str | None = None
    password: str | None = None
    client_certificate: bytes | None = None  # DER, verified by TLS or by a trusted proxy
    address: str | None = None
    tls_unique: bytes | None = None  # TLS 1.2 channel binding, when available
    principal: str | None = None  # who the interface authenticated, when it is not one of the above (csms:NAME)


@dataclass(frozen=True)
class EnrollmentSettings:
    supersede_grace: timedelta = timedelta(0)
    require_tls_unique: bool = False
    limits: AuthLimits = field(default_factory=AuthLimits)


DEFAULTS = EnrollmentSettings()


@dataclass(frozen=True)
class Attempt:
    """One request to the pipeline: the domain arguments of every route, in one value.

    ``station``: the charging station a relaying CSMS or an operator names (its registered
    device). ``secc_id``: the SECC ID an operator asks for (None: the CSR's CN).
    ``max_chain_chars``: OCPP's chain limit, checked on the signed bytes (relayed routes).
    ``before_commit`` runs last in the issuing transaction (a job marks itself done there).
    """

    authority: Authority
    csr: bytes
    credentials: Credentials
    settings: EnrollmentSettings = DEFAULTS
    station: str | None = None
    secc_id: str | None = None
    validity: timedelta | None = None
    max_chain_chars: int | None = None
    before_commit: Callable[[Session, Certificate], None] | None = None


@dataclass(frozen=True)
class Authenticated:
    """What the credentials proved: the method, the device they name (if any), the CN they fix
    (if any) and a one-time secret to spend with the serial reservation (if any)."""

    method: str  # secret | ra | certificate | relay | secc-client
    device: Device | None = None
    expected_cn: str | None = None
    mismatch: str = ""  # how a CSR's other CN is refused: "the CSR's CN 'X' <mismatch>"
    secret: tuple[str, str] | None = None  # (serial, secret): spent in the reservation's transaction
    repeated: int | None = None  # a retried request: the id of the certificate its spent secret produced

    def expect(self, common_name: str) -> None:
        """Refuse (``cn_mismatch``) a CSR whose CN is not the one these credentials allow."""
        if self.expected_cn is not None and common_name != self.expected_cn:
            raise PolicyError(f"the CSR's CN {common_name!r} {self.mismatch}", code="cn_mismatch")


class Authenticator(Protocol):
    """Who is asking: an ``AuthenticationError`` refuses (counted towards a lockout)."""

    def __call__(self, work: Work, attempt: Attempt, csr: CsrRequest) -> Authenticated: ...


class SubjectRule(Protocol):
    """A leaf profile's subject policy: what its CN must be, for which device, and what a new
    certificate supersedes."""

    profile: str

    def check(self, work: Work, attempt: Attempt, csr: CsrRequest, who: Authenticated) -> Device | None:
        """Every subject check before signing; returns the device the certificate is for."""
        ...

    def supersede(self, work: Work, attempt: Attempt, device: Device | None, new: Certificate) -> None:
        """In the issuing transaction: what the new certificate replaces."""
        ...


@dataclass(frozen=True)
class Policy:
    """One enrollment route, as data."""

    name: str
    refused: str  # the audit action of a refusal
    authenticate: Authenticator
    subject: SubjectRule
    first_enrollment: bool = False  # refuse a device that holds a current certificate (EST simpleenroll)
    channel_binding: bool = False  # RFC 7030 §3.5 tls-unique in challengePassword (EST)
