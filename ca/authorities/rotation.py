"""Rotating CA keys without stranding a charger.

- ``rotate_issuing_ca`` (``chargepki ca rotate``): a new issuing CA under the current root.
- ``rollover_root`` (``chargepki ca rollover-root``): a new root, the two link certificates
  (NewWithOld, OldWithNew; RFC 4210 §4.4 names) and a new issuing CA under the new root, in one
  transaction; ``rollover_files`` turns it into what the CSMS pushes to chargers (OCPP 2.0.1
  InstallCertificate with ``AdditionalRootCertificateCheck``).
- ``retire_finished``: a superseded CA keeps signing its CRL and OCSP responses until nothing it
  issued is still valid, then the OCSP refresher or the CRL publisher retires it.

A superseded CA stays ``active`` until then; new certificates come from the newest issuing CA
of the environment (``authorities.default_issuing_ca``), which is what makes a rotation take
effect "at once" for every issuance path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.factory import CaPlan, Created, LinkPlan, Plan, create
from ca.authorities.issuers import (
    chain,
    default_issuing_ca,
    get_authority,
    newest_active,
    public_key_sha256,
)
from ca.clock import Clock, utcnow
from ca.errors import ConflictError, InputError, NotFoundError, PolicyError
from ca.issuance.names import ca_common_name, subject_name
from ca.keys.keyspec import key_spec
from ca.kinds import CaRole, CaStatus, CertStatus
from ca.ocpp_limits import INSTALL_CERTIFICATE_CHARS, INSTALL_CERTIFICATE_CHARS_21
from ca.store.models import Authority, Certificate
from ca.work import Work

ROTATABLE_ROLES = ("root", "issuing")  # the charger PKI; other hierarchies have their own lifecycles
# A superseded CA retires no sooner than this after its successor appeared: EST workers keep a
# label's CA for a few seconds (web/est.py AUTHORITY_TTL), so the old one may still issue meanwhile.
RETIRE_GRACE = timedelta(hours=1)
# Certificates a CA signs for its own operation: they do not keep it alive.
_OWN_PROFILES = ("ocsp-signer", "root")
OCPP_CERTIFICATE_MAX = INSTALL_CERTIFICATE_CHARS  # InstallCertificateRequest.certificate is string[0..5500] in 2.0.1
OCPP_201, OCPP_21 = "2.0.1", "2.1"
# InstallCertificateUseEnumType per OCPP version (2.1 adds OEMRootCertificate).
INSTALL_CERTIFICATE_TYPES = {
    OCPP_201: ("V2GRootCertificate", "MORootCertificate", "CSMSRootCertificate", "ManufacturerRootCertificate"),
    OCPP_21: (
        "V2GRootCertificate",
        "MORootCertificate",
        "ManufacturerRootCertificate",
        "CSMSRootCertificate",
        "OEMRootCertificate",
    ),
}


# -- finding the current CAs ------------------------------------------------------------------------
def current_root(session: Session, environment: str) -> Authority:
    """The environment's newest active root: new issuing CAs go under it."""
    root = newest_active(session, "root", environment)
    if root is None:
        raise NotFoundError(f"no active root CA in environment {environment!r}")
    return root


def successor(session: Session, authority: Authority) -> Authority | None:
    """The newest active CA of the same role and environment created after ``authority``, if any."""
    return newest_active(session, authority.role, authority.environment, after=authority)


def check_can_issue(session: Session, authority: Authority) -> None:
    """Refuse new certificates from a retired or superseded CA (it only answers for what it issued)."""
    if authority.status != CaStatus.ACTIVE:
        raise PolicyError(f"CA {authority.name} is {authority.status}: it issues nothing any more")
    newer = successor(session, authority) if authority.role in ROTATABLE_ROLES else None
    if newer is not None:
        raise PolicyError(
            f"CA {authority.name} was rotated: new certificates come from {newer.name} "
            f"(omit --ca, or use --ca {newer.name})"
        )


