"""What SQLite's writer gate costs a writer that waits: CPU while waiting, and the hand-over.

The lock is held through another open file description (to ``flock``, another process) for 100 ms
while a writer waits at the gate; then released. Reported: the process CPU spent during each wait
(the old gate polled ``LOCK_NB`` every 0.5 ms) and the time from the release to the writer holding
the lock (median and worst of ``--rounds``). Run it against another checkout to compare:

    .venv/bin/python bench/gate_wait.py [--repository PATH] [--rounds 20]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--repository", type=Path, default=Path(__file__).resolve().parent.parent)
parser.add_argument("--rounds", type=int, default=20)
args = parser.parse_args()
sys.path[0] = str(args.repository)

from ca.store.engine import _WriterGate  # noqa: E402


def main() -> None:
    gate = _WriterGate(Path(tempfile.mkdtemp()) / "gate.db", timeout=10)
    other = os.open(gate.path, os.O_RDWR | os.O_CREAT, 0o600)
    cpu, handover = [], []
    acquired: list[float] = []

    def writer() -> None:
        gate.acquire()
        acquired.append(time.monotonic())
        gate.release()

    for _ in range(args.rounds):
        fcntl.flock(other, fcntl.LOCK_EX)
        started = time.process_time()
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.1)
        released = time.monotonic()
        fcntl.flock(other, fcntl.LOCK_UN)
        thread.join()
        cpu.append(time.process_time() - started)
        handover.append(acquired[-1] - released)
    print(
        f"{args.repository}: process CPU per 100 ms wait {statistics.median(cpu) * 1000:.2f} ms; hand-over median "
        f"{statistics.median(handover) * 1e6:.0f} µs, worst {max(handover) * 1e6:.0f} µs; load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
