"""The CA factory: every CA chargepki makes, and every leaf whose key it keeps in the token.

A hierarchy is data (``Plan``): each CA's role, name, subject, profile, parent (a CA earlier in
the plan or a stored one) or certificate signed elsewhere, validity and key; link certificates
between CAs; the audit entry. ``create`` executes any plan the same way:

1. in one database transaction: keys generated in the token, certificates built from the
   profile and signed (``Issuer.sign`` parses each back and verifies it), the CAs and their
   certificates recorded, the audit entry written, commit;
2. a delegated OCSP signer for each new CA whose key is here (``issuance.issue``, like every leaf);
3. the OCSP responses about the new CA and link certificates, now that their issuers can sign.

``KeyTransaction`` is where keys are generated and the one place they are destroyed: a key that
no committed row owns yet is destroyed when anything fails (any exception, a database error as
much as a refusal), and a constraint race (``IntegrityError``) becomes a ``ConflictError``.
OCPP (``hierarchy.py``), ISO 15118 (``v2g.py``), manufacturer (``manufacturer.py``), rotation and
root rollover (``rotation.py``) build plans; OCSP and firmware signers are ``Leaf``s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID
from sqlalchemy.exc import IntegrityError

from ca import audit
from ca.authorities.issuers import SIGNING_STATUS, Issuer, certified_token_key, key_sha1, public_key_sha256
from ca.errors import ChargepkiError, ConflictError, PolicyError
from ca.issuance.flow import BACKDATE, IssueRequest, build_certificate, issue, validity_window
from ca.issuance.names import ca_common_name
from ca.issuance.profiles import CA_ROLE_PROFILES, PROFILES, ROOT_PROFILES, ca_profile
from ca.issuance.serials import format_serial, new_serial
from ca.keys.keyspec import KeySpec, key_spec
from ca.keys.pkcs11_token import new_key_label
from ca.keys.token_keys import token_private_key
from ca.store.models import Authority, Certificate
from ca.work import Work

# What the delegated OCSP signer of each CA role is called (CN suffix after organisation and environment).
_SIGNER_NAMES = {
    "root": "Root OCSP Signer",
    "manufacturer": "Manufacturer OCSP Signer",
    "v2g-root": "V2G Root OCSP",
    "v2g-sub-ca-1": "CPO Sub-CA 1 OCSP",
    "v2g-sub-ca-2": "CPO Sub-CA 2 OCSP",
    "v2g20-root": "15118-20 V2G Root OCSP",
    "v2g20-sub-ca-1": "15118-20 CPO Sub-CA 1 OCSP",
    "v2g20-sub-ca-2": "15118-20 CPO Sub-CA 2 OCSP",
}
EXTERNAL_STATUS = "external"  # a CA whose key is elsewhere: in chains, never signed with here


# -- the key transaction ------------------------------------------------------------------------
class KeyTransaction:
    """The keys one creation generates in the token, and which of them a committed row owns."""

    def __init__(self, work: Work) -> None:
        self.token = work.keys()
        self._unowned: list[str] = []

    def generate(self, spec: KeySpec, prefix: str) -> tuple[str, PublicKeyTypes]:
        """A new key pair (sensitive, never extractable) under a fresh label starting with ``prefix``."""
        label = new_key_label(prefix)
        public_key = self.token.generate_key(spec, label)
        self._unowned.append(label)
        return label, public_key

    def kept(self) -> None:
        """Every key generated so far belongs to a committed row now: a later failure keeps it."""
        self._unowned.clear()

    def destroy(self) -> None:
        for label in self._unowned:
            # If the token is gone too, an orphan key under a random label harms nothing.
            with suppress(ChargepkiError):
                self.token.destroy_key(label)
        self._unowned.clear()


@contextmanager
def key_transaction(work: Work, conflict: str) -> Iterator[KeyTransaction]:
    """Generate keys inside the block; on any exception destroy those no committed row owns.

    A constraint race (two creations of the same CA) surfaces as ``ConflictError(conflict)``.
    Database transactions opened inside with ``work.transaction()`` roll back first.
    """
    keys = KeyTransaction(work)
    try:
        yield keys
    except IntegrityError:
        keys.destroy()
        raise ConflictError(conflict) from None
    except BaseException:
        keys.destroy()
        raise


# -- hierarchies as data ------------------------------------------------------------------------
@dataclass(frozen=True)
class CaPlan:
    """One CA of a plan.

    ``parent``: None for a self-signed root, the role of a CA earlier in the plan, or a stored CA.
    ``certificate``: a certificate signed elsewhere, stored as it is: with ``key_label`` (a key
    already in the token) the CA is ours; without, it is ``external`` (no key here).
    """

    role: str  # Authority.role
    name: str
    subject: x509.Name
    parent: str | Authority | None = None
    validity: timedelta | None = None
    key_type: str = "ec-p256"
    rsa_padding: str | None = None  # "pss" for RSA-PSS signatures, else PKCS#1 v1.5
    certificate: x509.Certificate | None = None
    key_label: str | None = None
    profile: str | None = None  # default: the role's (``profiles.CA_ROLE_PROFILES``)

    @property
    def profile_name(self) -> str:
        return self.profile or CA_ROLE_PROFILES[self.role]


@dataclass(frozen=True)
class LinkPlan:
    """A link certificate: the name and key of ``certifies`` signed by ``issuer`` until ``certifies``
    expires (clamped to the issuer); each is a role in the plan or a stored CA."""

    issuer: str | Authority
    certifies: str | Authority
    profile: str = "root-link"


@dataclass(frozen=True)
class Plan:
    """A hierarchy (or the part of one a rotation adds) as data; ``create`` executes it."""

    environment: str
    organization: str
    country: str | None
    ocsp_url: str  # what the new CAs' certificates point at
    repository_url: str
    cas: tuple[CaPlan, ...]
    action: str  # the audit entry
    audit_subject: str
    details: Callable[[Created], dict[str, object]]
    conflict: str  # the ConflictError's message when a concurrent change won the race
    links: tuple[LinkPlan, ...] = ()


@dataclass
class Created:
    authorities: dict[str, Authority] = field(default_factory=dict)  # by role, parents first
    certificates: list[Certificate] = field(default_factory=list)  # recorded under a CA held here
    links: list[Certificate] = field(default_factory=list)
    ocsp_signers: dict[str, Certificate] = field(default_factory=dict)  # by role, deepest CA first

    def __getitem__(self, role: str) -> Authority:
        return self.authorities[role]


def create(work: Work, *, plan: Plan) -> Created:
    """Execute ``plan`` (see the module docstring); nothing is left behind when it fails before its commit."""
    created = Created()
    signers = _Signers(work, plan, created)
    with key_transaction(work, plan.conflict) as keys:
        with work.transaction():
            _build(work, keys, plan, signers)
            audit.record(
                work.session,
                plan.action,
                actor=work.actor,
                subject=plan.audit_subject,
                now=work.now,
                details=plan.details(created),
            )
        keys.kept()
        with work.transaction():  # ``issue`` commits each signer; then the responses their CAs can sign now
            for role, authority in reversed(created.authorities.items()):
                if authority.status == SIGNING_STATUS:
                    created.ocsp_signers[role] = _leaf(work, keys, work.issuer(authority), ocsp_signer(authority))
            answered = [c for c in created.certificates if c.profile not in ROOT_PROFILES]
            if answered:
                work.signer().update(work.session, answered, work.now())
    return created


class _Signers:
    """The CAs a plan refers to, stored (by id) or made by it (by role), and their ``Issuer``s."""

    def __init__(self, work: Work, plan: Plan, created: Created) -> None:
        references = [ca.parent for ca in plan.cas] + [link.issuer for link in plan.links]
        # Stored CAs are bound first: a refusal (a CA that no longer signs) comes before any key exists.
        self._stored = {ref.id: work.issuer(ref) for ref in references if isinstance(ref, Authority)}
        self._planned: dict[str, Issuer] = {}
        self.created = created

    def add(self, role: str, row: Authority, issuer: Issuer | None) -> None:
        self.created.authorities[role] = row
        if issuer is not None:
            self._planned[role] = replace(issuer, authority_id=row.id, role=role)

    def row(self, reference: str | Authority) -> Authority:
        return reference if isinstance(reference, Authority) else self.created.authorities[reference]

    def issuer(self, reference: str | Authority) -> Issuer | None:
        """``reference``'s Issuer, or None when its key is not here (an external CA)."""
        if isinstance(reference, Authority):
            return self._stored[reference.id]
        return self._planned.get(reference)