def last_expiry(session: Session, authority: Authority) -> datetime | None:
    """When the last certificate ``authority`` issued (other than its own OCSP signers) expires."""
    return session.scalar(
        select(func.max(Certificate.not_after)).where(
            Certificate.authority_id == authority.id,
            Certificate.status.in_(("valid", "revoked", "pending")),
            Certificate.profile.not_in(_OWN_PROFILES),
        )
    )


def _next_name(session: Session, environment: str, role: str) -> tuple[str, int]:
    """``<environment>-<role>-<n+1>``, n the highest number any CA of that role ever had here."""
    pattern = re.compile(rf"{re.escape(environment)}-{role}-(\d+)")
    names = session.scalars(select(Authority.name).where(Authority.environment == environment))
    numbers = [int(match.group(1)) for name in names if (match := pattern.fullmatch(name))]
    number = max(numbers, default=0) + 1
    return f"{environment}-{role}-{number}", number


def _resolve(session: Session, ca_name: str | None, environment: str | None) -> Authority:
    """The issuing CA a command acts on: ``--ca`` or the environment's newest one."""
    if ca_name is None:
        return default_issuing_ca(session, environment)
    authority = get_authority(session, ca_name)
    if environment is not None and authority.environment != environment:
        raise InputError(f"CA {authority.name} belongs to environment {authority.environment}, not {environment}")
    if authority.role != CaRole.ISSUING:
        raise InputError(f"CA {authority.name} is a {authority.role} CA; `ca rotate` rotates issuing CAs")
    return authority


def _issuing_plan(
    session: Session,
    *,
    parent: str | Authority,
    environment: str,
    organization: str,
    country: str | None,
    key_type: str,
    rsa_padding: str | None,
    validity: timedelta | None,
) -> CaPlan:
    """The next issuing CA of ``environment`` under ``parent`` (a stored root, or the plan's new root's role)."""
    name, number = _next_name(session, environment, "issuing")
    title = ca_common_name(organization, environment, f"Issuing CA {number}")
    return CaPlan(
        "issuing",
        name,
        subject_name(title, organization, country),
        parent=parent,
        validity=validity,
        key_type=key_type,
        rsa_padding=rsa_padding,
    )


def _raced(what: str) -> str:
    return f"{what} raced with another change (a CA of the same name); nothing was created, run it again"


def _rotated(created: Created, *, previous: str) -> dict[str, object]:
    new = created["issuing"]
    return {
        "environment": new.environment,
        "previous": previous,
        "root": new.parent.name if new.parent is not None else None,
        "key_label": new.key_label,
        "not_after": new.not_after.isoformat(),
    }


# -- rotating an issuing CA -------------------------------------------------------------------------
@dataclass(frozen=True)
class Rotation:
    previous: Authority
    issuing: Authority
    ocsp_signer: Certificate


def rotate_issuing_ca(
    work: Work, *, ca_name: str | None = None, environment: str | None = None, validity: timedelta | None = None
) -> Rotation:
    """A new issuing CA under the environment's current root, with its own OCSP signer.

    The previous CA is left active: it answers for its certificates until they expire. A revoked
    one (the newest of its lineage) may be rotated too: that is how a compromised CA is replaced.
    """
    session = work.session
    previous = _rotatable(session, ca_name, environment)
    root = current_root(session, previous.environment)
    issuing = _issuing_plan(
        session,
        parent=root,
        environment=previous.environment,
        organization=root.organization,
        country=root.country,
        key_type=root.key_type,  # a CA's key is of its parent's type
        rsa_padding=root.rsa_padding,
        validity=validity,
    )
    plan = Plan(
        environment=previous.environment,
        organization=root.organization,
        country=root.country,
        ocsp_url=previous.ocsp_url,  # what the new CA signs points where its predecessor's certificates do
        repository_url=previous.repository_url,
        cas=(issuing,),
        action="ca.rotated",
        audit_subject=issuing.name,
        details=partial(_rotated, previous=previous.name),
        conflict=_raced("the rotation"),
    )
    created = create(work, plan=plan)
    return Rotation(previous, created["issuing"], created.ocsp_signers["issuing"])


