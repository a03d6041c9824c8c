"""Finding CAs in the store and turning one into an ``Issuer`` that signs in the token."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from sqlalchemy import Exists, bindparam, exists, select
from sqlalchemy.orm import Session

from ca.errors import ConfigError, NotFoundError, PolicyError, TokenError
from ca.keys.keyspec import KeySpec, key_spec
from ca.keys.pkcs11_token import Token
from ca.keys.token_keys import TokenECPrivateKey, TokenRSAPrivateKey, token_private_key
from ca.store.models import Authority
from ca.store.prepared import Prepared, as_objects

# The one status in which a CA signs anything (certificates, CRLs): ``retired`` and ``revoked`` CAs never do.
SIGNING_STATUS = "active"


def key_sha1(public_key: PublicKeyTypes) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING: RFC 5280 SKI method 1 and OCSP issuerKeyHash."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest  # type: ignore[arg-type]


def public_key_sha256(public_key: PublicKeyTypes) -> str:
    """A fingerprint of the whole SubjectPublicKeyInfo (anti-cloning: one key, one identity)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@dataclass(frozen=True)
class Issuer:
    """Everything needed to sign under one CA; ``certificate`` is None only while a root self-signs."""

    name: str
    subject: x509.Name
    private_key: TokenECPrivateKey | TokenRSAPrivateKey
    spec: KeySpec
    rsa_padding: str | None
    organization: str
    country: str | None
    environment: str
    ocsp_url: str
    repository_url: str
    certificate: x509.Certificate | None = None
    authority_id: int | None = None
    role: str | None = None  # the stored CA's role; issuance checks it against the profile's issuer_roles

    @property
    def public_key(self) -> PublicKeyTypes:
        return self.private_key.public_key()

    def _pss(self) -> padding.PSS | None:
        if self.rsa_padding != "pss":
            return None
        return padding.PSS(mgf=padding.MGF1(self.spec.signature_hash), salt_length=padding.PSS.DIGEST_LENGTH)

    def _sign(self, builder: x509.CertificateBuilder | x509.CertificateRevocationListBuilder) -> bytes:
        pss = self._pss()
        options = {} if pss is None else {"rsa_padding": pss}
        return builder.sign(self.private_key, self.spec.signature_hash, **options).public_bytes(
            serialization.Encoding.DER
        )

    def sign_tbs(self, tbs: bytes) -> bytes:
        """Sign DER assembled outside the builders (a large CRL's TBSCertList) in the token, with the
        hash and padding ``_sign`` gives the builders, so the same AlgorithmIdentifier applies."""
        if isinstance(self.private_key, TokenECPrivateKey):
            return self.private_key.sign(tbs, ec.ECDSA(self.spec.signature_hash))
        return self.private_key.sign(tbs, self._pss() or padding.PKCS1v15(), self.spec.signature_hash)

    def _refuse_bad_signature(self, detail: str) -> TokenError:
        return TokenError(f"the token produced a signature that does not verify under {self.name}: {detail}")

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign in the token, then parse the result back and check the signature before anyone sees it."""
        certificate = x509.load_der_x509_certificate(self._sign(builder))
        try:
            certificate.verify_directly_issued_by(self.certificate or certificate)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise self._refuse_bad_signature(type(exc).__name__) from None
        return certificate

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> bytes:
        """Sign a CRL in the token and check it the same way; returns the DER."""
        return self.check_crl(self._sign(builder))

    def check_crl(self, der: bytes) -> bytes:
        """Parse a signed CRL back (``cryptography``'s strict DER parser reads every entry) and check
        its signature under this CA over the TBSCertList bytes as they will be published.

        ``is_signature_valid`` would re-encode the parsed TBSCertList first (0.4–1 s for 1M
        entries), and asn1crypto's copy of it cost 0.07 s: the signature is checked over a view of
        the TBSCertList inside ``der``, found by the two headers the parse has just validated.
        """
        crl = x509.load_der_x509_crl(der)
        tbs_start = _content_bounds(der, 0)[0]
        tbs = memoryview(der)[tbs_start : _content_bounds(der, tbs_start)[1]]
        key = self.public_key
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(crl.signature, tbs, crl.signature_algorithm_parameters)  # type: ignore[arg-type]
            elif isinstance(key, rsa.RSAPublicKey) and crl.signature_hash_algorithm is not None:
                key.verify(crl.signature, tbs, crl.signature_algorithm_parameters, crl.signature_hash_algorithm)  # type: ignore[arg-type]
            else:
                raise self._refuse_bad_signature(f"CRL signed with {crl.signature_algorithm_oid.dotted_string}")
        except InvalidSignature:
            raise self._refuse_bad_signature("CRL") from None
        return der

    def crl_url(self) -> str:
        return f"{self.repository_url.rstrip('/')}/{self.name}.crl"

    def certificate_url(self) -> str:
        return f"{self.repository_url.rstrip('/')}/{self.name}.crt"


def get_authority(session: Session, name: str) -> Authority:
    authority = session.scalar(select(Authority).where(Authority.name == name))
    if authority is None:
        known = ", ".join(session.scalars(select(Authority.name).order_by(Authority.id))) or "none"
        raise NotFoundError(f"no CA named {name!r} (known: {known})")
    return authority


def list_authorities(session: Session, environment: str | None = None) -> list[Authority]:
    query = select(Authority).order_by(Authority.environment, Authority.id)
    if environment:
        query = query.where(Authority.environment == environment)
    return list(session.scalars(query))


def environments(session: Session, roles: Sequence[str] = ()) -> list[str]:
    """The environments that have a CA (of one of ``roles``, when given)."""
    query = select(Authority.environment).distinct()
    if roles:
        query = query.where(Authority.role.in_(roles))
    return sorted(session.scalars(query))


def only_environment(session: Session, roles: Sequence[str], *, missing: str, several: str) -> str:
    """The one environment with a CA of ``roles`` (any role when empty): what a command acts on when
    no ``--environment`` is given. ``several`` is formatted with ``known``."""
    known = environments(session, roles)
    if not known:
        raise NotFoundError(missing)
    if len(known) > 1:
        raise ConfigError(several.format(known=", ".join(known)))
    return known[0]


def any_ca(session: Session, environment: str, roles: Sequence[str]) -> str | None:
    """The name of a CA of ``roles`` in ``environment``, if there is one (a hierarchy is made once)."""
    query = select(Authority.name).where(Authority.environment == environment, Authority.role.in_(roles))
    return session.scalar(query.limit(1))


def newest_active(session: Session, role: str, environment: str, *, after: Authority | None = None) -> Authority | None:
    """The newest active CA of ``role`` in ``environment`` (created after ``after``, when given).

    The one query behind the current issuing CA, root, CPO Sub-CA 2 and manufacturer root, and a
    CA's successor: new certificates always come from the newest CA of a lineage.
    """
    parameters = {"environment": environment, "role": role, "after_id": after.id if after is not None else 0}
    found = as_objects(session, Authority, _NEWEST_ACTIVE.run(session, parameters))
    return found[0] if found else None


def default_issuing_ca(session: Session, environment: str | None) -> Authority:
    """The newest active issuing CA of ``environment`` (or of the only environment there is)."""
    if environment is None:
        environment = only_environment(
            session,
            (),
            missing="no CA hierarchy yet: run `chargepki init --org NAME` first",
            several="several environments exist ({known}): choose one with --environment or --ca",
        )
    authority = newest_active(session, "issuing", environment)
    if authority is None:
        raise NotFoundError(f"no active issuing CA in environment {environment!r}")
    return authority


def chain(session: Session, authority: Authority) -> list[Authority]:
    """``authority`` and its parents, up to and including the root."""
    result = [authority]
    while result[-1].parent_id is not None:
        result.append(session.get(Authority, result[-1].parent_id))  # type: ignore[arg-type]
    return result


_AUTHORITIES = Authority.__table__
# Prepared once: every relayed signature looks up its environment's issuing CA (ids start at 1).
_NEWEST_ACTIVE = Prepared(
    select(_AUTHORITIES)
    .where(
        _AUTHORITIES.c.environment == bindparam("environment"),
        _AUTHORITIES.c.role == bindparam("role"),
        _AUTHORITIES.c.status == SIGNING_STATUS,
        _AUTHORITIES.c.id > bindparam("after_id"),
    )
    .order_by(_AUTHORITIES.c.id.desc())
    .limit(1)
)


def check_can_sign(authority: Authority) -> None:
    """Refuse to bind a CA that is retired, revoked or external: it signs nothing any more."""
    if authority.status != SIGNING_STATUS:
        raise PolicyError(f"CA {authority.name} is {authority.status}: it signs nothing any more", code="ca_not_active")


def still_signs(authority_id: str = "signing_ca") -> Exists:
    """``EXISTS`` the CA (bound parameter ``signing_ca``) is still active, for a statement that signs or
    records under it, so an ``Issuer`` bound earlier (a worker's cache) cannot outlive a revocation.

    ``issuance.issue`` evaluates it after taking the audit head's row lock, which every CA status
    change (audited) takes too: that one lock orders them, fairly, on SQLite and PostgreSQL.
    """
    return exists(
        select(_AUTHORITIES.c.id).where(
            _AUTHORITIES.c.id == bindparam(authority_id), _AUTHORITIES.c.status == SIGNING_STATUS
        )
    )


def certified_token_key(
    token: Token, key_label: str, certificate: x509.Certificate
) -> TokenECPrivateKey | TokenRSAPrivateKey | None:
    """The token key labelled ``key_label`` when it is ``certificate``'s key; None when it is another."""
    token_public = token.public_key(key_label)
    if public_key_sha256(token_public) != public_key_sha256(certificate.public_key()):
        return None
    return token_private_key(token, key_label, token_public)


def issuer_for(authority: Authority, token: Token) -> Issuer:
    """Bind a stored CA to its token key, refusing a CA that no longer signs and a token key that
    is not the CA's key. ``issuance.issue`` checks the status again in the issuing transaction."""
    check_can_sign(authority)
    certificate = x509.load_der_x509_certificate(authority.certificate_der)
    private_key = certified_token_key(token, authority.key_label, certificate)
    if private_key is None:
        raise TokenError(
            f"the key labelled {authority.key_label!r} in token {token.label!r} is not the key of CA {authority.name}"
        )
    return Issuer(
        name=authority.name,
        subject=certificate.subject,
        private_key=private_key,
        spec=key_spec(authority.key_type),
        rsa_padding=authority.rsa_padding,
        organization=authority.organization,
        country=authority.country,
        environment=authority.environment,
        ocsp_url=authority.ocsp_url,
        repository_url=authority.repository_url,
        certificate=certificate,
        authority_id=authority.id,
        role=authority.role,
    )


def _content_bounds(der: bytes, offset: int) -> tuple[int, int]:
    """(start, end) of the content of the DER element at ``offset`` (its header already validated)."""
    first = der[offset + 1]
    if first < 0x80:
        return offset + 2, offset + 2 + first
    start = offset + 2 + (first & 0x7F)
    return start, start + int.from_bytes(der[offset + 2 : start], "big")
