"""Hostile input, shared by the property tests (hypothesis) and ``make fuzz`` (atheris).

Three kinds of parts live here:

- *seeds*: valid inputs (a CSR, OCSP requests, a CSV) that the mutators start from;
- *mutators*: byte-level damage (bit flips, truncation, extension, "interesting" length
  octets) and structure-aware damage (a CSR whose inner CertificationRequestInfo is mutated
  and then signed again, so the damage gets past the signature check into the deeper parsers);
- *worlds and oracles*: a real installation (SoftHSM2 token, database, CA hierarchy, a
  registered device with a one-time secret) and checks that an answer is acceptable: never a
  5xx, never a traceback, never an exception other than the module's own refusal type, and for
  refused input a database that is unchanged apart from the audit entries of the refusal.

A property that fails raises ``Finding`` (or any unexpected exception) with a one-line reason.
"""

from __future__ import annotations

import base64
import contextlib
import io
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import strategies as st
from sqlalchemy import text

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.context import Pki
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.registry.devices import add_device, get_device
from ca.registry.secrets import issue_secret
from ca.store.engine import Store
from ca.work import Work
from ocsp.presign import Presigner
from ocsp.responder import Responder
from ocsp.signer_service import OnDemandSigner, SignerClient, SignerServer
from ocsp.source import CachedSource, StoreSource
from ocsp.wsgi import OcspApp

ORG = "Acme Charging"
DEVICE = "CP-FUZZ-1"
# Audit actions a refusal may add; anything else appearing after refused input is a finding.
REFUSAL_ACTIONS = ("enrollment.refused", "reenrollment.refused", "auth.locked_out", "anonymous.refused")
INTERESTING_OCTETS = (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x16, 0x1E, 0x30, 0x31, 0x7F, 0x80, 0x81,
                      0x82, 0x83, 0x84, 0x88, 0xA0, 0xA3, 0xFF)  # fmt: skip


class Finding(AssertionError):
    """A property failed: the message says which, in one line."""


# -- hangs --------------------------------------------------------------------------------------------------
class Hang(Finding):
    pass


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Fail with ``Hang`` if the block runs longer than ``seconds`` (SIGALRM: main thread only)."""

    def expired(_signum: int, _frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- seeds ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seeds:
    key: ec.EllipticCurvePrivateKey
    csr_der: bytes
    csr_pem: bytes
    csv: str


def make_seeds(common_name: str = DEVICE) -> Seeds:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .sign(key, hashes.SHA256())
    )
    csv_text = 'serial,model,environment\nCP-A-1,Wallbox 22,production\nCP-A-2,,staging\n"CP-A-3","M, 3",\n'
    return Seeds(
        key, csr.public_bytes(serialization.Encoding.DER), csr.public_bytes(serialization.Encoding.PEM), csv_text
    )


# -- mutators (pure functions of a random source, so hypothesis and atheris share them) ----------------
class Source:
    """What a mutator draws from: hypothesis' ``data.draw`` or atheris' FuzzedDataProvider."""

    def integer(self, low: int, high: int) -> int:  # inclusive
        raise NotImplementedError

    def raw(self, max_size: int) -> bytes:
        raise NotImplementedError

    def choice(self, options: tuple[Any, ...] | list[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]


class Drawn(Source):
    """A mutator's randomness drawn through hypothesis (so failures shrink)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def raw(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


def mutate_bytes(data: bytes, source: Source, rounds: int = 4) -> bytes:
    """Flip, overwrite, truncate, extend, insert, delete or duplicate: 1..rounds operations."""
    buffer = bytearray(data)
    for _ in range(source.integer(1, rounds)):
        operation = source.integer(0, 7)
        position = source.integer(0, len(buffer)) if buffer else 0
        if operation == 0 and buffer:  # flip one bit
            index = min(position, len(buffer) - 1)
            buffer[index] ^= 1 << source.integer(0, 7)
        elif operation == 1 and buffer:  # an "interesting" octet (tags, length forms) in place
            buffer[min(position, len(buffer) - 1)] = source.choice(INTERESTING_OCTETS)
        elif operation == 2:  # truncate
            del buffer[position:]
        elif operation == 3:  # extend
            buffer += source.raw(64)
        elif operation == 4:  # insert
            buffer[position:position] = source.raw(16)
        elif operation == 5:  # delete a range
            del buffer[position : position + source.integer(1, 16)]
        elif operation == 6 and buffer:  # duplicate a slice (repeated TLVs)
            end = min(len(buffer), position + source.integer(1, 64))
            buffer[position:position] = buffer[position:end]
        else:  # overwrite with random octets
            chunk = source.raw(8)
            buffer[position : position + len(chunk)] = chunk
    return bytes(buffer)


