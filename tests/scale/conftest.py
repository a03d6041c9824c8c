"""The bed as a module-scoped fixture, torn down first in every path: the finalizer is registered
before anything is created, and it kills every process and deletes every namespace even when the
build failed half-way."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scale.bed import Bed, build
from tests.scale.net import Net, Processes
from tests.scale.postgres import Postgres

LAST_RUN = Path(tempfile.gettempdir()) / "chargepki-scale-last"


def _usable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "the scale-out bed needs root (ip netns, nftables, runuser)"
    if shutil.which("ip") is None:
        return "iproute2 is missing"
    return None


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest) -> Iterator[Bed]:
    if reason := _usable():
        pytest.skip(reason)
    # PostgreSQL runs as `postgres`, which cannot enter pytest's 0700 temporary tree: a directory of our own.
    directory = Path(tempfile.mkdtemp(prefix="chargepki-scale-"))
    directory.chmod(0o711)
    logs = directory / "logs"
    logs.mkdir()
    net = Net(f"cps{secrets.token_hex(3)}")
    procs = Processes(logs)
    bed = Bed(directory, net, procs, Postgres(net, procs, directory, ("db1", "db2")))

    def teardown() -> None:
        procs.stop_all()
        net.destroy()
        # The logs and figures.json outlive the bed (pytest's own temporary tree is pruned by later runs).
        kept = LAST_RUN
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(logs, kept, dirs_exist_ok=True)
        if os.environ.get("CHARGEPKI_SCALE_KEEP") != "1":
            shutil.rmtree(directory, ignore_errors=True)
        print(f"\nscale bed logs and figures: {kept}")

    request.addfinalizer(teardown)
    build(bed)
    yield bed
    dead = [proc.name for proc in procs.running if not proc.alive() and not proc.name.startswith("client-")]
    assert not dead, f"services died during the scenarios: {dead}"
