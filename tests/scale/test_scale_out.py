"""chargepki on many hosts: the scenarios of docs/scale-out.md, each with the figure it measured.

One bed for the module (tests/scale/bed.py): PostgreSQL primary + synchronous streaming replica,
two EST nodes behind HAProxy, two OCSP responders, two CRL publishers, a client; each host a
network namespace inside an outer one with no route out. The scenarios run in file order and
share it; the failover comes late and the final accounting last. Figures are printed and written to
``figures.json`` beside the logs (``/tmp/chargepki-scale-last``); timings are never asserted beyond
generous hang guards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ca.config import CrlSettings, DatabaseSettings, OcspSettings
from tests.scale.bed import CRL_NODES, OCSP_NODES, SERVER_NAME, Bed, configure_node, start_delay_proxy, wait_for
from tests.scale.net import netem_available

pytestmark = pytest.mark.scale
FIGURES: dict[str, Any] = {}
STALE_BOUND = OcspSettings().stale_bound_seconds  # the defaults are what the bed runs with
LEASE = CrlSettings().leader_lease_seconds
# The longest a responder's answer may take while its store is lost: a worker opening a new
# connection waits connect_timeout on each host of the multi-host URL, then the read deadline.
HANG_GUARD = DatabaseSettings().connect_timeout_seconds * 2 + OcspSettings().store_timeout_ms / 1000 + 3


def record(bed: Bed, name: str, **figures: Any) -> None:
    """A scenario's figures: printed (``-s``) and kept in ``figures.json`` for docs/scale-out.md."""
    FIGURES[name] = figures
    print(f"\nFIGURE {name}: {json.dumps(figures)}")
    (bed.directory / "logs" / "figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


def test_no_namespace_of_the_bed_has_a_route_out(bed: Bed) -> None:
    """Hosts reach each other over the bridge and nothing else; the kernel's netem is reported
    (absent here: delays go through tests/scale/delay_proxy.py)."""
    record(bed, "kernel", netem=netem_available(bed.net, "client"), hosts=len(bed.net.hosts))
    bed.net.assert_isolated(None)
    for host in bed.net.hosts:
        bed.net.assert_isolated(host)
    assert bed.net.exec("client", "ping", "-c", "1", "-W", "1", bed.net.address("lb")).returncode == 0
    assert bed.net.exec("client", "ping", "-c", "1", "-W", "1", "1.1.1.1", check=False).returncode != 0


def test_the_faults_do_what_they_say(bed: Bed) -> None:
    """Each fault function, checked from the client host against ocsp1 (and ocsp2 untouched)."""
    net = bed.net

    def ping(host: str) -> bool:
        return net.exec("client", "ping", "-c", "1", "-W", "1", net.address(host), check=False).returncode == 0

    def connect(host: str) -> int:
        """124: the TCP handshake hung (a silent drop); 0: connected; 1: refused or unreachable."""
        probe = f"exec 3<>/dev/tcp/{net.address(host)}/8081"
        return net.exec("client", "timeout", "2", "bash", "-c", probe, check=False).returncode

    assert ping("ocsp1") and connect("ocsp1") == 0
    with net.cut_pair("client", "ocsp1"):
        assert not ping("ocsp1") and ping("ocsp2")
        assert connect("ocsp1") == 124  # silent: no RST, no ICMP
    with net.cut("ocsp1"):
        assert not ping("ocsp1") and ping("ocsp2")
    with net.loss(100, "ocsp1"):
        assert not ping("ocsp1") and ping("ocsp2")
    with net.limit_bandwidth("ocsp1", "1mbit"):
        assert "tbf" in net.exec("ocsp1", "tc", "qdisc", "show", "dev", "eth0").stdout
    assert "tbf" not in net.exec("ocsp1", "tc", "qdisc", "show", "dev", "eth0").stdout
    assert ping("ocsp1") and connect("ocsp1") == 0  # every fault healed


def test_a_revocation_on_one_node_reaches_both_responders_on_other_hosts(bed: Bed) -> None:
    """Both responders have answered (and cached) ``good``; the operator revokes on the EST host;
    each responder says ``revoked`` soon after, through the change signal alone."""
    assert bed.issuing is not None
    leaf, serial = bed.issue("CP-PROPAGATE")
    urls = [bed.ocsp_url(node) for node in ("ocsp1", "ocsp2")]
    ask = ["ask", "--issuer", str(bed.issuing), "--cert", str(leaf)] + [f"--url={url}" for url in urls]
    seen = bed.client(*ask, "--until", "good", "--duration", "30")
    assert set(seen["first"]) == set(urls), seen
    watching = bed.client_async(*ask, "--until", "revoked", "--duration", "60")
    time.sleep(1.5)  # the client is up and asking (its answers are still good)
    committed = bed.revoke(serial)
    seen = watching()
    assert set(seen["first"]) == set(urls), seen
    record(
        bed,
        "revocation_reaches_responders",
        seconds_from_commit_to_first_revoked={url: round(first - committed, 3) for url, first in seen["first"].items()},
        questions_asked={url: len(answers) for url, answers in seen["answers"].items()},
    )


RECEIVED: list[int] = []  # serials of every certificate a client or the operator received


def _enroll(
    bed: Bed, prefix: str, count: int, *options: str, interval: float = 0.2, devices: Path | None = None
) -> Callable[[], list[dict[str, Any]]]:
    """``count`` new devices (or those ``devices`` names, registered before) enrolling through the
    balancer from the client host, in the background; each retries twice when no answer came (a
    charger does), with the same key and secret."""
    assert bed.root is not None
    devices = devices or bed.register(prefix, count)
    return bed.client_async(
        "enroll",
        "--url",
        bed.est_url,
        "--server-name",
        SERVER_NAME,
        "--root",
        str(bed.root),
        "--devices",
        str(devices),
        "--out",
        str(bed.directory / "enrolled"),
        "--concurrency",
        "4",
        "--interval",
        str(interval),
        "--retries",
        "2",
        *options,
    )


def _received(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Remember what the client received (for the final accounting); return the failures."""
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
        bed,
        "enrollment_with_one_est_node_cut",
        enrollments=len(results),
        succeeded=len(results) - len(failed),
        cut_for_seconds=round(cut_for, 1),
        slowest_seconds=max(r["seconds"] for r in results),
        median_seconds=sorted(r["seconds"] for r in results)[len(results) // 2],
        retried=sum(r["attempts"] > 1 for r in results),
    )
    assert not failed, failed


def test_bad_weather_loss_and_a_narrow_link_slow_things_down_but_lose_nothing(bed: Bed) -> None:
    """The chargers' side in bad weather: 5 % of the client host's frames dropped at random and its
    link limited to 1 Mbit/s (tc tbf): enrollments still all succeed, and a revocation still reaches
    both responders. (The database network stays clean: there, a lost SYN or two can exceed
    ``connect_timeout`` and fail an operator's command.)"""
    assert bed.issuing is not None
    leaf, serial = bed.issue("CP-WEATHER")
    RECEIVED.append(int(serial, 16))
    urls = [bed.ocsp_url(node) for node in OCSP_NODES]
    devices = bed.register("WEATHER", 10)
    with bed.net.faults() as faults:
        faults.append(bed.net.loss(5, "client"))
        faults.append(bed.net.limit_bandwidth("client", "1mbit"))
        began = time.monotonic()
        failed = _received(_enroll(bed, "WEATHER", 10, interval=0.1, devices=devices)())
        enroll_seconds = time.monotonic() - began
        ask = ["ask", "--issuer", str(bed.issuing), "--cert", str(leaf), "--timeout", "10"]
        watching = bed.client_async(*ask, *(f"--url={url}" for url in urls), "--until", "revoked", "--duration", "60")
        time.sleep(1.5)
        committed = bed.revoke(serial)
        seen = watching()
    record(
        bed,
        "bad_weather",
        enrollments=10,
        failed=len(failed),
        enroll_batch_seconds=round(enroll_seconds, 1),
        seconds_from_commit_to_first_revoked={url: round(t - committed, 3) for url, t in seen["first"].items()},
    )
    assert not failed, failed
    assert set(seen["first"]) == set(urls), seen


def test_an_enrollment_sent_again_after_a_lost_answer_gets_the_same_certificate(bed: Bed) -> None:
    """What a retry through the balancer amounts to when a node issued the certificate but died
    before its answer left: the identical request arrives again, on another node."""
    results = _enroll(bed, "AGAIN", 3, "--again")()
    failed = _received(results)
    assert not failed, failed
    assert [(r["again_status"], r.get("again_serial")) for r in results] == [(200, r["serial"]) for r in results]


def _ocsp_ask(bed: Bed, leaf: Path, *nodes: str) -> list[str]:
    assert bed.issuing is not None
    return ["ask", "--issuer", str(bed.issuing), "--cert", str(leaf), *(f"--url={bed.ocsp_url(n)}" for n in nodes)]


def _cached_good(bed: Bed, name: str) -> tuple[Path, str]:
    """A new certificate both responders have answered ``good`` for (so it is in their caches)."""
    leaf, serial = bed.issue(name)
    RECEIVED.append(int(serial, 16))
    seen = bed.client(*_ocsp_ask(bed, leaf, *OCSP_NODES), "--until", "good", "--duration", "30")
    assert len(seen["first"]) == len(OCSP_NODES), seen
    return leaf, serial


def test_a_responder_cut_off_from_postgresql_says_try_later_within_the_bound_and_never_hangs(bed: Bed) -> None:
    """ocsp2 loses both database hosts silently (nftables drop, no RST) while the client still
    reaches it; the certificate is revoked meanwhile (ocsp1 sees it). ocsp2 may serve its cached
    ``good`` for at most ``[ocsp] stale_bound_seconds`` after it lost the store, then says
    ``tryLater``; no request hangs; once healed it says ``revoked`` by itself."""
    leaf, serial = _cached_good(bed, "CP-PARTITION")
    with bed.net.faults() as faults:
        faults.append(bed.net.cut_pair("ocsp2", "db1"))
        faults.append(bed.net.cut_pair("ocsp2", "db2"))
        cut_at = time.time()
        committed = bed.revoke(serial)
        seen = bed.client(*_ocsp_ask(bed, leaf, "ocsp2"), "--duration", str(STALE_BOUND + 12), "--timeout", "30")
    healed_at = time.time()
    answers = seen["answers"][bed.ocsp_url("ocsp2")]
    recovered = bed.client(*_ocsp_ask(bed, leaf, "ocsp2"), "--until", "revoked", "--duration", "90")
    goods = [started for started, _, status in answers if status == "good"]
    later = [started for started, _, status in answers if status == "try_later"]
    record(
        bed,
        "partitioned_responder",
        stale_bound_seconds=STALE_BOUND,
        revoked_seconds_after_cut=round(committed - cut_at, 2),
        last_good_seconds_after_cut=round(max(goods) - cut_at, 2) if goods else None,
        first_try_later_seconds_after_cut=round(min(later) - cut_at, 2) if later else None,
        slowest_answer_seconds=max(latency for _, latency, _ in answers),
        statuses={status: sum(1 for a in answers if a[2] == status) for status in {a[2] for a in answers}},
        revoked_seconds_after_heal=round(recovered["first"].get(bed.ocsp_url("ocsp2"), float("nan")) - healed_at, 2),
    )
    assert later, "never said tryLater while cut off from the store"
    assert not goods or max(goods) - cut_at <= STALE_BOUND + 3, "served good past the stale bound"
    assert max(latency for _, latency, _ in answers) < HANG_GUARD, "an answer hung"
    assert {status for _, _, status in answers} <= {"good", "try_later", "revoked"}, answers
    assert bed.ocsp_url("ocsp2") in recovered["first"], "still not revoked after the partition healed"


def test_a_short_database_outage_costs_no_try_later_for_cached_certificates(bed: Bed) -> None:
    """The primary stopped for 5 s (a restart): both responders keep answering their cached
    ``good`` throughout; enrollment resumes when it is back."""
    leaf, _ = _cached_good(bed, "CP-OUTAGE")
    asking = bed.client_async(*_ocsp_ask(bed, leaf, *OCSP_NODES), "--duration", "9")
    time.sleep(1)
    bed.pg.stop(bed.pg.primary)
    time.sleep(5)
    bed.pg.start(bed.pg.primary)
    seen = asking()
    bed.pg.wait_streaming()
    failed = _received(_enroll(bed, "AFTER-OUTAGE", 4)())
    statuses = {url: sorted({a[2] for a in answers}) for url, answers in seen["answers"].items()}
    record(bed, "short_database_outage", statuses=statuses, enrollments_after=4, failed_after=len(failed))
    assert all(s == ["good"] for s in statuses.values()), statuses
    assert not failed, failed


def test_a_responder_on_the_hot_standby_hears_of_revocations(bed: Bed) -> None:
    """ocsp2 reads from the replica (``[ocsp] database_url``; a standby accepts no LISTEN, so it
    polls the change counter there); a revocation on the primary reaches it through replication."""
    standby = bed.net.address(bed.pg.replica)
    configure_node(bed, "ocsp2", ocsp_reads=f"postgresql+psycopg://chargepki@{standby}/chargepki")
    bed.restart_service("ocsp2")
    try:
        leaf, serial = _cached_good(bed, "CP-STANDBY")
        watching = bed.client_async(*_ocsp_ask(bed, leaf, *OCSP_NODES), "--until", "revoked", "--duration", "60")
        time.sleep(1.5)
        committed = bed.revoke(serial)
        seen = watching()
    finally:
        configure_node(bed, "ocsp2")
        bed.restart_service("ocsp2")
    record(
        bed,
        "responder_on_hot_standby",
        seconds_from_commit_to_first_revoked={url: round(t - committed, 3) for url, t in seen["first"].items()},
    )
    assert set(seen["first"]) == {bed.ocsp_url(n) for n in OCSP_NODES}, seen


def test_a_slow_database_link_delays_but_does_not_lose_a_revocation(bed: Bed) -> None:
    """ocsp2 reads through a user-space proxy adding 200 ms each way (the kernel has no netem)."""
    proxy = start_delay_proxy(bed, "ocsp2-db", "ocsp2", 15432, f"{bed.net.address(bed.pg.primary)}:5432")
    bed.delay("ocsp2-db", 0.2)
    configure_node(bed, "ocsp2", ocsp_reads=f"postgresql+psycopg://chargepki@{proxy}/chargepki")
    bed.restart_service("ocsp2")
    try:
        leaf, serial = _cached_good(bed, "CP-SLOWLINK")
        watching = bed.client_async(*_ocsp_ask(bed, leaf, *OCSP_NODES), "--until", "revoked", "--duration", "60")
        time.sleep(1.5)
        committed = bed.revoke(serial)
        seen = watching()
    finally:
        configure_node(bed, "ocsp2")
        bed.restart_service("ocsp2")
    record(
        bed,
        "slow_database_link_200ms",
        seconds_from_commit_to_first_revoked={url: round(t - committed, 3) for url, t in seen["first"].items()},
    )
    assert set(seen["first"]) == {bed.ocsp_url(n) for n in OCSP_NODES}, seen


def _crl_numbers(bed: Bed) -> dict[str, int | None]:
    numbers: dict[str, int | None] = {}
    for node in CRL_NODES:
        crl = bed.crl(node)
        numbers[node] = (
            crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number if crl is not None else None
        )
    return numbers


def _listed(bed: Bed, node: str, serial: str) -> bool:
    crl = bed.crl(node)
    return crl is not None and crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


CRL_HISTORY: list[int] = []  # every CRL number seen, in order


def test_one_crl_publisher_writes_at_a_time(bed: Bed) -> None:
    """Two ``crl publish --watch`` on two hosts: a revocation is published by exactly one of them."""
    before = _crl_numbers(bed)
    _, serial = _cached_good(bed, "CP-CRL-ONE")
    committed = bed.revoke(serial)
    waited = wait_for(lambda: any(_listed(bed, n, serial) for n in CRL_NODES), "the revocation in a CRL", 30, 0.05)
    time.sleep(3)  # a second writer would have written by now too
    after = _crl_numbers(bed)
    writers = [node for node in CRL_NODES if after[node] != before[node]]
    CRL_HISTORY.extend(sorted(n for n in after.values() if n is not None))
    record(
        bed,
        "crl_one_writer",
        writers=writers,
        seconds_to_published=round(time.time() - committed - 3, 2),
        waited_seconds=round(waited, 2),
        numbers=after,
    )
    assert len(writers) == 1, (before, after)


def test_the_crl_leader_fails_over_and_numbers_keep_rising(bed: Bed) -> None:
    """The leader's host is cut off; the other publisher takes the lease and publishes the next
    revocation with a higher CRL number. Healed, the old leader writes nothing lower."""
    numbers = _crl_numbers(bed)
    leader = max((n for n in CRL_NODES if numbers[n] is not None), key=lambda n: numbers[n] or 0)
    follower = next(n for n in CRL_NODES if n != leader)
    _, serial = _cached_good(bed, "CP-CRL-FAILOVER")
    with bed.net.cut(leader):
        committed = bed.revoke(serial)
        wait_for(lambda: _listed(bed, follower, serial), f"{follower} publishing after {leader} was cut", 90, 0.1)
        published = time.time() - committed
        taken_over = _crl_numbers(bed)[follower]
    time.sleep(5)  # healed: the old leader finds its lease gone
    final = _crl_numbers(bed)
    record(
        bed,
        "crl_leader_failover",
        leader=leader,
        follower=follower,
        lease_seconds=LEASE,
        seconds_from_commit_to_follower_published=round(published, 2),
        numbers_before=numbers,
        follower_number=taken_over,
        numbers_after_heal=final,
    )
    assert taken_over is not None and taken_over > max(CRL_HISTORY + [n for n in numbers.values() if n]), numbers
    assert all(n is None or n <= max(final.values(), key=lambda v: v or 0) for n in final.values())


def test_revocations_reach_both_responders_through_a_postgresql_failover(bed: Bed) -> None:
    """kill -9 of the primary, ``pg_ctl promote`` of the synchronous replica; every node holds the
    multi-host URL (``target_session_attrs=read-write``) and finds the new primary by itself. A
    revocation after the promotion reaches both responders; enrollment works again; the old
    primary rejoins as a replica (pg_rewind)."""
    leaf, serial = _cached_good(bed, "CP-FAILOVER")
    killed_at = time.monotonic()
    bed.pg.kill(bed.pg.primary)
    bed.pg.promote()
    promoted = time.monotonic() - killed_at
    watching = bed.client_async(*_ocsp_ask(bed, leaf, *OCSP_NODES), "--until", "revoked", "--duration", "90")
    committed = bed.revoke(serial)
    writable = time.monotonic() - killed_at
    seen = watching()
    results = _enroll(bed, "AFTER-FAILOVER", 6)()
    failed = _received(results)
    how = bed.pg.rejoin()
    bed.pg.wait_streaming()
    bed.pg.make_synchronous()
    record(
        bed,
        "postgresql_failover",
        promoted_seconds_after_kill=round(promoted, 2),
        revocation_committed_seconds_after_kill=round(writable, 2),
        seconds_from_commit_to_first_revoked={url: round(t - committed, 3) for url, t in seen["first"].items()},
        enrollments_after=len(results),
        failed_after=len(failed),
        old_primary_rejoined_by=how,
    )
    assert set(seen["first"]) == {bed.ocsp_url(n) for n in OCSP_NODES}, seen
    assert not failed, failed


def test_nothing_was_lost_on_the_promoted_database(bed: Bed) -> None:
    """Every certificate a client or the operator received is stored, signed, and in the audit
    chain on the database that is primary now; no serial twice; ``audit verify`` passes."""
    verified = bed.admin("audit", "verify", check=False)
    pg = bed.pg
    rows = pg.psql(pg.primary, "SELECT serial, status FROM certificates WHERE der IS NOT NULL")
    stored = {int(serial, 16): status for serial, status in (line.split("|") for line in rows.splitlines())}
    issued = pg.psql(pg.primary, "SELECT subject FROM audit_events WHERE action = 'certificate.issued'")
    audited = {int(serial, 16) for serial in issued.split()}
    duplicates = pg.psql(pg.primary, "SELECT count(*) - count(DISTINCT serial) FROM certificates")
    missing = [format(s, "X") for s in RECEIVED if s not in stored]
    unaudited = [format(s, "X") for s in RECEIVED if s not in audited]
    record(
        bed,
        "nothing_lost",
        received=len(RECEIVED),
        stored_with_der=len(stored),
        missing=missing,
        unaudited=unaudited,
        duplicate_serials=int(duplicates),
        audit_verify_exit=verified.returncode,
        primary=pg.primary,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert RECEIVED and not missing and not unaudited and duplicates == "0"
    assert all(stored[s] in ("valid", "revoked") for s in RECEIVED)