def _rotatable(session: Session, ca_name: str | None, environment: str | None) -> Authority:
    """The issuing CA to rotate: the newest of its lineage, active or revoked (`revoke --rotate`)."""
    previous = _resolve(session, ca_name, environment)
    if previous.status not in ("active", "revoked"):
        raise PolicyError(
            f"CA {previous.name} is retired; rotate {default_issuing_ca(session, previous.environment).name}"
        )
    newest = successor(session, previous)
    if newest is not None:
        raise ConflictError(
            f"CA {previous.name} was already rotated: {newest.name} is the newest issuing CA of "
            f"{previous.environment} (rotate that one)"
        )
    return previous


# -- root rollover --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rollover:
    old_root: Authority
    new_root: Authority
    issuing: Authority  # the first issuing CA under the new root
    new_with_old: Certificate  # the new root's name and key, signed by the old root
    old_with_new: Certificate  # the old root's name and key, signed by the new root


def rollover_root(
    work: Work,
    *,
    environment: str | None = None,
    key_type: str | None = None,
    root_validity: timedelta | None = None,
    issuing_validity: timedelta | None = None,
) -> Rollover:
    """New root (key in the token), NewWithOld and OldWithNew link certificates and a new issuing CA,
    recorded in one transaction; then the new CAs' OCSP signers.

    The old root stays active: it answers for its issuing CAs and the NewWithOld link until they expire.
    """
    session = work.session
    template = default_issuing_ca(session, environment)  # organisation, country, URLs, key type
    environment = template.environment
    old_root = current_root(session, environment)
    plan = _rollover_plan(session, template, old_root, key_type, root_validity, issuing_validity)
    created = create(work, plan=plan)
    new_with_old, old_with_new = created.links
    return Rollover(old_root, created["root"], created["issuing"], new_with_old, old_with_new)


def _rollover_plan(
    session: Session,
    template: Authority,
    old_root: Authority,
    key_type: str | None,
    root_validity: timedelta | None,
    issuing_validity: timedelta | None,
) -> Plan:
    """New root and issuing CA with ``template``'s URLs (and key type, unless ``key_type``), the old
    root's names; the link certificates both ways."""
    environment, organization, country = old_root.environment, old_root.organization, old_root.country
    spec = key_spec(key_type or template.key_type)
    padding = (template.rsa_padding or "pkcs1") if spec.algorithm == "rsa" else None
    name, number = _next_name(session, environment, "root")
    title = ca_common_name(organization, environment, f"Root CA {number}")
    root = CaPlan("root", name, subject_name(title, organization, country), None, root_validity, spec.name, padding)
    issuing = _issuing_plan(
        session,
        parent="root",
        environment=environment,
        organization=organization,
        country=country,
        key_type=spec.name,
        rsa_padding=padding,
        validity=issuing_validity,
    )
    return Plan(
        environment=environment,
        organization=organization,
        country=country,
        ocsp_url=template.ocsp_url,
        repository_url=template.repository_url,
        cas=(root, issuing),
        links=(LinkPlan(issuer=old_root, certifies="root"), LinkPlan(issuer="root", certifies=old_root)),
        action="ca.root_rolled_over",
        audit_subject=name,
        details=_rolled_over,
        conflict=_raced("the root rollover"),
    )


def _rolled_over(created: Created) -> dict[str, object]:
    new_with_old, old_with_new = created.links
    root, issuing = created["root"], created["issuing"]
    return {
        "environment": root.environment,
        "old_root": new_with_old.authority.name,
        "issuing": issuing.name,
        "new_with_old": new_with_old.serial,
        "old_with_new": old_with_new.serial,
        "key_type": root.key_type,
        "root_key_label": root.key_label,
        "issuing_key_label": issuing.key_label,
    }


