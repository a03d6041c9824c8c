"""A private PostgreSQL 15 primary and hot-standby replica on loopback for tests: own ``initdb`` run
as the ``postgres`` account in a temporary directory, own ports and socket directory, streaming
replication by ``pg_basebackup -R``. The system's server is never touched."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.est_server import free_port

BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *command], capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Node:
    directory: Path
    port: int
    log: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/{database}", autocommit=True)

    def start(self, sockets: Path) -> None:
        options = f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = _as_postgres(
            str(BIN / "pg_ctl"), "-D", str(self.directory), "-l", str(self.log), "-w", "-o", options, "start"
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start: {done.stderr}{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.directory), "-m", "immediate", "-w", "stop")


class Cluster:
    """A primary and a streaming hot standby of it; ``close`` stops both and removes everything."""

    def __init__(self) -> None:
        if not (BIN / "initdb").exists() or shutil.which("runuser") is None:
            pytest.skip("PostgreSQL 15 binaries or runuser missing: no private cluster here")
        self.root = Path(tempfile.mkdtemp(prefix="chargepki-pg-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        self.primary = Node(self.root / "primary", free_port(), self.root / "primary.log")
        self.standby = Node(self.root / "standby", free_port(), self.root / "standby.log")
        try:
            done = _as_postgres(
                str(BIN / "initdb"), "-D", str(self.primary.directory), "-U", "postgres", "--auth=trust"
            )
            if done.returncode != 0:
                raise RuntimeError(f"initdb: {done.stderr}")
            self.primary.start(self.root)
            done = _as_postgres(
                str(BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
                "-D", str(self.standby.directory), "-R", "-X", "stream",
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"pg_basebackup: {done.stderr}")
            self.standby.start(self.root)
            self._until_streaming()
        except BaseException:
            self.close()
            raise

    def _until_streaming(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.primary.connect() as connection:
                if connection.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone()[
                    0
                ]:
                    return
            time.sleep(0.2)
        raise RuntimeError("the standby never started streaming")

    def close(self) -> None:
        self.standby.stop()
        self.primary.stop()
        shutil.rmtree(self.root, ignore_errors=True)
