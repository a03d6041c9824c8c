"""A private PostgreSQL 15 primary and streaming replica on two hosts of the bed: own ``initdb`` as
the ``postgres`` user, own data and socket directories, listening on the hosts' addresses; the
replica from ``pg_basebackup -R``. Failover as functions: stop, kill -9, promote, rejoin."""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tests.scale.net import Net, Proc, Processes, run

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PORT = 5432
DATABASE = "chargepki"
ROLE = "chargepki"


@dataclass
class PgNode:
    host: str  # the bed host it runs on
    data: Path
    sockets: Path
    proc: Proc | None = None


class Postgres:
    """Two nodes; ``primary`` names whichever currently accepts writes."""

    def __init__(self, net: Net, procs: Processes, directory: Path, hosts: tuple[str, str]) -> None:
        self.net, self.procs = net, procs
        self.nodes = {
            name: PgNode(name, directory / f"pg-{name}" / "data", directory / f"pg-{name}" / "run") for name in hosts
        }
        self.primary, self.replica = hosts

    def url(self, *, target: str = "read-write") -> str:
        """The multi-host URL every chargepki node uses: libpq tries the hosts in order and keeps
        the first with ``target_session_attrs`` (read-write: the current primary)."""
        hosts = ",".join(self.net.address(name) for name in self.nodes)
        return f"postgresql+psycopg://{ROLE}@{hosts}/{DATABASE}?target_session_attrs={target}"

    def _as_postgres(self, host: str, *argv: str, timeout: float = 120) -> str:
        return self.net.exec(host, "runuser", "-u", "postgres", "--", *argv, timeout=timeout).stdout

    def _directories(self, node: PgNode) -> None:
        for path in (node.data.parent, node.sockets):
            path.mkdir(parents=True, exist_ok=True)
            shutil.chown(path, "postgres", "postgres")
        node.data.parent.chmod(0o700)

    def initdb(self) -> None:
        """The primary's cluster: checksums on (pg_rewind needs them or wal_log_hints), trust on the bed's subnet."""
        node = self.nodes[self.primary]
        self._directories(node)
        self._as_postgres(
            node.host,
            str(PG_BIN / "initdb"),
            "-D",
            str(node.data),
            "-U",
            "postgres",
            "--data-checksums",
            "--auth-local=trust",
            "--auth-host=trust",
            "-E",
            "UTF8",
        )
        subnet = self.net.address(node.host).rsplit(".", 1)[0] + ".0/24"
        with (node.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {subnet} trust\nhost replication all {subnet} trust\n")
        with (node.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "wal_level = replica\nmax_wal_senders = 10\nhot_standby = on\nwal_keep_size = '256MB'\n"
                "shared_buffers = '32MB'\nmax_connections = 200\nlog_line_prefix = '%m [%p] %a '\n"
            )

    def start(self, name: str) -> None:
        node = self.nodes[name]
        options = [
            "-c",
            f"listen_addresses={self.net.address(name)}",
            "-c",
            f"unix_socket_directories={node.sockets}",
            "-c",
            f"port={PORT}",
        ]
        node.proc = self.procs.start(
            f"postgres-{name}",
            self.net.hosts[name].netns,
            [str(PG_BIN / "postgres"), "-D", str(node.data), *options],
            user="postgres",
        )
        self.wait_ready(name)

    def wait_ready(self, name: str, timeout: float = 60) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc is not None and not node.proc.alive():
                raise RuntimeError(f"postgres on {name} exited: {node.proc.tail()}")
            ready = self.net.exec(
                name, str(PG_BIN / "pg_isready"), "-h", self.net.address(name), "-p", str(PORT), "-t", "1", check=False
            )
            if ready.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"postgres on {name} not ready: {node.proc.tail() if node.proc else ''}")

    def psql(self, name: str, sql: str, *, database: str = DATABASE) -> str:
        """One statement over the node's Unix socket; the rows unaligned, one a line."""
        node = self.nodes[name]
        return self.net.exec(
            name,
            str(PG_BIN / "psql"),
            "-h",
            str(node.sockets),
            "-p",
            str(PORT),
            "-U",
            "postgres",
            "-d",
            database,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ).stdout.strip()

    def create_database(self) -> None:
        self.psql(self.primary, f"CREATE ROLE {ROLE} LOGIN", database="postgres")
        self.psql(self.primary, f"CREATE DATABASE {DATABASE} OWNER {ROLE}", database="postgres")

    def basebackup_replica(self) -> None:
        """The replica's data directory from the primary, with ``standby.signal`` and ``primary_conninfo`` (-R)."""
        node = self.nodes[self.replica]
        if node.data.exists():
            shutil.rmtree(node.data)
        self._directories(node)
        self._as_postgres(
            node.host,
            str(PG_BIN / "pg_basebackup"),
            "-h",
            self.net.address(self.primary),
            "-p",
            str(PORT),
            "-U",
            "postgres",
            "-D",
            str(node.data),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        with (node.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                f"primary_conninfo = 'host={self.net.address(self.primary)} port={PORT} user=postgres "
                f"application_name={node.host}'\n"
            )

    def make_synchronous(self) -> None:
        """From now on the primary's commits wait for the standby (restart-free): a commit a client
        saw confirmed is on the replica too, so a kill -9 of the primary loses nothing received."""
        self.psql(self.primary, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        self.psql(self.primary, "SELECT pg_reload_conf()")

    def wait_streaming(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.psql(self.primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") != "0":
                return
            time.sleep(0.2)
        raise RuntimeError("the replica does not stream from the primary")

    def stop(self, name: str) -> None:
        """A clean, fast shutdown (SIGINT)."""
        node = self.nodes[name]
        if node.proc is not None:
            self.procs.stop(node.proc, sig=signal.SIGINT, timeout=30)
            node.proc = None

    def kill(self, name: str) -> None:
        """kill -9 of the postmaster and its backends: a crashed database host."""
        node = self.nodes[name]
        if node.proc is not None:
            self.procs.kill(node.proc)
            node.proc = None

    def promote(self) -> None:
        """The replica becomes the primary (the old primary must be gone first)."""
        node = self.nodes[self.replica]
        self._as_postgres(node.host, str(PG_BIN / "pg_ctl"), "promote", "-w", "-D", str(node.data))
        self.primary, self.replica = self.replica, self.primary
        # Nothing streams from the new primary yet: it must not wait for a standby.
        self.psql(self.primary, "ALTER SYSTEM SET synchronous_standby_names = ''")
        self.psql(self.primary, "SELECT pg_reload_conf()")

    def rejoin(self) -> str:
        """The old primary (stopped) follows the new one: ``pg_rewind`` (it runs crash recovery
        itself after a kill -9), a fresh basebackup when rewinding is refused. Returns which."""
        node = self.nodes[self.replica]
        # A promotion without a checkpoint leaves the new timeline out of the control file, and
        # pg_rewind would find "the same timeline, no rewind required" and leave the old WAL in place.
        self.psql(self.primary, "CHECKPOINT")
        source = f"host={self.net.address(self.primary)} port={PORT} user=postgres dbname=postgres"
        rewound = self.net.exec(
            node.host,
            "runuser",
            "-u",
            "postgres",
            "--",
            str(PG_BIN / "pg_rewind"),
            "--target-pgdata",
            str(node.data),
            "--source-server",
            source,
            "--write-recovery-conf",
            check=False,
            timeout=300,
        )
        how = "pg_rewind"
        if rewound.returncode != 0:
            how = f"basebackup (pg_rewind: {rewound.stderr.strip().splitlines()[-1:]})"
            self.basebackup_replica()
        else:
            with (node.data / "postgresql.auto.conf").open("a") as conf:
                conf.write("synchronous_standby_names = ''\n")
        self.start(self.replica)
        return how

    def in_recovery(self, name: str) -> bool:
        return self.psql(name, "SELECT pg_is_in_recovery()") == "t"


def check_tools() -> None:
    """The PostgreSQL 15 server binaries (Debian's postgresql-15) must be where Debian puts them."""
    missing = [
        tool for tool in ("initdb", "postgres", "pg_basebackup", "pg_rewind", "pg_ctl") if not (PG_BIN / tool).exists()
    ]
    if missing:
        raise RuntimeError(f"PostgreSQL 15 binaries missing in {PG_BIN}: {missing} (apt-get install postgresql-15)")
    run("id", "postgres")