def latest_rollover(session: Session, environment: str | None) -> Rollover:
    """The environment's most recent root rollover, read back from the store (to write its files again)."""
    environment = default_issuing_ca(session, environment).environment
    new_root = current_root(session, environment)
    new_key = public_key_sha256(x509.load_der_x509_certificate(new_root.certificate_der).public_key())
    new_with_old = session.scalar(
        select(Certificate)
        .join(Authority, Authority.id == Certificate.authority_id)
        .where(
            Certificate.profile == "root-link",
            Certificate.public_key_sha256 == new_key,
            Authority.environment == environment,
            Authority.id != new_root.id,
        )
        .order_by(Certificate.id.desc())
        .limit(1)
    )
    if new_with_old is None:
        raise NotFoundError(f"environment {environment!r} has had no root rollover (run `chargepki ca rollover-root`)")
    old_root = new_with_old.authority
    old_key = public_key_sha256(x509.load_der_x509_certificate(old_root.certificate_der).public_key())
    old_with_new = session.scalar(
        select(Certificate)
        .where(
            Certificate.profile == "root-link",
            Certificate.authority_id == new_root.id,
            Certificate.public_key_sha256 == old_key,
        )
        .order_by(Certificate.id.desc())
        .limit(1)
    )
    issuing = session.scalar(
        select(Authority)
        .where(Authority.parent_id == new_root.id, Authority.role == CaRole.ISSUING)
        .order_by(Authority.id)
    )
    if old_with_new is None or issuing is None:
        raise NotFoundError(f"the rollover to {new_root.name} is incomplete in the store")
    return Rollover(old_root, new_root, issuing, new_with_old, old_with_new)


def _pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def install_certificate(
    certificate_der: bytes, certificate_type: str = "CSMSRootCertificate", *, ocpp: str = OCPP_201
) -> dict[str, str]:
    """An OCPP InstallCertificateRequest payload (``ocpp``: "2.0.1", the default, or "2.1"): a CSMS root
    unless ``certificate_type`` says otherwise; ``OEMRootCertificate`` exists in OCPP 2.1 only."""
    if ocpp not in INSTALL_CERTIFICATE_TYPES:
        raise InputError(f"unknown OCPP version {ocpp!r} (known: {', '.join(INSTALL_CERTIFICATE_TYPES)})")
    if certificate_type not in INSTALL_CERTIFICATE_TYPES[ocpp]:
        raise InputError(
            f"OCPP {ocpp} InstallCertificate knows no certificateType {certificate_type!r} "
            f"(known: {', '.join(INSTALL_CERTIFICATE_TYPES[ocpp])})"
        )
    pem = _pem(certificate_der)
    limit = OCPP_CERTIFICATE_MAX if ocpp == OCPP_201 else INSTALL_CERTIFICATE_CHARS_21
    if len(pem) > limit:
        raise PolicyError(f"the certificate's PEM has {len(pem)} characters; OCPP {ocpp} allows {limit}")
    return {"certificateType": certificate_type, "certificate": pem}


@dataclass(frozen=True)
class Installable:
    """One root a charging station of the environment should hold, and how InstallCertificate names it."""

    certificate_type: str  # InstallCertificateUseEnumType
    authority: Authority
    payload: dict[str, str]  # the InstallCertificateRequest


# Which roots a station installs under which InstallCertificateUseEnumType, in the bundle's order.
# (MORootCertificate, a mobility operator's root, is not this CA's to hand out.)
_INSTALLED_ROLES = (
    ("CSMSRootCertificate", (CaRole.ROOT,)),
    ("V2GRootCertificate", (CaRole.V2G_ROOT, CaRole.V2G20_ROOT)),
    ("ManufacturerRootCertificate", (CaRole.MANUFACTURER,)),
    ("OEMRootCertificate", (CaRole.OEM_ROOT,)),
)


