"""Signed checkpoints: a database writer without the token's PIN cannot rewrite the audit log unseen.

Each rewrite below keeps the hash chain itself consistent (``audit.verify`` passes), as someone
with write access to the database could; a signed checkpoint after the edited entry exposes it.
SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ca import audit
from ca.audit import checkpoints
from ca.keys.pkcs11_token import Token
from ca.store.engine import Store
from ca.store.models import AuditCheckpoint, AuditEvent, AuditHead
from cli.main import cli
from tests.conftest import new_token_settings


def _write(session: Session, first: int, last: int) -> None:
    for number in range(first, last + 1):
        audit.record(session, "test.event", actor="tester", subject=f"S{number}", details={"n": number})
    session.commit()


def _rehash_from(session: Session, seq: int) -> None:
    """What a database writer can do: recompute every hash from ``seq`` on and move the head."""
    previous = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == seq - 1)) or audit.GENESIS
    events = session.scalars(select(AuditEvent).where(AuditEvent.seq >= seq).order_by(AuditEvent.seq)).all()
    for event in events:
        event.prev_hash = previous
        event.hash = previous = audit.entry_hash(
            previous, event.seq, event.at, event.actor, event.action, event.subject, event.details
        )
    last = events[-1].seq if events else seq - 1
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=last, hash=previous))
    session.commit()


@pytest.fixture
def checkpointed(session: Session, token: Token, tmp_path: Path) -> Session:
    """Entries 1-10 with a checkpoint at 6 and at 10; the key is made on first use."""
    _write(session, 1, 6)
    assert checkpoints.checkpoint(session, token, tmp_path) is not None
    _write(session, 7, 10)
    assert checkpoints.checkpoint(session, token, tmp_path) is not None
    assert checkpoints.verify(session, lambda: token, tmp_path).ok
    return session


def _broken(session: Session, token: Token, home: Path) -> checkpoints.CheckpointResult:
    assert audit.verify(session).ok, "the rewrite kept the chain consistent: only a checkpoint can see it"
    result = checkpoints.verify(session, lambda: token, home)
    assert not result.ok
    return result


def test_a_checkpoint_is_signed_in_the_token_and_written_outside_the_database(
    checkpointed: Session, token: Token, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [json.loads(line) for line in (tmp_path / checkpoints.FILE_NAME).read_text().splitlines()]
    assert [line["seq"] for line in lines] == [6, 10]
    assert oct((tmp_path / checkpoints.FILE_NAME).stat().st_mode & 0o777) == "0o600"
    attributes = token.key_attributes(checkpoints.AUDIT_KEY_LABEL)
    assert attributes["sensitive"] and not attributes["extractable"] and attributes["never_extractable"]
    assert isinstance(token.public_key(checkpoints.AUDIT_KEY_LABEL), ec.EllipticCurvePublicKey)
    with caplog.at_level("INFO", logger="chargepki.audit"):
        assert checkpoints.checkpoint(checkpointed, token, tmp_path, only_if_advanced=True) is None  # nothing new
        _write(checkpointed, 11, 11)
        made = checkpoints.checkpoint(checkpointed, token, tmp_path, only_if_advanced=True)
    assert made is not None and made.seq == 11
    assert any(json.loads(record.getMessage().split(" ", 2)[2])["seq"] == 11 for record in caplog.records)


def test_deleting_the_tail_and_moving_the_head_back_is_detected(
    checkpointed: Session, token: Token, tmp_path: Path
) -> None:
    checkpointed.execute(delete(AuditEvent).where(AuditEvent.seq > 8))
    checkpointed.execute(delete(AuditCheckpoint).where(AuditCheckpoint.seq > 8))  # the writer hides its traces
    head = checkpointed.scalar(select(AuditEvent.hash).where(AuditEvent.seq == 8))
    checkpointed.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=8, hash=head))
    checkpointed.commit()
    result = _broken(checkpointed, token, tmp_path)  # the file still holds the checkpoint at 10
    assert result.broken_seq == 9 and "entries after 8 were removed" in (result.problem or "")


def test_a_forged_entry_with_everything_after_it_rehashed_is_detected(
    checkpointed: Session, token: Token, tmp_path: Path
) -> None:
    checkpointed.execute(update(AuditEvent).where(AuditEvent.seq == 8).values(details='{"n":99}'))
    checkpointed.commit()
    _rehash_from(checkpointed, 8)
    result = _broken(checkpointed, token, tmp_path)
    assert result.broken_seq == 7 and "an entry from 7 to 10" in (result.problem or ""), result.problem


def test_deleting_renumbering_and_rehashing_is_detected(checkpointed: Session, token: Token, tmp_path: Path) -> None:
    checkpointed.execute(delete(AuditEvent).where(AuditEvent.seq == 4))
    for seq in range(5, 11):
        checkpointed.execute(update(AuditEvent).where(AuditEvent.seq == seq).values(seq=seq - 1))
    checkpointed.commit()
    _rehash_from(checkpointed, 4)
    result = _broken(checkpointed, token, tmp_path)
    assert result.broken_seq == 1 and "an entry from 1 to 6" in (result.problem or ""), result.problem


def test_an_edit_after_the_last_checkpoint_is_not_covered(checkpointed: Session, token: Token, tmp_path: Path) -> None:
    """The limit, stated honestly: entries newer than the last checkpoint are only hash-chained."""
    _write(checkpointed, 11, 12)
    checkpointed.execute(update(AuditEvent).where(AuditEvent.seq == 12).values(details='{"n":99}'))
    checkpointed.commit()
    _rehash_from(checkpointed, 12)
    assert checkpoints.verify(checkpointed, lambda: token, tmp_path).ok


def test_a_checkpoint_forged_in_the_database_is_refused(checkpointed: Session, token: Token, tmp_path: Path) -> None:
    checkpointed.execute(update(AuditCheckpoint).where(AuditCheckpoint.seq == 10).values(hash="0" * 64))
    checkpointed.commit()
    result = checkpoints.verify(checkpointed, lambda: token, tmp_path)
    assert not result.ok and "not signed by the audit key" in (result.problem or "")


def test_racing_first_checkpoints_create_one_audit_key(store: Store, softhsm_conf: Path, tmp_path: Path) -> None:
    """Four processes' first checkpoints at once on a token without the key: one key, four good checkpoints."""
    settings, pin = new_token_settings(softhsm_conf, tmp_path)
    fresh = Token(settings.module, settings.token_label, pin, softhsm_conf=settings.softhsm_conf)
    with store.session() as session:
        _write(session, 1, 3)

    def first(_: int) -> checkpoints.Checkpoint | None:
        with store.session() as session:
            return checkpoints.checkpoint(session, fresh, tmp_path)

    with ThreadPoolExecutor(max_workers=4) as pool:
        made = list(pool.map(first, range(4)))
    assert all(checkpoint is not None for checkpoint in made)
    assert len({checkpoint.key_sha256 for checkpoint in made if checkpoint is not None}) == 1
    fresh.public_key(checkpoints.AUDIT_KEY_LABEL)  # exactly one key: "several keys are labelled" otherwise
    with store.session() as session:
        result = checkpoints.verify(session, lambda: fresh, tmp_path)
    assert result.ok and result.checkpoints == 4


