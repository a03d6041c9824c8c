"""The EST + CSMS API workers' own metrics: requests by URL rule, method and status, and requests in flight.

Hooked to Flask's request signals by ``serve est``'s workers (``web/server.py``), so the app factory
and the blueprints know nothing of it. The route label is the rule's template
(``/.well-known/est/<label>/simpleenroll``), never the path a client sent; unknown methods are
``other``. The values go to the service's multiprocess directory (``metrics.instruments``).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, request, request_finished, request_started, request_tearing_down

from metrics.instruments import instruments

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def instrument(app: Flask) -> None:
    parts = instruments()
    in_flight = parts.in_flight.labels("est")

    def started(_sender: Any, **_extra: Any) -> None:
        in_flight.inc()

    def finished(_sender: Any, response: Response, **_extra: Any) -> None:
        rule = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        method = request.method if request.method in _METHODS else "other"
        parts.http_requests.labels(rule, method, str(response.status_code)).inc()

    def ended(_sender: Any, **_extra: Any) -> None:
        in_flight.dec()

    request_started.connect(started, app, weak=False)
    request_finished.connect(finished, app, weak=False)
    request_tearing_down.connect(ended, app, weak=False)
