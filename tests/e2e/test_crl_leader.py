"""Two real `crl publish --watch` processes sharing one database: one leads and publishes, the other
follows; the leader stopped (SIGSTOP: paused, or cut off, from the others' point of view) is
replaced within the lease and, resumed, neither publishes a CRL numbered after its successor began
nor takes the lease back; the new leader killed (SIGKILL), the old one takes over again. On SQLite
and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from sqlalchemy import select

from ca.store.engine import Store
from ca.store.models import Authority
from tests.conftest import database
from tests.fault_helpers import REPO, embedded_home, service_environment

DEADLINE = 60.0  # a hang guard, not a figure


def _until(condition: Callable[[], object], what: str) -> object:
    end = time.monotonic() + DEADLINE
    while not (result := condition()):
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {DEADLINE} s")
        time.sleep(0.2)
    return result


class Publisher:
    def __init__(self, home: Path, name: str) -> None:
        self.directory = home / f"pki-{name}"
        self.log = home / f"crl-{name}.log"
        command = ["crl", "publish", "--watch", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "--home", str(home), *command],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=service_environment(),
            cwd=REPO,
        )

    def said(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0

    def number(self, ca: str) -> int:
        try:
            crl = x509.load_der_x509_crl((self.directory / f"{ca}.crl").read_bytes())
        except (OSError, ValueError):
            return -1
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(params=["sqlite", "postgresql"])
def installation(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    with database(request.param, tmp_path) as url:
        home = embedded_home(tmp_path / "home", url)
        path = home / "chargepki.toml"
        config = tomllib.loads(path.read_text())
        config["crl"] = {"leader_lease_seconds": 3}
        config["metrics"] = {"enabled": False}
        path.write_text(tomli_w.dumps(config))
        store = Store(url)
        with store.session() as session:
            ca = session.scalar(select(Authority.name).where(Authority.role == "issuing"))
            session.commit()
        store.dispose()
        yield home, str(ca)


def test_the_crl_leader_fails_over_and_a_stale_leader_never_publishes_after_its_successor(
    installation: tuple[Path, str],
) -> None:
    home, ca = installation
    first = Publisher(home, "a")
    second = None
    try:
        _until(lambda: first.said("leading") and first.number(ca) > 0, "the first publisher leads")
        second = Publisher(home, "b")
        _until(lambda: second.said("following"), "the second publisher follows")
        assert second.number(ca) == -1, "a follower publishes nothing"

        os.kill(first.process.pid, signal.SIGSTOP)  # the leader stops answering (paused, or cut off)
        stale = first.number(ca)
        _until(lambda: second.said("leading") and second.number(ca) > stale, "the follower takes over")
        taken_over = second.number(ca)
        os.kill(first.process.pid, signal.SIGCONT)
        _until(lambda: first.said("following"), "the resumed old leader follows")
        assert first.number(ca) < taken_over, "the old leader published nothing numbered after its successor began"
        assert second.said("following") == 1 and first.said("leading") == 1

        second.process.kill()  # the new leader dies without releasing the lease
        second.process.wait()
        _until(lambda: first.said("leading") == 2 and first.number(ca) > taken_over, "the old leader takes over again")
        assert "Traceback" not in first.log.read_text(errors="replace")
    finally:
        first.stop()
        if second is not None:
            second.stop()