def der_tlv(tag: int, content: bytes) -> bytes:
    """DER tag-length-value (hand-written: the mutated content is not valid ASN.1 for any library)."""
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def _csr_parts(der: bytes) -> tuple[bytes, bytes]:
    """(CertificationRequestInfo, signatureAlgorithm) of a valid DER CSR."""
    from asn1crypto import csr as asn1_csr

    parsed = asn1_csr.CertificationRequest.load(der)
    return parsed["certification_request_info"].dump(), parsed["signature_algorithm"].dump()


def resigned_csr(seeds: Seeds, source: Source) -> bytes:
    """A CSR whose CertificationRequestInfo was mutated and then signed again with the key.

    Plain mutation almost always breaks the signature, which is checked first; re-signing
    lets the damage reach the subject, attribute and extension parsers behind that check.
    """
    info, algorithm = _csr_parts(seeds.csr_der)
    damaged = mutate_bytes(info, source)
    signature = seeds.key.sign(damaged, ec.ECDSA(hashes.SHA256()))
    return der_tlv(0x30, damaged + algorithm + der_tlv(0x03, b"\x00" + signature))


def est_body(seeds: Seeds, source: Source) -> bytes:
    """An EST request body: base64 or PEM framing around a damaged, re-signed or random CSR."""
    kind = source.integer(0, 5)
    if kind == 0:
        der = mutate_bytes(seeds.csr_der, source)
    elif kind == 1:
        der = resigned_csr(seeds, source)
    elif kind == 2:
        return source.raw(512)
    elif kind == 3:
        return mutate_bytes(seeds.csr_pem, source)
    elif kind == 4:
        return mutate_bytes(base64.encodebytes(seeds.csr_der), source)
    else:
        der = seeds.csr_der
    framing = source.integer(0, 3)
    if framing == 0:
        return base64.encodebytes(der)
    if framing == 1:
        return base64.b64encode(der)
    if framing == 2:
        return (
            b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE REQUEST-----\n"
        )
    return der  # raw DER where base64 is expected


# -- database snapshots ---------------------------------------------------------------------------------------
_COUNTS = {
    "certificates": "SELECT count(*) FROM certificates",
    "devices": "SELECT count(*) FROM devices",
    "secrets": "SELECT count(*) FROM enrollment_secrets",
    "secrets_used": "SELECT count(*) FROM enrollment_secrets WHERE used_at IS NOT NULL",
    "authorities": "SELECT count(*) FROM authorities",
    "ocsp_responses": "SELECT count(*) FROM ocsp_responses",
    "revoked": "SELECT count(*) FROM certificates WHERE status <> 'valid'",
    "audit_other": "SELECT count(*) FROM audit_events WHERE action NOT IN ({})".format(
        ", ".join(f"'{action}'" for action in REFUSAL_ACTIONS)
    ),
}


def snapshot(store: Store) -> dict[str, int]:
    """Row counts of everything a refused request must leave alone (refusal audit entries excepted)."""
    with store.engine.connect() as connection:
        values = {name: connection.execute(text(query)).scalar_one() for name, query in _COUNTS.items()}
        connection.commit()  # SQLite: end the read transaction
    return values


def unchanged(store: Store, before: dict[str, int], what: str) -> None:
    after = snapshot(store)
    if after != before:
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        raise Finding(f"refused {what} changed the database: {changed}")


# -- oracles -----------------------------------------------------------------------------------------------
def one_line_error(body: str, what: str) -> None:
    if "Traceback" in body or 'File "' in body:
        raise Finding(f"{what}: a traceback in the answer: {body[:200]!r}")
    if body.count("\n") > 1 or not body.strip():
        raise Finding(f"{what}: the error is not one line: {body[:200]!r}")


# -- the worlds --------------------------------------------------------------------------------------------
@dataclass
class World:
    """A real installation for hostile input: token, database, hierarchy, one registered device."""

    home: Path
    pki: Pki
    token_settings: Pkcs11Settings
    seeds: Seeds
    secret: str
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()
        self.pki.close()


