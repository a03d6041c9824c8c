"""The listener process of ``serve est`` / ``serve ocsp`` (started by ``metrics.listener.exporting``).

    python -m metrics.exporter --home HOME --service est|ocsp --fd N

Serves, on the listening socket it inherited as descriptor N: the service's workers' values
(``PROMETHEUS_MULTIPROC_DIR``: their counts, and their token checks) and the store-derived values
of the service (read-only store, cached). It holds no request worker, no token and no PIN; it
ends when its service does (SIGTERM, or its parent gone).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

# Ctrl-C in a terminal reaches the whole process group, and this process may still be importing
# what follows (a second or more on a loaded machine): it then ends quietly, by the signal, instead
# of printing a KeyboardInterrupt traceback into the service's log. main() installs its handler.
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from prometheus_client import CollectorRegistry

from ca.config import load_config, resolve_home
from ca.store.engine import Store
from metrics.instruments import MULTIPROC_ENV
from metrics.listener import Workers, serve_in_thread
from metrics.store import StoreCollector

PARENT_CHECK_SECONDS = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metrics.exporter")
    parser.add_argument("--home", required=True)
    parser.add_argument("--service", choices=["est", "ocsp"], required=True)
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    parent = os.getppid()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    config = load_config(resolve_home(args.home, os.environ), os.environ)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Workers(Path(os.environ[MULTIPROC_ENV])))
    store = Store(config.database_url, read_only=True, settings=config.database)
    registry.register(StoreCollector(args.service, store, cache_seconds=config.metrics.cache_seconds))
    server = serve_in_thread(socket.socket(fileno=args.fd), registry)
    try:
        while not stop.wait(PARENT_CHECK_SECONDS):
            if os.getppid() != parent:
                break  # the service is gone (and its death signal was lost)
    finally:
        server.shutdown()
        server.server_close()
        store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