def _build(work: Work, keys: KeyTransaction, plan: Plan, signers: _Signers) -> None:
    """Everything of ``plan`` that goes into its one database transaction (but the audit entry)."""
    created = signers.created
    for ca in plan.cas:
        parent_row = None if ca.parent is None else signers.row(ca.parent)
        parent = None if ca.parent is None else signers.issuer(ca.parent)
        if ca.certificate is None:
            issuer, label = _new_ca(work, keys, plan, ca, parent)
        elif ca.key_label:
            issuer, label = _held(work, plan, ca), ca.key_label
        else:
            issuer, label = None, ""
        if issuer is None:
            row = _external_row(work, plan, ca, parent_row)
        else:
            row = _authority_row(work, issuer, ca.role, label, parent_row)
        work.session.add(row)
        work.session.flush()
        signers.add(ca.role, row, issuer)
        if parent is not None or (ca.parent is None and issuer is not None):  # signed here, not by an external CA
            certificate = x509.load_der_x509_certificate(row.certificate_der)
            recorded = record_ca_certificate(
                work, certificate, issued_by=parent_row or row, profile=ca.profile_name, key_label=label
            )
            created.certificates.append(recorded)
    for link in plan.links:
        certified = signers.row(link.certifies)
        recorded = record_ca_certificate(
            work,
            _link(work, link, signers),
            issued_by=signers.row(link.issuer),
            profile=link.profile,
            key_label=certified.key_label,
        )
        created.certificates.append(recorded)
        created.links.append(recorded)
    work.session.add_all(created.certificates)
    work.session.flush()


