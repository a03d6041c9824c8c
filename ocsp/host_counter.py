"""The status-feed counter the responder processes of one host have acted on, shared in memory.

Each responder process empties its own cache when it learns that the store's change counter
moved, and processes learn it tens of milliseconds apart. Behind a proxy that spreads one
client's requests over them, a client could be told ``revoked`` by one process and then ``good``
by another that had not yet heard. So a process publishes a counter here *before* it serves
anything read at it, and every request first compares this value with what its own cache
reflects: a process behind empties its cache before answering (one read of shared memory per
request when nothing changed).

The file holds the value and its complement, each an aligned machine word written and read in
one store and one load; a read that meets a pair whose halves disagree (half-written, or a file
something else wrote) is "no news", never a counter to act on. Only ever raised, except by
``reset`` (the store's counter went back: a restored database).

Writers exclude each other with ``flock``, which belongs to an open file description: a process
forked after the counter was opened (an app loaded before its server forks workers) would share
its parent's and exclude nothing, so each process locks through a descriptor it opened itself.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Native ("@"): each value is packed with one 8-byte memcpy, a single store at an aligned offset of
# the page-aligned map (the standard-size forms write byte by byte).
_PAIR = struct.Struct("@QQ")
_MASK = (1 << 64) - 1


class HostCounter:
    """A counter in a small file (0600) mapped by every responder process of the installation."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with _locked(descriptor):
                if os.fstat(descriptor).st_size < _PAIR.size:
                    os.ftruncate(descriptor, _PAIR.size)  # zeros: their halves disagree, so nothing published
            self._map = mmap.mmap(descriptor, _PAIR.size)
        except BaseException:
            os.close(descriptor)
            raise
        self._descriptor = descriptor
        self._pid = os.getpid()
        self._reopening = threading.Lock()
        self.path = path

    def read(self) -> int:
        """The highest counter published, or -1 when there is none (nothing published yet, or a
        half-written pair: the next read sees it whole)."""
        value, check = _PAIR.unpack_from(self._map)
        return value if check == value ^ _MASK else -1

    def publish(self, counter: int) -> None:
        """Raise the shared value to ``counter`` (never lowers it; a negative one means none)."""
        if counter < 0:
            return
        with _locked(self._writer()):
            if counter > self.read():
                _PAIR.pack_into(self._map, 0, counter, counter ^ _MASK)

    def reset(self, counter: int) -> None:
        """Set the shared value to ``counter`` even when lower (the store's counter went back)."""
        if counter < 0:
            return
        with _locked(self._writer()):
            _PAIR.pack_into(self._map, 0, counter, counter ^ _MASK)

    def _writer(self) -> int:
        """The descriptor this process locks through: opened again after a fork, since the inherited
        one shares the parent's open file description, and with it the parent's ``flock``."""
        if self._pid != os.getpid():
            with self._reopening:
                if self._pid != os.getpid():
                    self._reopen()
        return self._descriptor

    def _reopen(self) -> None:
        """A descriptor of this process's own on the very file mapped (even were the path replaced
        since: through /proc; by the path, which only ever names this file, where there is none)."""
        inherited = self._descriptor
        try:
            self._descriptor = os.open(f"/proc/self/fd/{inherited}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            self._descriptor = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._pid = os.getpid()
        os.close(inherited)  # this process's copy only: the parent's lock and file stay

    def close(self) -> None:
        self._map.close()
        os.close(self._descriptor)


@contextmanager
def _locked(descriptor: int) -> Iterator[None]:
    """An exclusive ``flock`` for writers (readers never take it: they check the pair instead)."""
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
