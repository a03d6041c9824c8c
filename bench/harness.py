"""What every benchmark needs around the thing it measures: ports, servers, process trees, CPU, memory.

Linux only (it reads /proc). The benchmarks start chargepki (and its peers: cfssl, openssl,
nginx) as child processes on free local ports, wait until they listen, count the CPU time of
the whole server tree (gunicorn's and granian's workers included) and sample its memory.
"""

from __future__ import annotations

import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- commands and ports ----------------------------------------------------------------------------
def chargepki_command(home: Path, *arguments: str) -> list[str]:
    """The chargepki CLI of this checkout, run by this interpreter, on installation ``home``."""
    return [sys.executable, "-m", "cli.main", "--home", str(home), *arguments]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(log: Path, size: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def wait_for(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Until something accepts connections on 127.0.0.1:port; the log's tail if the server exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start: {_tail(log)}")


def wait_for_line(log: Path, process: subprocess.Popen[bytes], marker: str, timeout: float = 60) -> None:
    """Until ``marker`` appears in the server's log (for servers a probe connection would disturb)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if marker in text:
            return
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {text[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"server did not start: {_tail(log)}")


class Processes:
    """Every server a run starts, each in its own process group, so a whole tree is stopped by its group id."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: Sequence[str], log: Path, cwd: Path = ROOT, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            list(command), cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, process_group=0
        )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with suppress(ProcessLookupError):  # workers left behind by a parent that died first
            os.killpg(process.pid, signal.SIGKILL)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in list(reversed(self.running)):
            self.stop(process)


# -- process trees, CPU and memory (/proc) ---------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (gunicorn's and granian's workers, the OCSP signer)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far (those gone are left out)."""
    total = 0
    for pid in pids:
        with suppress(OSError, IndexError, ValueError), open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # utime, stime are fields 14 and 15
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants."""
    return cpu_seconds(descendants(pid))


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine spent so far (all of /proc/stat's cpu line but idle
    and iowait): with a server's own tree, what its clients and its database took beside it."""
    with open("/proc/stat") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / CLOCK_TICKS


def program_cpu_seconds(name: str) -> float:
    """CPU seconds so far of every process whose program is ``name`` (``postgres``: the database's
    backends, WAL writer and checkpointer, whoever started them)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError), open(f"/proc/{entry}/comm") as handle:
                if handle.read().strip() == name:
                    pids.append(int(entry))
    return cpu_seconds(pids)


def tree_cpu_by_kind(pid: int) -> dict[str, float]:
    """``tree_cpu_seconds`` split by what each process is (nginx, python, or its program's name):
    where a service's CPU per request goes between the front door and the workers."""
    split: dict[str, float] = {}
    for each in descendants(pid):
        command = cmdline(each)
        kind = "nginx" if "nginx" in command else "python" if "python" in command else Path(command.split(" ")[0]).name
        split[kind] = split.get(kind, 0.0) + cpu_seconds([each])
    return split


def rss_mb(pid: int) -> float | None:
    """Resident memory in MB, None once the process is gone."""
    with suppress(OSError), open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def cmdline(pid: int) -> str:
    with suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def parent(pid: int) -> int:
    with suppress(OSError, IndexError, ValueError), open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])
    return 0


# -- the machine, for reports ----------------------------------------------------------------------
def machine() -> str:
    """CPUs, memory and kernel of this machine, for a report's first line."""
    model = "unknown CPU"
    with suppress(OSError), open("/proc/cpuinfo") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    with open("/proc/meminfo") as handle:
        total = int(handle.readline().split()[1]) // 1024
    return f"{os.cpu_count()} CPUs ({model}), {total} MB RAM, {platform.system()} {platform.release()}"


def postgres_schema(prefix: str) -> tuple[str, Callable[[], None]] | None:
    """A fresh schema in the test PostgreSQL (``CHARGEPKI_TEST_PG``) and a call that drops it; None
    when the server cannot be reached."""
    import psycopg  # only the PostgreSQL runs need the driver loaded

    admin_url = os.environ.get("CHARGEPKI_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        return None
    schema = f"{prefix}_{secrets.token_hex(4)}"
    admin.execute(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()

    return f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}", drop