# -- periodic checkpoints: one per interval, however many services write them ----------------------
def test_two_concurrent_periodic_writers_make_one_checkpoint_per_interval(
    store: Store, token: Token, tmp_path: Path
) -> None:
    """Two services (threads with their own connections, as EST workers, the OCSP refresher and
    ``crl publish --watch`` are) try at the same moments, round after round, while the chain grows:
    the head's lock and the last checkpoint's time let exactly one write per interval."""
    interval = timedelta(minutes=5)
    start = datetime.now(UTC)
    rounds = 8
    meet = threading.Barrier(2, timeout=120)  # against a hang only: the outcome is asserted below

    def service(name: str, first: datetime) -> list[int]:
        made = []
        for number in range(rounds):
            moment = first + timedelta(seconds=20 * number)  # every round inside the same interval
            with store.session() as session:
                audit.record(
                    session, "test.event", actor=name, subject=f"{name}-{number}", now=lambda moment=moment: moment
                )
                session.commit()
                meet.wait()
                written = checkpoints.periodic_checkpoint(
                    session, token, tmp_path, interval=interval, now=lambda moment=moment: moment
                )
                if written is not None:
                    made.append(written.seq)
        return made

    def race(first: datetime) -> list[int]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return [seq for made in pool.map(lambda name: service(name, first), ("est", "crl")) for seq in made]

    assert len(race(start)) == 1  # the first interval: one checkpoint of 16 attempts
    assert len(race(start + interval)) == 1  # the next interval: one more
    with store.session() as session:
        rows = session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).all()
        assert len(rows) == 2 and rows[1].at - rows[0].at >= interval
        lines = (tmp_path / checkpoints.FILE_NAME).read_text().splitlines()
        assert [json.loads(line)["seq"] for line in lines] == [row.seq for row in rows]  # file and database agree
        # Nothing new since: a due writer writes nothing either.
        later = start + 3 * interval
        head = session.scalar(select(AuditHead.seq))
        if head == rows[1].seq:
            assert (
                checkpoints.periodic_checkpoint(session, token, tmp_path, interval=interval, now=lambda: later) is None
            )
        assert checkpoints.verify(session, lambda: token, tmp_path).ok
        session.commit()


def test_crl_publish_watch_writes_periodic_checkpoints(home: Path, token: Token) -> None:
    """``crl publish --watch`` (a process of its own) signs a checkpoint of the chain its first pass found."""
    runner = CliRunner()
    assert runner.invoke(cli, ["--home", str(home), "init", "--org", "Acme Charging"]).exit_code == 0
    log = home / "publisher.log"
    publisher = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--home", str(home), "crl", "publish", "--watch", "--interval", "1h"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60  # bounded wait for the first pass; normally a second or two
        while "audit checkpoint at entry" not in log.read_text() and time.monotonic() < deadline:
            if publisher.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        publisher.terminate()
        publisher.wait(timeout=20)
    output = log.read_text(errors="replace")
    assert "audit checkpoint at entry" in output and "Traceback" not in output, output
    lines = (home / checkpoints.FILE_NAME).read_text().splitlines()
    assert len(lines) == 1, lines
    verified = runner.invoke(cli, ["--home", str(home), "audit", "verify"])
    assert verified.exit_code == 0, verified.output


def test_the_checkpoint_interval_is_an_audit_setting(tmp_path: Path) -> None:
    from ca.config import AuditSettings, load_config, write_config
    from ca.errors import ConfigError

    assert load_config(tmp_path, {}).audit == AuditSettings(checkpoint_interval_seconds=300)
    (tmp_path / "chargepki.toml").write_text("[audit]\ncheckpoint_interval_seconds = 60\n")
    config = load_config(tmp_path, {})
    assert config.audit.checkpoint_interval_seconds == 60
    write_config(config)  # kept when the config is written back
    assert load_config(tmp_path, {}).audit.checkpoint_interval_seconds == 60
    for table, message in (
        ("[audit]\ncheckpoint_interval_seconds = 0\n", "audit.checkpoint_interval_seconds must be positive"),
        ("[audit]\ninterval = 5\n", "unknown setting audit.interval"),
    ):
        (tmp_path / "chargepki.toml").write_text(table)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path, {})
