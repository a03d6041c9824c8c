"""OCSP, in process: pre-signing at issuance and revocation, refreshing, signer rotation, and the
keyless responder answering from the store or through the on-demand signer (real token, real
Unix socket, SQLite and PostgreSQL)."""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for
from ca.issuance.csr import read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.status.revocation import revoke, unhold
from ca.store.engine import Store
from ca.store.models import Certificate, OcspResponse, StatusFeed
from ca.work import Work
from ocsp import responder as responder_module
from ocsp.host_counter import HostCounter, _locked
from ocsp.presign import OcspPolicy, Presigner, refresh, rotate_signers
from ocsp.responder import Responder
from ocsp.signer_service import OnDemandSigner, SignerClient, SignerServer
from ocsp.signing import MALFORMED_REQUEST, TRY_LATER, UNAUTHORIZED
from ocsp.source import CachedSource, StoreSource
from tests.helpers import make_csr


def _issue(session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, cn: str = "CP-1") -> Certificate:
    issuer = issuer_for(hierarchy.issuing, token)
    request = request_from_csr(get_profile("charger"), read_csr(make_csr(cn)), issuer)
    return issue(Work(session, "test", status=status), issuer=issuer, request=request)


def _certificates(hierarchy: Hierarchy, row: Certificate) -> tuple[x509.Certificate, x509.Certificate]:
    assert row.der is not None
    return x509.load_der_x509_certificate(row.der), x509.load_der_x509_certificate(hierarchy.issuing.certificate_der)


