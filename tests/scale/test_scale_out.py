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
from collections.abc import Callable
from typing import Any

import pytest

from tests.scale.bed import OCSP_NODES, SERVER_NAME, Bed, wait_for

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
    committed = bed.revoke(serial)
    seen = watching()
    assert set(seen["first"]) == set(urls), seen
    record(
        bed, "revocation_reaches_responders",
        seconds_from_commit_to_first_revoked={url: round(first - committed, 3) for url, first in seen["first"].items()},
        answers_before={url: len(answers) for url, answers in seen["answers"].items()},
    )  # fmt: skip


RECEIVED: list[int] = []  # serials of every certificate a client or the operator received


def _enroll(bed: Bed, prefix: str, count: int, *, interval: float = 0.2) -> Callable[[], list[dict[str, Any]]]:
    """``count`` new devices enrolling through the balancer from the client host, in the background."""
    assert bed.root is not None
    devices = bed.register(prefix, count)
    return bed.client_async(
        "enroll", "--url", bed.est_url, "--server-name", SERVER_NAME, "--root", str(bed.root),
        "--devices", str(devices), "--out", str(bed.directory / "enrolled"), "--concurrency", "4",
        "--interval", str(interval),
    )  # fmt: skip


def _received(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ok = [r for r in results if r["status"] == 200]
    RECEIVED.extend(int(r["serial"], 16) for r in ok)
    return [r for r in results if r["status"] != 200]


def test_enrollments_through_the_balancer_all_succeed_while_one_est_node_is_cut(bed: Bed) -> None:
    """30 first enrollments, 4 at a time, through HAProxy; est2's link goes down 2 s in and stays
    down: health checks take it out, and what was on its way there is retried on est1."""
    enrolling = _enroll(bed, "LB", 30)
    time.sleep(2)
    began = time.monotonic()
    with bed.net.cut("est2"):
        results = enrolling()
        cut_for = time.monotonic() - began
    failed = _received(results)
    record(
        bed, "enrollment_with_one_est_node_cut",
        enrollments=len(results), succeeded=len(results) - len(failed), cut_for_seconds=round(cut_for, 1),
        slowest_seconds=max(r["seconds"] for r in results),
        median_seconds=sorted(r["seconds"] for r in results)[len(results) // 2],
    )  # fmt: skip
    assert not failed, failed


def test_bad_weather_loss_and_a_narrow_link_slow_things_down_but_lose_nothing(bed: Bed) -> None:
    """5 % of the frames on the bridge dropped at random and the client's link limited to 1 Mbit/s
    (tc tbf): enrollments still all succeed, and a revocation still reaches both responders."""
    assert bed.issuing is not None
    leaf, serial = bed.issue("CP-WEATHER")
    RECEIVED.append(int(serial, 16))
    urls = [bed.ocsp_url(node) for node in OCSP_NODES]
    with bed.net.faults() as faults:
        faults.append(bed.net.loss(5))
        faults.append(bed.net.limit_bandwidth("client", "1mbit"))
        began = time.monotonic()
        failed = _received(_enroll(bed, "WEATHER", 10, interval=0.1)())
        enroll_seconds = time.monotonic() - began
        ask = ["ask", "--issuer", str(bed.issuing), "--cert", str(leaf), "--timeout", "10"]
        watching = bed.client_async(*ask, *(f"--url={url}" for url in urls), "--until", "revoked", "--duration", "60")
        time.sleep(1.5)
        committed = bed.revoke(serial)
        seen = watching()
    record(
        bed, "bad_weather",
        enrollments=10, failed=len(failed), enroll_batch_seconds=round(enroll_seconds, 1),
        seconds_from_commit_to_first_revoked={url: round(t - committed, 3) for url, t in seen["first"].items()},
    )  # fmt: skip
    assert not failed, failed
    assert set(seen["first"]) == set(urls), seen