def build_world(home: Path, db_url: str, token_settings: Pkcs11Settings, est: EstSettings | None = None) -> World:
    """Hierarchy, device ``CP-FUZZ-1`` with a secret, and an issued certificate (for OCSP seeds)."""
    write_config(Config(home=home, database_url=db_url, pkcs11=token_settings, est=est or EstSettings()))
    pki = Pki.open(home, {}, create=True)
    token = pki.token()
    status = Presigner(token)
    seeds = make_seeds()
    with pki.store.session() as session:
        hierarchy = init_hierarchy(
            Work(session=session, actor="fuzz", status=status, token=token), request=HierarchyRequest(organization=ORG)
        )
        add_device(Work(session, "fuzz"), serial=DEVICE)
        secret = issue_secret(Work(session, "fuzz"), device=get_device(session, DEVICE))
        from ca.authorities.issuers import issuer_for

        issuer = issuer_for(hierarchy.issuing, token)
        issue(
            Work(session, "fuzz", status=status),
            issuer=issuer,
            request=IssueRequest(
                get_profile("charger"), ec.generate_private_key(ec.SECP256R1()).public_key(), "CP-SEED-1"
            ),
        )
    return World(home, pki, token_settings, seeds, secret)


def est_client(world: World, settings: EstSettings | None = None) -> Any:
    from web.app import create_app

    app = create_app(world.pki, settings or world.pki.config.est)
    return app.test_client()


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode("utf-8", "surrogatepass")).decode()


def check_est_answer(response: Any, what: str) -> None:
    """EST's contract: < 500, and every error a one-line text/plain body."""
    if response.status_code >= 500:
        raise Finding(f"{what}: HTTP {response.status_code}: {response.get_data(as_text=True)[:200]!r}")
    if response.status_code >= 400 and response.request.method != "HEAD":  # HEAD: headers only
        if response.mimetype != "text/plain":
            raise Finding(f"{what}: HTTP {response.status_code} as {response.mimetype}")
        one_line_error(response.get_data(as_text=True), what)


# -- OCSP ----------------------------------------------------------------------------------------------------
@dataclass
class OcspWorld:
    app: Any
    store: Store
    requests: list[bytes]


def build_ocsp(world: World, socket_path: Path) -> OcspWorld:
    """The responder as ``serve ocsp`` builds it, with its on-demand signer in a thread of this process."""
    token = world.pki.token()
    server = SignerServer(socket_path, OnDemandSigner(world.pki.store, Presigner(token), rate=100000))
    import threading

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    world.closers.append(server.server_close)
    world.closers.append(server.shutdown)
    read_only = Store(world.pki.config.database_url, read_only=True)
    world.closers.append(read_only.dispose)
    source = CachedSource(StoreSource(read_only), max_entries=1000)
    world.closers.append(source.close)
    app = OcspApp(Responder(source, SignerClient(socket_path)), repository_dir=world.home / "pki")
    return OcspWorld(app, world.pki.store, ocsp_seed_requests(world))