def _request(
    leaf: x509.Certificate,
    issuer: x509.Certificate,
    algorithm: hashes.HashAlgorithm | None = None,
    nonce: bytes | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, algorithm or hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _stored(session: Session, row: Certificate, algorithm: str = "sha1") -> OcspResponse | None:
    found = session.scalar(
        select(OcspResponse)
        .where(OcspResponse.serial == row.serial, OcspResponse.hash_algorithm == algorithm)
        .execution_options(populate_existing=True)
    )
    session.commit()  # end the read: on SQLite every transaction holds the write lock the signer needs
    return found


def _verified(der: bytes, hierarchy: Hierarchy) -> ocsp.OCSPResponse:
    """Parse and check the signature and the signer's delegation, as a relying party would."""
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    (signer,) = response.certificates
    signer.verify_directly_issued_by(x509.load_der_x509_certificate(hierarchy.issuing.certificate_der))
    assert (
        x509.ExtendedKeyUsageOID.OCSP_SIGNING in signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    algorithm = ec.ECDSA(response.signature_hash_algorithm)  # type: ignore[arg-type]
    signer.public_key().verify(response.signature, response.tbs_response_bytes, algorithm)  # type: ignore[call-arg]
    assert response.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(signer.public_key()).digest  # type: ignore[arg-type]
    return response


# -- pre-signing ----------------------------------------------------------------------------------
def test_issuance_stores_a_signed_good_response(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    row = _issue(session, hierarchy, token, status)
    stored = _stored(session, row)
    assert stored is not None and stored.cert_status == "good"
    response = _verified(stored.der, hierarchy)
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert response.serial_number == int(row.serial, 16)
    assert stored.next_update - stored.this_update == OcspPolicy().validity


def test_a_new_certificates_response_is_signed_before_its_record_and_stored_with_it(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issuance signs the response ahead of the record's transaction, so no other writer waits for
    the token, and stores exactly those bytes in it: two signatures, the certificate's and this one."""
    ahead: list[bytes] = []
    prepare = status.prepare

    def spy(*args: object, **kwargs: object) -> object:
        prepared = prepare(*args, **kwargs)  # type: ignore[arg-type]
        assert prepared is not None
        ahead.extend(der for _algorithm, _status, der in prepared.answers)
        return prepared

    monkeypatch.setattr(status, "prepare", spy)
    signatures = _count_signatures(monkeypatch)
    row = _issue(session, hierarchy, token, status)
    stored = _stored(session, row)
    assert stored is not None and [stored.der] == ahead and len(signatures) == 2
    assert _verified(stored.der, hierarchy).certificate_status == ocsp.OCSPCertStatus.GOOD


def test_a_response_signed_ahead_by_a_signer_rotated_meanwhile_is_signed_again_in_the_record(
    store: Store,
    session: Session,
    hierarchy: Hierarchy,
    token: Token,
    status: Presigner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rule is the signer current in the record's own transaction: when a rotation committed
    between the signing ahead and the record, the new signer answers for the new certificate."""
    prepare = status.prepare
    rotated: list[Certificate] = []

    def prepare_then_rotate(*args: object, **kwargs: object) -> object:
        prepared = prepare(*args, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(status, "prepare", prepare)  # once: the rotation issues a signer itself
        with store.session() as other:
            now = datetime.now(UTC)
            done = rotate_signers(other, status, actor="test", now=now, validity=timedelta(days=30), force=True)
            rotated.extend(signer for authority, signer in done if authority.role == "issuing")
            other.commit()
        return prepared

    monkeypatch.setattr(status, "prepare", prepare_then_rotate)
    row = _issue(session, hierarchy, token, status)
    (new_signer,) = rotated
    stored = _stored(session, row)
    assert stored is not None and stored.signer_serial == new_signer.serial != hierarchy.ocsp_signer.serial
    response = ocsp.load_der_ocsp_response(stored.der)
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert response.certificates[0].serial_number == int(new_signer.serial, 16)


def test_a_signer_rotated_and_revoked_by_another_process_never_answers_for_a_new_certificate(
    store: Store,
    session: Session,
    hierarchy: Hierarchy,
    token: Token,
    status: Presigner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The signing ahead reads nothing: it takes the signer this process's last lookup found. When
    another process rotated the signers and revoked the old one since, that guess is wrong once:
    the record finds the new signer in its transaction and signs again (one signature more), and
    from then on the guess is the new signer."""
    _issue(session, hierarchy, token, status, cn="CP-1")  # this worker now knows the CA's signer
    old = hierarchy.ocsp_signer.serial
    with store.session() as other:  # e.g. `chargepki ocsp rotate` and a revocation, from the CLI
        elsewhere = Presigner(token)
        done = rotate_signers(
            other, elsewhere, actor="test", now=datetime.now(UTC), validity=timedelta(days=30), force=True
        )
        other.commit()
        (new_signer,) = [signer for authority, signer in done if authority.role == "issuing"]
        revoke(Work(other, "test", status=elsewhere), serial=old, reason="keyCompromise")

    signatures = _count_signatures(monkeypatch)
    row = _issue(session, hierarchy, token, status, cn="CP-2")
    stored = _stored(session, row)
    assert stored is not None and stored.signer_serial == new_signer.serial != old
    assert _verified(stored.der, hierarchy).certificates[0].serial_number == int(new_signer.serial, 16)
    assert len(signatures) == 3  # the certificate, the response by the old signer (discarded), by the new

    signatures.clear()
    row = _issue(session, hierarchy, token, status, cn="CP-3")
    stored = _stored(session, row)
    assert stored is not None and stored.signer_serial == new_signer.serial and len(signatures) == 2


def _count_signatures(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    made: list[object] = []
    real = Token.sign

    def sign(self: Token, *args: object, **kwargs: object) -> bytes:
        made.append(args)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Token, "sign", sign)
    return made


def test_revocation_re_signs_in_the_same_transaction_and_signals(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    row = _issue(session, hierarchy, token, status)
    before = session.scalar(select(StatusFeed.counter))
    revoke(Work(session, "test", status=status), serial=row.serial, reason="keyCompromise")
    stored = _stored(session, row)
    assert stored is not None and stored.cert_status == "revoked"
    response = _verified(stored.der, hierarchy)
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_reason == x509.ReasonFlags.key_compromise
    assert session.scalar(select(StatusFeed.counter)) == before + 1


def test_a_released_hold_is_good_again(session: Session, hierarchy: Hierarchy, token: Token, status: Presigner) -> None:
    row = _issue(session, hierarchy, token, status)
    revoke(Work(session, "test", status=status), serial=row.serial, reason="certificateHold")
    held = _verified(_stored(session, row).der, hierarchy)  # type: ignore[union-attr]
    assert held.revocation_reason == x509.ReasonFlags.certificate_hold
    unhold(Work(session, "test", status=status), serial=row.serial)
    assert _verified(_stored(session, row).der, hierarchy).certificate_status == ocsp.OCSPCertStatus.GOOD  # type: ignore[union-attr]


def test_an_unspecified_reason_is_left_out(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    row = _issue(session, hierarchy, token, status)
    revoke(Work(session, "test", status=status), serial=row.serial, reason="unspecified")
    response = _verified(_stored(session, row).der, hierarchy)  # type: ignore[union-attr]
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED and response.revocation_reason is None


def test_a_revocation_the_token_cannot_sign_is_recorded_and_the_stale_response_dropped(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    row = _issue(session, hierarchy, token, status)
    signer_id = hierarchy.ocsp_signer.id
    session.execute(update(Certificate).where(Certificate.id == signer_id).values(key_label="gone-from-the-token"))
    session.commit()
    revoke(Work(session, "test", status=Presigner(token)), serial=row.serial, reason="keyCompromise")
    session.expire_all()
    assert session.get(Certificate, row.id).status == "revoked"  # type: ignore[union-attr]
    assert _stored(session, row) is None, "a good response must never outlive the revocation"


def test_the_issuing_ca_is_answered_by_the_roots_own_signer(session: Session, hierarchy: Hierarchy) -> None:
    stored = session.scalar(select(OcspResponse).where(OcspResponse.serial == hierarchy.issuing.serial))
    assert stored is not None and stored.cert_status == "good"
    response = ocsp.load_der_ocsp_response(stored.der)
    (signer,) = response.certificates
    signer.verify_directly_issued_by(x509.load_der_x509_certificate(hierarchy.root.certificate_der))


# -- refreshing and rotation ----------------------------------------------------------------------
def test_refresh_re_signs_after_half_the_validity_only(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    row = _issue(session, hierarchy, token, status)
    first = _stored(session, row)
    assert first is not None
    signed_at, first_next_update = first.this_update, first.next_update
    assert refresh(session, status, signed_at + timedelta(hours=11)) == 0
    late = signed_at + timedelta(hours=13)
    assert refresh(session, status, late) >= 1
    again = _stored(session, row)
    assert again is not None and again.this_update == late.replace(microsecond=0)
    assert again.next_update > first_next_update


def test_refresh_fills_in_missing_responses(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    row = _issue(session, hierarchy, token, status)
    session.execute(OcspResponse.__table__.delete())
    session.commit()
    assert refresh(session, status, datetime.now(UTC)) >= 2  # the charger and the issuing CA
    assert _stored(session, row) is not None


def test_signers_rotate_with_a_third_of_their_life_left_and_responses_follow(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    row = _issue(session, hierarchy, token, status)
    signer_end = hierarchy.ocsp_signer.not_after
    assert rotate_signers(session, status, actor="test", now=datetime.now(UTC), validity=timedelta(days=30)) == []
    soon = signer_end - timedelta(days=5)
    rotated = rotate_signers(session, status, actor="test", now=soon, validity=timedelta(days=30))
    assert {authority.role for authority, _ in rotated} == {"root", "issuing"}
    new_signer = next(signer for authority, signer in rotated if authority.role == "issuing")
    refresh(session, status, soon)
    stored = _stored(session, row)
    assert stored is not None and stored.signer_serial == new_signer.serial
    assert stored.next_update <= new_signer.not_after


def test_no_response_outlives_its_signer(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    row = _issue(session, hierarchy, token, status)
    near_end = hierarchy.ocsp_signer.not_after - timedelta(hours=2)
    session.execute(update(OcspResponse).values(next_update=near_end))  # force a refresh
    session.commit()
    refresh(session, status, near_end - timedelta(hours=1))
    stored = _stored(session, row)
    assert stored is not None and stored.next_update <= hierarchy.ocsp_signer.not_after


# -- the responder ----------------------------------------------------------------------------------
@pytest.fixture
def responder(store: Store, hierarchy: Hierarchy, token: Token, tmp_path: Path) -> Iterator[Responder]:
    """A responder on a read-only store, with an on-demand signer on a real Unix socket."""
    socket_path = tmp_path / "signer.sock"
    server = SignerServer(socket_path, OnDemandSigner(store, Presigner(token), rate=1000))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    reader = Store(str(store.url.render_as_string(hide_password=False)), read_only=True)
    source = CachedSource(StoreSource(reader))
    yield Responder(source, SignerClient(socket_path))
    source.close()
    server.shutdown()
    server.server_close()
    reader.dispose()


def test_the_responder_serves_the_stored_bytes(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, responder: Responder
) -> None:
    row = _issue(session, hierarchy, token, status)
    answer = responder.answer(_request(*_certificates(hierarchy, row)))
    assert answer.body == _stored(session, row).der  # type: ignore[union-attr]
    assert answer.cache is not None and answer.cache.etag.startswith('"')


def test_a_revocation_reaches_a_responder_that_cached_good(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, responder: Responder
) -> None:
    row = _issue(session, hierarchy, token, status)
    request = _request(*_certificates(hierarchy, row))
    assert _verified(responder.answer(request).body, hierarchy).certificate_status == ocsp.OCSPCertStatus.GOOD
    revoke(Work(session, "test", status=status), serial=row.serial, reason="keyCompromise")
    pause = threading.Event()
    for _ in range(50):  # the watcher polls every 0.1 s (SQLite) or is woken by NOTIFY (PostgreSQL)
        if (
            ocsp.load_der_ocsp_response(responder.answer(request).body).certificate_status
            == ocsp.OCSPCertStatus.REVOKED
        ):
            break
        pause.wait(0.1)
    assert _verified(responder.answer(request).body, hierarchy).certificate_status == ocsp.OCSPCertStatus.REVOKED


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every request the responder reads (parses) from now on."""
    read: list[bytes] = []
    real = responder_module.read_request

    def counted(der: bytes) -> Any:
        read.append(der)
        return real(der)

    monkeypatch.setattr(responder_module, "read_request", counted)
    return read


def test_a_request_asked_again_is_answered_from_memory_without_reading_it_until_the_status_changes(
    session: Session,
    hierarchy: Hierarchy,
    token: Token,
    status: Presigner,
    responder: Responder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    row = _issue(session, hierarchy, token, status)
    request = _request(*_certificates(hierarchy, row))
    read = _counting_reads(monkeypatch)
    first = responder.answer(request)
    again = [responder.answer(request) for _ in range(3)]
    assert read == [request], "read once, then recalled by its bytes"
    assert {answer.body for answer in again} == {first.body} and {answer.source for answer in again} == {"cache"}
    revoke(Work(session, "test", status=status), serial=row.serial, reason="keyCompromise")
    pause = threading.Event()
    for _ in range(50):  # until the watcher empties the cache (and the requests remembered with it)
        if responder.source.recall(request) is None:
            break
        pause.wait(0.1)
    assert _verified(responder.answer(request).body, hierarchy).certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert read == [request, request]


def test_a_request_with_a_nonce_is_answered_from_the_cache_but_never_remembered_by_its_bytes(
    session: Session,
    hierarchy: Hierarchy,
    token: Token,
    status: Presigner,
    responder: Responder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every nonce is new: remembering such requests would only push the repeatable ones out."""
    der = _request(*_certificates(hierarchy, _issue(session, hierarchy, token, status)), nonce=b"\x01" * 16)
    read = _counting_reads(monkeypatch)
    answers = [responder.answer(der) for _ in range(2)]
    assert read == [der, der]
    assert answers[1].source == "cache" and answers[0].body == answers[1].body
    assert responder.source.recall(der) is None and not responder.source._requests


def test_the_cache_keeps_at_most_its_bound_of_responses_and_of_requests_the_oldest_leaving_first(
    store: Store, session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    rows = [_issue(session, hierarchy, token, status, cn=f"CP-{n}") for n in range(3)]
    requests = [_request(*_certificates(hierarchy, row)) for row in rows]
    reader = Store(str(store.url.render_as_string(hide_password=False)), read_only=True)
    source = CachedSource(StoreSource(reader), max_entries=2)
    responder = Responder(source, None)
    try:
        answers = [responder.answer(request) for request in requests]
        assert len(source._entries) == 2 and len(source._requests) == 2
        assert source.recall(requests[0]) is None, "the oldest left"
        assert [source.recall(request) for request in requests[1:]] == [answer.cache for answer in answers[1:]]
        assert responder.answer(requests[0]).body == answers[0].body  # and is read again when asked
    finally:
        source.close()
        reader.dispose()


@pytest.mark.parametrize("when", ["reading the store", "serving a cached entry"])
def test_a_request_is_not_remembered_with_an_answer_the_cache_was_emptied_of_meanwhile(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, responder: Responder, when: str
) -> None:
    """A revocation empties the cache while a request is being looked up: the answer found (now
    possibly stale) is served to that one request but never remembered for the next ones."""
    row = _issue(session, hierarchy, token, status)
    request = _request(*_certificates(hierarchy, row))
    cache = responder.source
    if when == "serving a cached entry":
        # cached by its CertID, not remembered by its bytes:
        responder.answer(_request(*_certificates(hierarchy, row), nonce=b"\x02" * 16))
        real_servable = cache._servable

        def servable_then_emptied(entry: Any) -> bool:
            cache.invalidate()
            return real_servable(entry)

        cache._servable = servable_then_emptied  # type: ignore[method-assign]
    else:
        real_response = cache.source.response_at

        def read_then_emptied(*key: Any) -> Any:
            found = real_response(*key)
            cache.invalidate()
            return found

        cache.source.response_at = read_then_emptied  # type: ignore[method-assign]
    assert responder.answer(request).cache is not None
    assert not cache._requests and cache.recall(request) is None


def test_a_revocation_before_the_watchers_first_read_still_empties_the_cache(
    session: Session,
    hierarchy: Hierarchy,
    token: Token,
    status: Presigner,
    responder: Responder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watcher starts with the first request; if its first counter read comes after a change
    (a loaded machine, a slow start), that read must still see the change: the counter is read
    before anything is cached, or the `good` cached first would be served until its TTL after the
    revocation (seen once in CI, on a loaded machine)."""
    go, real_watch = threading.Event(), CachedSource._watch

    def late_watch(self: CachedSource) -> None:
        go.wait(10)
        real_watch(self)

    monkeypatch.setattr(CachedSource, "_watch", late_watch)
    row = _issue(session, hierarchy, token, status)
    request = _request(*_certificates(hierarchy, row))
    assert _verified(responder.answer(request).body, hierarchy).certificate_status == ocsp.OCSPCertStatus.GOOD
    revoke(Work(session, "test", status=status), serial=row.serial, reason="keyCompromise")
    cache = responder.source
    started = cache._contact
    go.set()  # the watcher's first read now sees the counter the revocation raised
    pause = threading.Event()
    for _ in range(100):
        if cache._contact != started:  # its first read is done (and acted on)
            break
        pause.wait(0.05)
    assert cache._contact != started, "the watcher never read the store"
    assert _verified(responder.answer(request).body, hierarchy).certificate_status == ocsp.OCSPCertStatus.REVOKED


# -- the responder processes of one host ----------------------------------------------------------
@pytest.fixture
def host_sources(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Responders as separate processes of one host would have them: each its own cache on its own
    read-only store, sharing one counter file. Their watchers never run on their own (a watcher is
    tens of milliseconds late at worst; here, until the test reads the store for it with ``_poll``)."""
    monkeypatch.setattr(CachedSource, "_watch", lambda self: self._stop.wait())
    made: list[tuple[CachedSource, Store]] = []

    def make(*, shared: bool = True) -> Responder:
        reader = Store(str(store.url.render_as_string(hide_password=False)), read_only=True)
        source = CachedSource(StoreSource(reader), host=HostCounter(tmp_path / "counter") if shared else None)
        made.append((source, reader))
        return Responder(source, None)

    yield make
    for source, reader in made:
        source.close()
        reader.dispose()


def _status(responder: Responder, request: bytes, hierarchy: Hierarchy) -> ocsp.OCSPCertStatus:
    return _verified(responder.answer(request).body, hierarchy).certificate_status


def test_once_one_responder_process_of_a_host_said_revoked_none_of_them_says_good(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, host_sources: Any
) -> None:
    """Behind the front door one client's requests reach several processes, which hear of a revocation
    some milliseconds apart: the first to act on it publishes that to the others before it answers, and
    the others empty their caches before their next answer. (A process outside the host's counter
    shows the window that closes: it still says good until its own watcher reads the store.)"""
    first, second, alone = host_sources(), host_sources(), host_sources(shared=False)
    row = _issue(session, hierarchy, token, status)
    request = _request(*_certificates(hierarchy, row))
    for responder in (first, second, alone):
        assert _status(responder, request, hierarchy) == ocsp.OCSPCertStatus.GOOD
        assert responder.answer(request).source == "cache"
    revoke(Work(session, "test", status=status), serial=row.serial, reason="keyCompromise")
    first.source._poll()  # its watcher reads the raised counter
    assert _status(first, request, hierarchy) == ocsp.OCSPCertStatus.REVOKED
    assert _status(second, request, hierarchy) == ocsp.OCSPCertStatus.REVOKED
    assert _status(alone, request, hierarchy) == ocsp.OCSPCertStatus.GOOD  # the window, without the counter
    second.source._poll()  # its watcher catches up later: nothing more to empty
    generation = second.source._generation
    assert _status(second, request, hierarchy) == ocsp.OCSPCertStatus.REVOKED
    assert second.source._generation == generation


def test_a_revocation_read_on_a_cache_miss_is_published_to_the_other_processes_too(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, host_sources: Any
) -> None:
    """A process that never cached the certificate reads the store after the revocation, before its
    watcher does: the counter read with the response tells it the store moved, and the others hear."""
    asked_before, asked_after = host_sources(), host_sources()
    row = _issue(session, hierarchy, token, status)
    request = _request(*_certificates(hierarchy, row))
    assert _status(asked_before, request, hierarchy) == ocsp.OCSPCertStatus.GOOD
    asked_after.answer(_request(*_certificates(hierarchy, _issue(session, hierarchy, token, status, cn="CP-2"))))
    revoke(Work(session, "test", status=status), serial=row.serial, reason="keyCompromise")
    answer = asked_after.answer(request)
    assert answer.source == "store"
    assert _verified(answer.body, hierarchy).certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert _status(asked_before, request, hierarchy) == ocsp.OCSPCertStatus.REVOKED
    assert asked_after.answer(request).source == "cache", "what the miss read, current, is kept"


def test_with_nothing_changed_the_host_counter_empties_no_cache(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, host_sources: Any, store: Store
) -> None:
    """The check before each answer is one read of shared memory: no store read, no emptying, however
    many processes answer; and a store whose counter went back (restored) resets the shared value, so
    processes do not empty their caches on every request afterwards."""
    first, second = host_sources(), host_sources()
    row = _issue(session, hierarchy, token, status)
    request = _request(*_certificates(hierarchy, row))
    for responder in (first, second):
        responder.answer(request)
        first.source._poll()
        second.source._poll()
    generations = (first.source._generation, second.source._generation)
    for _ in range(3):
        assert [responder.answer(request).source for responder in (first, second)] == ["cache", "cache"]
    assert (first.source._generation, second.source._generation) == generations
    counter = session.scalar(select(StatusFeed.counter))
    session.execute(update(StatusFeed).values(counter=counter - 1))  # a restore from an older backup
    session.commit()
    first.source._poll()
    second.source._poll()
    assert first.source.host is not None and first.source.host.read() == counter - 1
    first.answer(request)
    second.answer(request)
    generations = (first.source._generation, second.source._generation)
    for _ in range(3):
        assert [responder.answer(request).source for responder in (first, second)] == ["cache", "cache"]
    assert (first.source._generation, second.source._generation) == generations


def test_a_host_counter_ahead_of_the_store_is_reset_rather_than_hiding_later_revocations(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, host_sources: Any
) -> None:
    """The file outlives the services: after the database was restored from a backup (its counter
    lower), the value left there is ahead of the store. A process catches up to it once, then its
    watcher's next read finds the store behind it and resets it, so a later revocation is seen."""
    responder = host_sources()
    cache = responder.source
    row = _issue(session, hierarchy, token, status)
    request = _request(*_certificates(hierarchy, row))
    assert _status(responder, request, hierarchy) == ocsp.OCSPCertStatus.GOOD
    assert cache.host is not None
    cache.host.publish(10**12)  # what the file held before the restore
    assert _status(responder, request, hierarchy) == ocsp.OCSPCertStatus.GOOD  # caught up: emptied, read again
    cache._poll()
    assert cache.host.read() == session.scalar(select(StatusFeed.counter))
    revoke(Work(session, "test", status=status), serial=row.serial, reason="keyCompromise")
    cache._poll()
    assert _status(responder, request, hierarchy) == ocsp.OCSPCertStatus.REVOKED


def test_a_watcher_read_begun_before_a_lookup_raised_the_cache_does_not_reset_the_host_counter(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, host_sources: Any
) -> None:
    """The watcher's read began, then a cache miss read the store after a revocation and raised the
    cache (and the host's value) past it: the watcher's older counter is older, not a restored
    store, and must not pull the host's value back below what this process already answered from."""
    responder = host_sources()
    cache = responder.source
    first = _issue(session, hierarchy, token, status)
    other = _issue(session, hierarchy, token, status, cn="CP-2")
    responder.answer(_request(*_certificates(hierarchy, first)))
    cache._poll()
    since, before = cache.clock(), session.scalar(select(StatusFeed.counter))  # the watcher's read
    revoke(Work(session, "test", status=status), serial=first.serial, reason="keyCompromise")
    assert responder.answer(_request(*_certificates(hierarchy, other))).source == "store"  # the miss
    assert cache.host is not None and cache.host.read() > before
    raised = cache.host.read()
    cache._confirmed(since, before)  # that read's result arrives now
    assert cache.host.read() == raised and cache._counter == raised


def test_the_host_counter_only_rises_ignores_a_torn_value_and_is_the_owners_alone(tmp_path: Path) -> None:
    path = tmp_path / "run" / "counter"
    one, other = HostCounter(path), HostCounter(path)  # two processes' mappings of one file
    try:
        assert one.read() == -1  # nothing published yet
        one.publish(7)
        assert other.read() == 7
        other.publish(5)
        assert one.read() == 7, "never lowered by a publish"
        other.reset(3)
        assert one.read() == 3
        one.publish(-1)  # no counter (no status row): nothing to publish
        one.reset(-1)
        assert other.read() == 3
        with path.open("r+b") as raw:  # a value whose check half disagrees: half-written, or not ours
            raw.write((9).to_bytes(8, sys.byteorder))
        assert one.read() == -1
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        one.close()
        other.close()


@pytest.mark.parametrize("path_replaced", [False, True], ids=["same-path", "path-replaced"])
def test_a_process_forked_after_opening_the_host_counter_still_waits_for_the_parents_writer(
    tmp_path: Path, path_replaced: bool
) -> None:
    """flock belongs to an open file description, which a fork shares: a worker forked from a process
    that had opened the counter (an app loaded before the server forks) must lock through its own,
    on the very file it has mapped, even when something else has taken the path since."""
    path = tmp_path / "counter"
    counter = HostCounter(path)
    report_read, report_write = os.pipe()
    try:
        with _locked(counter._writer()):  # the parent is writing
            if path_replaced:
                path.rename(tmp_path / "counter.old")
                path.write_bytes(b"")
            child = os.fork()
            if child == 0:  # pragma: no cover - the child reports through the pipe and exits
                outcome = b"?"
                try:
                    descriptor = counter._writer()
                    try:
                        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        outcome = b"taken"  # the parent's lock excluded nothing
                    except BlockingIOError:
                        outcome = b"waits"
                finally:
                    os.write(report_write, outcome)
                    os._exit(0)
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert os.read(report_read, 16) == b"waits"
        counter.publish(4)  # and the parent's own lock still works after its child closed its copy
        assert counter.read() == 4
    finally:
        os.close(report_read)
        os.close(report_write)
        counter.close()


def test_sha256_cert_ids_are_signed_on_first_use_then_served_from_the_store(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, responder: Responder
) -> None:
    row = _issue(session, hierarchy, token, status)
    assert _stored(session, row, "sha256") is None
    answer = responder.answer(_request(*_certificates(hierarchy, row), hashes.SHA256()))
    response = _verified(answer.body, hierarchy)
    assert response.hash_algorithm.name == "sha256" and response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert _stored(session, row, "sha256") is not None
    revoke(Work(session, "test", status=status), serial=row.serial, reason="superseded")
    assert _stored(session, row, "sha256").cert_status == "revoked", "every stored hash is re-signed"  # type: ignore[union-attr]


def test_an_unknown_serial_is_answered_unknown(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, responder: Responder
) -> None:
    known = ocsp.load_der_ocsp_request(_request(*_certificates(hierarchy, _issue(session, hierarchy, token, status))))
    request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        known.issuer_name_hash, known.issuer_key_hash, 12345, hashes.SHA1()
    )
    der = request.build().public_bytes(serialization.Encoding.DER)
    response = _verified(responder.answer(der).body, hierarchy)
    assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN


def test_several_cert_ids_are_answered_in_one_response(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, responder: Responder
) -> None:
    first = _issue(session, hierarchy, token, status, "CP-A")
    second = _issue(session, hierarchy, token, status, "CP-B")
    revoke(Work(session, "test", status=status), serial=second.serial, reason="keyCompromise")
    from asn1crypto import ocsp as asn1_ocsp

    single = [
        asn1_ocsp.OCSPRequest.load(_request(*_certificates(hierarchy, row)))["tbs_request"]["request_list"][0]
        for row in (first, second)
    ]
    der = asn1_ocsp.OCSPRequest({"tbs_request": {"request_list": single}}).dump()
    response = _verified(responder.answer(der).body, hierarchy)
    statuses = {single.serial_number: single.certificate_status for single in response.responses}
    assert statuses == {
        int(first.serial, 16): ocsp.OCSPCertStatus.GOOD,
        int(second.serial, 16): ocsp.OCSPCertStatus.REVOKED,
    }


def test_an_issuer_it_does_not_serve_is_unauthorized(responder: Responder, hierarchy: Hierarchy) -> None:
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(b"\x01" * 20, b"\x02" * 20, 7, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    assert responder.answer(der).body == UNAUTHORIZED


@pytest.mark.parametrize(
    "garbage", [b"", b"\x30", b"\x30\x03\x02\x01\x01", b"not der at all", b"\x30\x82\xff\xff" + b"A" * 50]
)
def test_garbage_is_malformed(responder: Responder, garbage: bytes) -> None:
    assert responder.answer(garbage).body == MALFORMED_REQUEST


def test_a_response_past_next_update_is_never_served(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, responder: Responder
) -> None:
    row = _issue(session, hierarchy, token, status)
    stale_der = _stored(session, row).der  # type: ignore[union-attr]
    past = datetime.now(UTC) - timedelta(minutes=1)
    session.execute(update(OcspResponse).where(OcspResponse.serial == row.serial).values(next_update=past))
    session.commit()
    answer = responder.answer(_request(*_certificates(hierarchy, row)))
    assert answer.body != stale_der
    assert _verified(answer.body, hierarchy).next_update_utc > datetime.now(UTC)


def test_without_its_store_the_responder_says_try_later(tmp_path: Path) -> None:
    unreachable = Store("postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=1", read_only=True)
    source = CachedSource(StoreSource(unreachable))
    responder = Responder(source, None)
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(b"\x01" * 20, b"\x02" * 20, 7, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    assert responder.answer(der).body == TRY_LATER
    source.close()


def test_with_its_store_lost_only_permanent_revocations_outlive_the_stale_bound(
    store: Store, session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    """The store lost: every cached answer is served while the last confirmation is within the
    stale bound; past it, good and certificateHold (which can still change) are tryLater, a
    permanent revocation is served until its nextUpdate. Uncached ones are tryLater at once."""
    rows = {reason: _issue(session, hierarchy, token, status, cn=f"CP-{n}") for n, reason in enumerate(REASONS)}
    for reason, row in rows.items():
        if reason != "good":
            revoke(Work(session, "test", status=status), serial=row.serial, reason=reason)
    uncached = _issue(session, hierarchy, token, status, cn="CP-NEW")
    now = [0.0]
    reader = Store(str(store.url.render_as_string(hide_password=False)), read_only=True)
    source = CachedSource(StoreSource(reader), stale_bound=10.0, clock=lambda: now[0])
    responder = Responder(source, None)
    try:
        served = {
            reason: responder.answer(_request(*_certificates(hierarchy, row))).body for reason, row in rows.items()
        }
        assert _verified(served["keyCompromise"], hierarchy).certificate_status == ocsp.OCSPCertStatus.REVOKED
        source.close()  # the watcher stops confirming …
        source._watcher.join(timeout=30)  # type: ignore[union-attr]
        source.lost("test")  # … and the store is lost (the circuit is open: no store read follows)
        now[0] = 9.0  # within the bound: everything cached is served
        for reason, row in rows.items():
            assert responder.answer(_request(*_certificates(hierarchy, row))).body == served[reason]
        assert responder.answer(_request(*_certificates(hierarchy, uncached))).body == TRY_LATER
        now[0] = 11.0  # past it
        for reason, row in rows.items():
            expected = served[reason] if reason == "keyCompromise" else TRY_LATER
            assert responder.answer(_request(*_certificates(hierarchy, row))).body == expected, reason
    finally:
        source.close()
        reader.dispose()


REASONS = ("good", "keyCompromise", "certificateHold")


def test_without_its_signer_the_responder_says_try_later(
    store: Store, session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, tmp_path: Path
) -> None:
    leaf, issuer = _certificates(hierarchy, _issue(session, hierarchy, token, status))
    reader = Store(str(store.url.render_as_string(hide_password=False)), read_only=True)
    source = CachedSource(StoreSource(reader))
    responder = Responder(source, SignerClient(tmp_path / "nobody.sock"))
    assert responder.answer(_request(leaf, issuer, hashes.SHA256())).body == TRY_LATER
    assert (
        _verified(responder.answer(_request(leaf, issuer)).body, hierarchy).certificate_status
        == ocsp.OCSPCertStatus.GOOD
    )
    source.close()
    reader.dispose()