def _new_ca(work: Work, keys: KeyTransaction, plan: Plan, ca: CaPlan, parent: Issuer | None) -> tuple[Issuer, str]:
    """Key generated in the token; certificate signed by ``parent``, or by itself for a root."""
    if ca.parent is not None and parent is None:
        raise PolicyError(f"CA {ca.name} cannot be signed here: the key of its parent is elsewhere")
    spec = key_spec(ca.key_type)
    label, public_key = keys.generate(spec, ca.name)
    new = Issuer(
        name=ca.name,
        subject=ca.subject,
        private_key=token_private_key(keys.token, label, public_key),  # type: ignore[arg-type]
        spec=spec,
        rsa_padding=ca.rsa_padding,
        organization=plan.organization,
        country=plan.country,
        environment=plan.environment,
        ocsp_url=plan.ocsp_url,
        repository_url=plan.repository_url,
    )
    signer = parent or new
    profile = PROFILES[ca.profile_name]
    limit = parent.certificate.not_valid_after_utc if parent is not None and parent.certificate is not None else None
    window = validity_window(profile, ca.validity, work.now(), limit)
    builder = build_certificate(profile, signer, ca.subject, public_key, new_serial(), window)  # type: ignore[arg-type]
    return replace(new, certificate=signer.sign(builder)), label


def _held(work: Work, plan: Plan, ca: CaPlan) -> Issuer:
    """A CA certificate signed elsewhere for a key already in the token (the CSR's key)."""
    assert ca.certificate is not None and ca.key_label
    private_key = certified_token_key(work.keys(), ca.key_label, ca.certificate)
    if private_key is None:
        raise PolicyError(f"the token key {ca.key_label!r} is not the key of the {ca.name} certificate")
    return Issuer(
        name=ca.name,
        subject=ca.certificate.subject,
        private_key=private_key,
        spec=key_spec(ca.key_type),
        rsa_padding=ca.rsa_padding,
        organization=plan.organization,
        country=plan.country,
        environment=plan.environment,
        ocsp_url=plan.ocsp_url,
        repository_url=plan.repository_url,
        certificate=ca.certificate,
    )


def _link(work: Work, link: LinkPlan, signers: _Signers) -> x509.Certificate:
    """``link.certifies``'s name and key signed by ``link.issuer``, ending with ``certifies`` (or its issuer)."""
    issuer = signers.issuer(link.issuer)
    assert issuer is not None and issuer.certificate is not None
    certified = x509.load_der_x509_certificate(signers.row(link.certifies).certificate_der)
    profile = PROFILES[link.profile]
    moment = work.now()
    length = until(certified.not_valid_after_utc, moment)
    window = validity_window(profile, length, moment, issuer.certificate.not_valid_after_utc)
    public_key: CertificatePublicKeyTypes = certified.public_key()  # type: ignore[assignment]
    return issuer.sign(build_certificate(profile, issuer, certified.subject, public_key, new_serial(), window))


def _authority_row(work: Work, issuer: Issuer, role: str, key_label: str, parent: Authority | None) -> Authority:
    """The stored form of a CA whose key is in the token."""
    assert issuer.certificate is not None
    return _row(
        work,
        issuer.certificate,
        name=issuer.name,
        role=role,
        environment=issuer.environment,
        organization=issuer.organization,
        country=issuer.country,
        parent=parent,
        key_label=key_label,
        key_type=issuer.spec.name,
        rsa_padding=issuer.rsa_padding,
        ocsp_url=issuer.ocsp_url,
        repository_url=issuer.repository_url,
        status=SIGNING_STATUS,
    )