def ocsp_seed_requests(world: World) -> list[bytes]:
    """Valid requests: the seed certificate by SHA-1 and SHA-256, an unknown serial, two CertIDs."""
    from asn1crypto import ocsp as asn1_ocsp

    from ca.store.models import Authority, Certificate

    with world.pki.store.session() as session:
        certificate = session.query(Certificate).filter(Certificate.common_name == "CP-SEED-1").one()
        issuer = session.get(Authority, certificate.authority_id)
        assert issuer is not None
        leaf = x509.load_der_x509_certificate(certificate.der or b"")
        ca_cert = x509.load_der_x509_certificate(issuer.certificate_der)
        session.commit()
    seeds = []
    for algorithm in (hashes.SHA1(), hashes.SHA256()):
        seeds.append(
            ocsp.OCSPRequestBuilder()
            .add_certificate(leaf, ca_cert, algorithm)
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
    unknown = ocsp.OCSPRequestBuilder().add_certificate_by_hash(*_hashes(ca_cert, hashes.SHA1()), 12345, hashes.SHA1())
    seeds.append(unknown.build().public_bytes(serialization.Encoding.DER))
    single = asn1_ocsp.OCSPRequest.load(seeds[0])
    request = single["tbs_request"]["request_list"][0]
    two = asn1_ocsp.OCSPRequest({"tbs_request": {"request_list": [request, request]}})
    seeds.append(two.dump())
    return seeds


def _hashes(ca_cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    from ocsp.certid import issuer_hashes

    (found,) = [h for h in issuer_hashes(ca_cert) if h.hash_algorithm == algorithm.name]
    return found.name_hash, found.key_hash


def call_wsgi(app: Any, environ: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """Call a WSGI app in process under wsgiref's validator (it asserts the WSGI contract too)."""
    setup_testing_defaults(environ)
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, headers
        return lambda _data: None

    length = environ.get("CONTENT_LENGTH", "")
    # The validator also judges the server's side: it refuses an environ no server would build
    # (CONTENT_LENGTH "-1" or "abc"); the app must still cope, so those go in unvalidated.
    checked = validator(app) if length == "" or (length.isdigit() and length.isascii()) else app
    iterable = checked(environ, start_response)
    try:
        body = b"".join(iterable)
    finally:
        if hasattr(iterable, "close"):
            iterable.close()
    return int(captured["status"].split()[0]), dict(captured["headers"]), body


def ocsp_environ(
    method: str, path: str, body: bytes = b"", content_type: str | None = None, length: str | None = None
) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "PATH_INFO": path,
        "wsgi.input": io.BytesIO(body),
    }
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    environ["CONTENT_LENGTH"] = str(len(body)) if length is None else length
    return environ


def check_ocsp_answer(status: int, headers: dict[str, str], body: bytes, what: str) -> str | None:
    """The responder's contract: < 500; an OCSP body parses; texts are one line. Returns the OCSP status."""
    if status >= 500:
        raise Finding(f"{what}: HTTP {status}")
    content_type = headers.get("Content-Type", "")
    if status == 200 and content_type == "application/ocsp-response":
        try:
            parsed = ocsp.load_der_ocsp_response(body)
        except ValueError:
            if body:
                raise Finding(f"{what}: an unparseable OCSP response") from None
            return "HEAD"  # a HEAD answer carries no body: its status is unknown here
        if parsed.response_status == ocsp.OCSPResponseStatus.INTERNAL_ERROR:
            raise Finding(f"{what}: the responder answered internalError")
        return parsed.response_status.name
    if status >= 400:
        one_line_error(body.decode("utf-8", "replace"), what)
    return None


# -- structure-aware CSRs: well-signed, with hostile contents ------------------------------------------------
_KEYS: dict[str, Any] = {}


def _key(kind: str) -> Any:
    """Requesters' keys of every kind a charger might send, generated once per process."""
    if kind not in _KEYS:
        from cryptography.hazmat.primitives.asymmetric import dsa, ed448, ed25519, rsa

        makers: dict[str, Callable[[], Any]] = {
            "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
            "ec-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
            "ec-k256": lambda: ec.generate_private_key(ec.SECP256K1()),
            "ed25519": ed25519.Ed25519PrivateKey.generate,
            "ed448": ed448.Ed448PrivateKey.generate,
            "rsa-1024": lambda: rsa.generate_private_key(65537, 1024),
            "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
            "dsa-2048": lambda: dsa.generate_private_key(2048),
        }
        _KEYS[kind] = makers[kind]()
    return _KEYS[kind]


KEY_KINDS = (
    "ec-p256",
    "ec-p256",
    "ec-p384",
    "ec-p521",
    "ec-k256",
    "ed25519",
    "ed448",
    "rsa-1024",
    "rsa-2048",
    "dsa-2048",
)
_NAME_OIDS = (NameOID.COMMON_NAME, NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.SERIAL_NUMBER,
              NameOID.COUNTRY_NAME, x509.ObjectIdentifier("1.2.3.4.5"), NameOID.EMAIL_ADDRESS)  # fmt: skip


def _text(source: Source, max_size: int = 80) -> str:
    options = (DEVICE, ORG, "", " ", "CP-\x00-1", "a" * 300, "ÄÖÜ-ß", "127.0.0.1", "http://x/", "*", "CP-1\n")
    if source.integer(0, 1):
        return source.choice(options)
    return source.raw(max_size).decode("utf-8", "replace")


def generated_csr(source: Source) -> bytes:
    """A correctly signed CSR with drawn key type, subject attributes, SAN entries and attributes."""
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    key = _key(source.choice(KEY_KINDS))
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, DEVICE), x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG)]
    for _ in range(source.integer(0, 3)):
        attributes.insert(
            source.integer(0, len(attributes)),
            x509.NameAttribute(source.choice(_NAME_OIDS), _text(source), _validate=False),
        )
    if source.integer(0, 3) == 0:
        attributes = attributes[source.integer(0, len(attributes)) :]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if source.integer(0, 2) == 0:
        names: list[x509.GeneralName] = []
        for _ in range(source.integer(0, 3)):
            value = _text(source, 40)
            kind = source.integer(0, 3)
            if kind == 0:
                names.append(x509.DNSName(value))
            elif kind == 1:
                names.append(x509.RFC822Name(value))
            elif kind == 2:
                names.append(x509.UniformResourceIdentifier(value))
            else:
                names.append(x509.OtherName(x509.ObjectIdentifier("1.2.3"), b"\x04\x00"))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=bool(source.integer(0, 1)))
    if source.integer(0, 2) == 0:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), source.raw(32)),
            critical=bool(source.integer(0, 1)),
        )
    if source.integer(0, 2) == 0:
        builder = builder.add_attribute(
            x509.oid.AttributeOID.CHALLENGE_PASSWORD, _text(source, 40).encode("utf-8", "replace")
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # out-of-range attribute lengths are the point here
        return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)
