"""chargepki on many hosts: the scenarios of docs/scale-out.md, each with the figure it measured.

One bed for the module (tests/scale/bed.py): PostgreSQL primary + synchronous streaming replica,
two EST nodes behind HAProxy, two OCSP responders, two CRL publishers, a client; each host a
network namespace inside an outer one with no route out. The scenarios run in file order and
share it; the failover comes late and the final accounting last. Figures are printed and written to
``<logs>/figures.json``; timings are never asserted beyond generous hang guards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.scale.bed import Bed, wait_for

pytestmark = pytest.mark.scale
FIGURES: dict[str, Any] = {}


def record(bed: Bed, name: str, **figures: Any) -> None:
    """A scenario's figures: printed (``-s``) and kept in ``<logs>/figures.json`` for docs/scale-out.md."""
    FIGURES[name] = figures
    print(f"\nFIGURE {name}: {json.dumps(figures)}")
    (bed.directory / "logs" / "figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


def test_no_namespace_of_the_bed_has_a_route_out(bed: Bed) -> None:
    bed.net.assert_isolated(None)
    for host in bed.net.hosts:
        bed.net.assert_isolated(host)
    assert bed.net.exec("client", "ping", "-c", "1", "-W", "1", bed.net.address("lb")).returncode == 0
    assert bed.net.exec("client", "ping", "-c", "1", "-W", "1", "1.1.1.1", check=False).returncode != 0


def test_a_revocation_on_one_node_reaches_both_responders_on_other_hosts(bed: Bed) -> None:
    """Both responders have answered (and cached) ``good``; the operator revokes on the EST host;
    each responder says ``revoked`` soon after, through the change signal alone."""
    assert bed.issuing is not None
    leaf, serial = bed.issue("CP-PROPAGATE")
    urls = [bed.ocsp_url(node) for node in ("ocsp1", "ocsp2")]
    ask = ["ask", "--issuer", str(bed.issuing), "--cert", str(leaf)] + [f"--url={url}" for url in urls]
    seen = bed.client(*ask, "--until", "good", "--duration", "30")
    assert set(seen["first"]) == set(urls), seen  # type: ignore[call-overload]
    watching = bed.client_async(*ask, "--until", "revoked", "--duration", "60")
    time.sleep(1.5)  # the client is up and asking (its answers are still good)
    started, finished = bed.revoke(serial)
    seen = watching()
    assert set(seen["first"]) == set(urls), seen
    record(
        bed, "revocation_reaches_responders",
        revoke_command_seconds=round(finished - started, 3),
        revoked_seconds_after_revoke_exited={url: round(first - finished, 3) for url, first in seen["first"].items()},
        answers_before={url: len(answers) for url, answers in seen["answers"].items()},
    )  # fmt: skip
