"""Creating an environment's CA hierarchy: root → issuing CA (pathLen 0), each with a delegated OCSP signer.

All four keys (two CAs, two OCSP signers) are generated inside the token by ``factory.create``.
Each environment (production, staging, factory-test) gets its own hierarchy, whose names carry
the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ca.authorities.factory import CaPlan, Created, Plan, create
from ca.authorities.issuers import any_ca
from ca.config import DEFAULT_OCSP_URL, DEFAULT_REPOSITORY_URL
from ca.errors import ConflictError, PolicyError
from ca.issuance.names import ca_common_name, check_country, check_environment, check_organization, subject_name
from ca.keys.keyspec import key_spec
from ca.store.models import Authority, Certificate
from ca.work import Work

OCPP_ROLES = ("root", "issuing")  # the V2G and manufacturer hierarchies live beside it (ca/v2g.py, ca/manufacturer.py)


@dataclass(frozen=True)
class HierarchyRequest:
    organization: str
    environment: str = "production"
    country: str | None = None
    key_type: str = "ec-p256"
    rsa_padding: str = "pkcs1"  # pkcs1 | pss (RSA keys only)
    ocsp_url: str = DEFAULT_OCSP_URL  # the CLI passes the home's saved URLs
    repository_url: str = DEFAULT_REPOSITORY_URL
    root_validity: timedelta | None = None
    issuing_validity: timedelta | None = None


@dataclass(frozen=True)
class Hierarchy:
    root: Authority
    issuing: Authority
    ocsp_signer: Certificate  # the issuing CA's
    root_ocsp_signer: Certificate  # answers for the issuing CA's own certificate


def init_hierarchy(work: Work, *, request: HierarchyRequest) -> Hierarchy:
    """Create root, issuing CA and their OCSP signers for one environment; refuse if it exists already."""
    plan = _plan(request)
    existing = any_ca(work.session, plan.environment, OCPP_ROLES)
    if existing is not None:
        raise ConflictError(
            f"environment {plan.environment!r} is already initialised (CA {existing}); init runs once per environment"
        )
    created = create(work, plan=plan)
    signers = created.ocsp_signers
    return Hierarchy(created["root"], created["issuing"], signers["issuing"], signers["root"])


def _plan(request: HierarchyRequest) -> Plan:
    environment = check_environment(request.environment)
    organization = check_organization(request.organization)
    country = check_country(request.country)
    spec = key_spec(request.key_type)
    if request.rsa_padding not in ("pkcs1", "pss"):
        raise PolicyError(f"unknown RSA padding {request.rsa_padding!r} (pkcs1 or pss)")
    padding = request.rsa_padding if spec.algorithm == "rsa" else None

    def ca(role: str, title: str, parent: str | None, validity: timedelta | None) -> CaPlan:
        subject = subject_name(ca_common_name(organization, environment, title), organization, country)
        name = f"{environment}-{role}-1"
        return CaPlan(role, name, subject, parent, validity, key_type=spec.name, rsa_padding=padding)

    return Plan(
        environment=environment,
        organization=organization,
        country=country,
        ocsp_url=request.ocsp_url,
        repository_url=request.repository_url,
        cas=(
            ca("root", "Root CA", None, request.root_validity),
            ca("issuing", "Issuing CA 1", "root", request.issuing_validity),
        ),
        action="hierarchy.created",
        audit_subject=environment,
        details=_details,
        conflict=f"environment {environment!r} was initialised concurrently",
    )


def _details(created: Created) -> dict[str, object]:
    root, issuing = created["root"], created["issuing"]
    return {
        "root": root.name,
        "issuing": issuing.name,
        "organization": root.organization,
        "key_type": root.key_type,
        "root_key_label": root.key_label,
        "issuing_key_label": issuing.key_label,
    }