def _external_row(work: Work, plan: Plan, ca: CaPlan, parent: Authority | None) -> Authority:
    """A CA whose key is elsewhere (a V2G PKI operator's root): stored for chains, never signed with."""
    assert ca.certificate is not None
    organizations = ca.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return _row(
        work,
        ca.certificate,
        name=ca.name,
        role=ca.role,
        environment=plan.environment,
        organization=str(organizations[0].value)[:64] if organizations else plan.organization,
        country=None,
        parent=parent,
        key_label="",
        key_type=ca.key_type,
        rsa_padding=None,
        ocsp_url=plan.ocsp_url,
        repository_url=plan.repository_url,
        status=EXTERNAL_STATUS,
    )


def _row(work: Work, certificate: x509.Certificate, **columns: Any) -> Authority:
    """An ``authorities`` row: the given columns plus those read off the CA's certificate."""
    return Authority(
        **columns,
        serial=format_serial(certificate.serial_number),
        subject=certificate.subject.rfc4514_string()[:512],
        certificate_der=certificate.public_bytes(serialization.Encoding.DER),
        key_sha1=key_sha1(certificate.public_key()).hex(),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        created_at=work.now(),
    )


def record_ca_certificate(
    work: Work, certificate: x509.Certificate, *, issued_by: Authority, profile: str, key_label: str | None
) -> Certificate:
    """A certificate about a CA's key (its own, or a link): listed, revocable by the issuer's CRL, answered by OCSP."""
    return Certificate(
        serial=format_serial(certificate.serial_number),
        authority=issued_by,
        profile=profile,
        status="valid",
        subject=certificate.subject.rfc4514_string(),
        common_name=str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        der=certificate.public_bytes(serialization.Encoding.DER),
        fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        public_key_sha256=public_key_sha256(certificate.public_key()),
        key_label=key_label,
        created_at=work.now(),
    )


# -- leaves whose key is in the token -----------------------------------------------------------
@dataclass(frozen=True)
class Leaf:
    """A certificate for a key generated in the token (OCSP signer, firmware signer), issued by ``issue``."""

    profile: str
    common_name: str
    key_prefix: str  # the token label starts with it
    key_type: str = "ec-p256"
    validity: timedelta | None = None
    organizational_unit: str | None = None


def create_leaf(work: Work, *, issuer: Issuer, leaf: Leaf) -> Certificate:
    """Issue ``leaf`` under ``issuer``; its key is destroyed if anything fails before the certificate is recorded."""
    conflict = f"the {leaf.profile} {leaf.common_name!r} raced with another change; run it again"
    with key_transaction(work, conflict) as keys, work.transaction():
        return _leaf(work, keys, issuer, leaf)


def _leaf(work: Work, keys: KeyTransaction, issuer: Issuer, leaf: Leaf) -> Certificate:
    label, public_key = keys.generate(key_spec(leaf.key_type), leaf.key_prefix)
    request = IssueRequest(
        profile=PROFILES[leaf.profile],
        public_key=public_key,  # type: ignore[arg-type]
        common_name=leaf.common_name,
        validity=leaf.validity,
        key_label=label,
        organizational_unit=leaf.organizational_unit,
    )
    row = issue(work, issuer=issuer, request=request)
    keys.kept()
    return row


def ocsp_signer(authority: Authority, validity: timedelta | None = None) -> Leaf:
    """The delegated OCSP signer of ``authority``: same key type as the CA (the ``ocsp-signer`` profile
    allows its CA's key type: P-521 under an ISO 15118-20 CA), named after its role."""
    kind = _SIGNER_NAMES.get(authority.role, "OCSP Signer")
    return Leaf(
        profile="ocsp-signer",
        common_name=ca_common_name(authority.organization, authority.environment, kind),
        key_prefix=f"{authority.name}-ocsp",
        key_type=authority.key_type,
        validity=signer_validity(authority.role, validity),
    )


def create_ocsp_signer(work: Work, *, authority: Authority, validity: timedelta | None = None) -> Certificate:
    """A (new) delegated OCSP signing certificate for ``authority``, key generated in the token."""
    return create_leaf(work, issuer=work.issuer(authority), leaf=ocsp_signer(authority, validity))


def signer_validity(role: str, requested: timedelta | None) -> timedelta | None:
    """At least three response lifetimes for CAs whose OCSP responses live long (V2G: 14 days).

    Signers are rotated when a third of their life is left and no response outlives its signer,
    so this keeps every response at its full length.
    """
    profile = ca_profile(role)
    if profile is None or profile.ocsp_validity is None:
        return requested
    floor = 3 * profile.ocsp_validity
    return max(requested or PROFILES["ocsp-signer"].default_validity, floor)


def until(end: datetime, now: datetime) -> timedelta:
    """The validity length that makes ``validity_window`` end exactly at ``end``."""
    return end - (now.replace(microsecond=0) - BACKDATE)
