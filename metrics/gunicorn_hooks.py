"""gunicorn settings of the OCSP responder under gunicorn (``gunicorn -c python:metrics.gunicorn_hooks``):
only the worker-exit hook of the multiprocess metrics. EST sets the same hook in code (web/server.py)."""

from __future__ import annotations

from typing import Any

from metrics.listener import worker_exited


def child_exit(_server: Any, worker: Any) -> None:
    """In gunicorn's master, after a worker exited: its live gauges leave the sums."""
    worker_exited(worker.pid)