def install_certificates(
    session: Session, environment: str | None, *, ocpp: str = OCPP_21, now: Clock = utcnow
) -> list[Installable]:
    """The environment's trust bundle for charging stations as InstallCertificate payloads: its
    unexpired OCPP roots still in service (``CSMSRootCertificate``: the root that certifies the CSMS's
    TLS server; both during a root rollover, newest first), its ISO 15118-2 and -20 V2G roots (own
    or external; ``V2GRootCertificate``), its manufacturer root (``ManufacturerRootCertificate``)
    and, for OCPP 2.1, the OEM roots an operator imported (``OEMRootCertificate``)."""
    if ocpp not in INSTALL_CERTIFICATE_TYPES:
        raise InputError(f"unknown OCPP version {ocpp!r} (known: {', '.join(INSTALL_CERTIFICATE_TYPES)})")
    if environment is None:
        environment = default_issuing_ca(session, None).environment
    moment = now()
    bundle = []
    for certificate_type, roles in _INSTALLED_ROLES:
        if certificate_type not in INSTALL_CERTIFICATE_TYPES[ocpp]:
            continue
        roots = session.scalars(
            select(Authority)
            .where(
                Authority.environment == environment,
                Authority.role.in_(roles),
                Authority.parent_id.is_(None),
                Authority.status.in_((CaStatus.ACTIVE, CaStatus.EXTERNAL)),
                Authority.not_after > moment,
            )
            .order_by(Authority.id.desc() if certificate_type == "CSMSRootCertificate" else Authority.id)
        )
        for root in roots:
            payload = install_certificate(root.certificate_der, certificate_type, ocpp=ocpp)
            bundle.append(Installable(certificate_type, root, payload))
    return bundle


def rollover_files(session: Session, rollover: Rollover) -> dict[str, bytes]:
    """Everything the CSMS operator needs after a rollover, by file name (the numbered files in order)."""
    old_root, new_root = rollover.old_root, rollover.new_root
    link, reverse = rollover.new_with_old.der or b"", rollover.old_with_new.der or b""
    new_chain = [member.certificate_der for member in chain(session, rollover.issuing)]

    def payload(der: bytes) -> bytes:
        return (json.dumps(install_certificate(der), indent=2) + "\n").encode()

    files = {
        "01-InstallCertificate-link.json": payload(link),
        "02-InstallCertificate-new-root.json": payload(new_root.certificate_der),
        "new-with-old.pem": _pem(link).encode(),
        "old-with-new.pem": _pem(reverse).encode(),
        "new-root.pem": _pem(new_root.certificate_der).encode(),
        "old-root.pem": _pem(old_root.certificate_der).encode(),
        "new-issuing-chain.pem": "".join(_pem(der) for der in new_chain).encode(),
        "csms-trusted-roots.pem": (_pem(old_root.certificate_der) + _pem(new_root.certificate_der)).encode(),
        "install-certificates.json": (
            json.dumps([entry.payload for entry in install_certificates(session, new_root.environment)], indent=2)
            + "\n"
        ).encode(),
    }
    files["README.txt"] = _ORDER.format(
        environment=new_root.environment,
        old=old_root.name,
        new=new_root.name,
        issuing=rollover.issuing.name,
        link_until=f"{rollover.new_with_old.not_after:%Y-%m-%d}",
    ).encode()
    return files


_ORDER = """\
Root rollover in environment {environment}: {old} -> {new} (new issuing CA {issuing})

Push to every charging station, in this order (OCPP 2.0.1 InstallCertificate; each JSON file
is the request payload as it is):

0. Before anything: the CSMS trusts both roots for charger client certificates
   (csms-trusted-roots.pem), because re-enrolled chargers get certificates from {issuing}.

1. 01-InstallCertificate-link.json: the new root's name and key, signed by the old root
   ("NewWithOld"). A station with AdditionalRootCertificateCheck accepts it because the old root
   signed it; it installs it as its CSMS root and keeps the old root as a fallback.

2. Switch the CSMS's TLS server certificate to one from {issuing}
   (`chargepki issue --profile csms-server`; serve it with new-issuing-chain.pem minus the
   root, and add new-with-old.pem to the chain for stations that missed step 1).
   A station that installed step 1 verifies it; once it has connected, it drops the fallback.

3. 02-InstallCertificate-new-root.json: the self-signed new root. Stations with
   AdditionalRootCertificateCheck accept it because it is signed by the key they trust since
   step 1; it replaces the link certificate, which expires on {link_until} with the old root.

4. Move the stations' own certificates onto {issuing}:
   `chargepki campaign start --from-ca <old issuing CA>`, then `chargepki campaign status`.

install-certificates.json lists, as OCPP 2.1 InstallCertificate payloads, every root a station of
{environment} should hold now: both CSMS roots (CSMSRootCertificate), the ISO 15118-2 and -20 V2G
roots (V2GRootCertificate), the manufacturer root (ManufacturerRootCertificate) and the OEM roots
imported with `chargepki csms oem-root add` (OEMRootCertificate; OCPP 2.1 stations only). Push the
ones a station lacks (GetInstalledCertificateIds tells); the numbered files above come first.

old-with-new.pem (the old root's key, signed by the new root) lets a relying party that trusts
only the new root verify certificates still issued under the old root: add it to chains served
to stations installed with the new root only. {old} keeps signing its CRL and OCSP responses
until its last certificate expires, then retires by itself.
"""


# -- trust bundles --------------------------------------------------------------------------------
def environment_certificates(session: Session, environment: str | None, now: Clock = utcnow) -> list[bytes]:
    """Every certificate a relying party of the environment may need while CAs rotate (DER):
    the newest issuing CA and its root first, then the other active issuing CAs and roots, then
    the unexpired link certificates between the roots (RFC 7030 §4.1.3: OldWithOld, OldWithNew,
    NewWithOld). EST ``cacerts`` and ``ca chain --all`` serve this.
    """
    newest = default_issuing_ca(session, environment)
    ordered: list[Authority] = []
    active = session.scalars(
        select(Authority)
        .where(
            Authority.environment == newest.environment,
            Authority.role.in_(ROTATABLE_ROLES),
            Authority.status == CaStatus.ACTIVE,
        )
        .order_by(Authority.id.desc())
    ).all()
    for authority in [
        newest,
        *(a for a in active if a.role == CaRole.ISSUING),
        *(a for a in active if a.role == CaRole.ROOT),
    ]:
        for member in chain(session, authority):
            if member not in ordered:
                ordered.append(member)
    links = session.scalars(
        select(Certificate.der)
        .join(Authority, Authority.id == Certificate.authority_id)
        .where(
            Authority.environment == newest.environment,
            Authority.status == CaStatus.ACTIVE,
            Certificate.profile == "root-link",
            Certificate.status == CertStatus.VALID,
            Certificate.not_after > now(),
        )
        .order_by(Certificate.id)
    ).all()
    return [authority.certificate_der for authority in ordered] + [der for der in links if der is not None]


# -- retirement -----------------------------------------------------------------------------------
def finished_authorities(session: Session, now: datetime) -> list[Authority]:
    """Active CAs superseded for at least RETIRE_GRACE of which nothing issued is still unexpired."""
    finished = []
    candidates = session.scalars(
        select(Authority)
        .where(Authority.status == CaStatus.ACTIVE, Authority.role.in_(ROTATABLE_ROLES))
        .order_by(Authority.id)
    ).all()
    for authority in candidates:
        newer = successor(session, authority)
        if newer is None or newer.created_at > now - RETIRE_GRACE:
            continue
        last = last_expiry(session, authority)
        if last is None or last <= now:
            finished.append(authority)
    return finished


def retire(work: Work, *, authorities: list[Authority]) -> list[Authority]:
    """Mark CAs retired (once each, audited): they sign no CRL, OCSP signer or certificate any more."""
    retired = []
    with work.transaction() as session:
        for authority in authorities:
            done = session.execute(
                update(Authority)
                .where(Authority.id == authority.id, Authority.status == CaStatus.ACTIVE)
                .values(status=CaStatus.RETIRED)
                .execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:
                continue  # another process retired it first
            newer = successor(session, authority)
            audit.record(
                session,
                "ca.retired",
                actor=work.actor,
                subject=authority.name,
                now=work.now,
                details={"environment": authority.environment, "successor": newer.name if newer else None},
            )
            retired.append(authority)
    for authority in retired:
        work.session.refresh(authority)
    return retired


def retire_finished(work: Work) -> list[Authority]:
    """Retire every superseded CA whose last certificate has expired; returns them."""
    return retire(work, authorities=finished_authorities(work.session, work.now()))
