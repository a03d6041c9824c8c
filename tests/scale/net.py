"""Hosts as network namespaces on one bridge inside an outer namespace with no route out, the one
helper every process of the bed is started through, and the network faults as functions.

Layout: ``<tag>-outer`` holds only a bridge and the bridge-side ends of one veth pair per host;
each host ``<tag>-<name>`` holds the other end (``eth0``, one address of ``SUBNET``) and its
loopback. Nothing connects to the namespace pytest runs in, so no command started here can reach
an address outside the bed (checked with ``ip route get`` before anything starts).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"  # /24; the bed's own, reachable only inside the outer namespace
OUTSIDE = "1.1.1.1"  # any address off the bed: no namespace here may have a route to it
BRIDGE = "br0"
NFT_TABLE = "scale"  # bridge-family table in the outer namespace: the pair cuts and the loss
FORWARD_HOOK = "type filter hook forward priority 0; policy accept;"


def run(*argv: str, check: bool = True, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A short command to completion, its output captured (and shown when ``check`` fails)."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stdout}{result.stderr}")
    return result


# -- processes ---------------------------------------------------------------------------------
@dataclass
class Proc:
    """One long-running process of the bed, in a process group of its own."""

    name: str
    netns: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:] if self.log.exists() else ""


class Processes:
    """Every long-running process of the bed starts here (``ip netns exec``, a new session, a log
    file) and is stopped by its process group, so workers and children go with their parent."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[Proc] = []

    def start(
        self,
        name: str,
        netns: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log = self.logs / f"{name}.log"
        if log.exists():  # a restart keeps the earlier run's log
            log.rename(log.with_suffix(f".{time.monotonic_ns()}.log"))
        command = ["ip", "netns", "exec", netns, *(["runuser", "-u", user, "--"] if user else []), *argv]
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(name, netns, list(argv), popen, log)
        self.running.append(proc)
        return proc

    def send(self, proc: Proc, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def stop(self, proc: Proc, *, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """``sig`` to the whole group, then SIGKILL after ``timeout`` seconds."""
        self.send(proc, sig)
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send(proc, signal.SIGKILL)
            proc.popen.wait(timeout=30)
        self.send(proc, signal.SIGKILL)  # children that outlived their parent
        if proc in self.running:
            self.running.remove(proc)

    def kill(self, proc: Proc) -> None:
        """A crash: SIGKILL to the whole group, nothing gets to clean up."""
        self.stop(proc, sig=signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=10)


# -- the network -------------------------------------------------------------------------------
@dataclass
class Host:
    name: str
    netns: str
    address: str
    veth: str  # the bridge-side end, in the outer namespace


@dataclass
class Fault:
    """A fault in place; ``heal()`` (or leaving the ``with`` block) undoes it."""

    description: str
    undo: list[list[str]] = field(default_factory=list)

    def heal(self) -> None:
        while self.undo:
            run(*self.undo.pop(), check=False)

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.heal()


class Net:
    """The outer namespace, its bridge, the hosts, and the faults between them."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.outer = f"{tag}-outer"
        self.hosts: dict[str, Host] = {}
        self.created: list[str] = []

    def exec(
        self, host: str | None, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A short command inside a host's namespace (``None``: the outer one)."""
        netns = self.outer if host is None else self.hosts[host].netns
        return run("ip", "netns", "exec", netns, *argv, check=check, timeout=timeout)

    def create(self) -> None:
        run("ip", "netns", "add", self.outer)
        self.created.append(self.outer)
        self.exec(None, "ip", "link", "set", "lo", "up")
        self.exec(None, "ip", "link", "add", BRIDGE, "type", "bridge")
        self.exec(None, "ip", "link", "set", BRIDGE, "up")
        run(
            "ip",
            "netns",
            "exec",
            self.outer,
            "nft",
            "-f",
            "-",
            input=f"table bridge {NFT_TABLE} {{\n chain forward {{ {FORWARD_HOOK} }}\n}}\n",
        )
        self.assert_isolated(None)

    def assert_isolated(self, host: str | None) -> None:
        """No route from this namespace to anything off the bed, or the bed must not start."""
        result = self.exec(host, "ip", "route", "get", OUTSIDE, check=False)
        if result.returncode == 0:
            raise RuntimeError(f"namespace {host or self.outer} has a route out: {result.stdout}")
        routes = self.exec(host, "ip", "route", "show").stdout
        if "default" in routes:
            raise RuntimeError(f"namespace {host or self.outer} has a default route: {routes}")

    def add_host(self, name: str, octet: int) -> Host:
        host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{octet}", f"v-{name}"[:15])
        run("ip", "netns", "add", host.netns)
        self.created.append(host.netns)
        self.hosts[name] = host
        self.exec(name, "ip", "link", "set", "lo", "up")
        self.exec(name, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", host.veth)
        self.exec(name, "ip", "link", "set", host.veth, "netns", self.outer)
        self.exec(name, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        self.exec(name, "ip", "link", "set", "eth0", "up")
        self.exec(None, "ip", "link", "set", host.veth, "master", BRIDGE)
        self.exec(None, "ip", "link", "set", host.veth, "up")
        self.assert_isolated(name)
        return host

    def address(self, name: str) -> str:
        return self.hosts[name].address

    def destroy(self) -> None:
        """Every namespace this bed created, whatever state it is in (processes are gone by now)."""
        for netns in reversed(self.created):
            run("ip", "netns", "del", netns, check=False)
        self.created.clear()

    # -- faults --------------------------------------------------------------------------------
    def _outer(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.outer, *argv]

    def cut(self, name: str) -> Fault:
        """The host's link goes down: everything to and from it is lost (a dead NIC or switch port)."""
        veth = self.hosts[name].veth
        run(*self._outer("ip", "link", "set", veth, "down"))
        return Fault(f"{name} cut off", [self._outer("ip", "link", "set", veth, "up")])

    def _rule(self, fault: Fault, expression: str) -> None:
        """One nftables rule on the bridge; its removal is queued on ``fault``."""
        added = run(*self._outer("nft", "-e", "-a", "add", "rule", "bridge", NFT_TABLE, "forward", *expression.split()))
        handle = added.stdout.rsplit("# handle", 1)[1].split()[0]
        fault.undo.append(self._outer("nft", "delete", "rule", "bridge", NFT_TABLE, "forward", "handle", handle))

    def _fault(self, description: str, *expressions: str) -> Fault:
        """A fault of nftables rules on the bridge, all or none (a rule that fails removes the others)."""
        fault = Fault(description)
        try:
            for expression in expressions:
                self._rule(fault, expression)
        except BaseException:
            fault.heal()
            raise
        return fault

    def cut_pair(self, first: str, second: str) -> Fault:
        """Packets between two hosts silently dropped in both directions (no RST, no ICMP): a partition."""
        a, b = self.address(first), self.address(second)
        return self._fault(
            f"{first} and {second} partitioned", f"ip saddr {a} ip daddr {b} drop", f"ip saddr {b} ip daddr {a} drop"
        )

    def loss(self, percent: int, host: str | None = None) -> Fault:
        """``percent`` % of the frames on the bridge (or to and from ``host``) dropped at random."""
        chance = "" if percent >= 100 else f"numgen random mod 100 < {percent} "
        if host is None:
            return self._fault(f"{percent}% loss", f"{chance}drop")
        address = self.address(host)
        return self._fault(
            f"{percent}% loss at {host}", f"ip saddr {address} {chance}drop", f"ip daddr {address} {chance}drop"
        )

    def limit_bandwidth(self, name: str, rate: str = "1mbit") -> Fault:
        """A token bucket (tc tbf) on both ends of the host's link: ``rate`` each way."""
        host = self.hosts[name]
        fault = Fault(f"{name} limited to {rate}")
        tbf = ("tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
        try:
            run("ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf)
            fault.undo.append(["ip", "netns", "exec", host.netns, "tc", "qdisc", "del", "dev", "eth0", "root"])
            run(*self._outer("tc", "qdisc", "add", "dev", host.veth, "root", *tbf))
            fault.undo.append(self._outer("tc", "qdisc", "del", "dev", host.veth, "root"))
        except BaseException:
            fault.heal()
            raise
        return fault

    @contextlib.contextmanager
    def faults(self) -> Iterator[list[Fault]]:
        """A scope whose faults all heal when it ends, passed or failed."""
        active: list[Fault] = []
        try:
            yield active
        finally:
            for fault in reversed(active):
                fault.heal()


def netem_available(net: Net, host: str) -> bool:
    """Whether this kernel has netem (it usually has not here: delays go through ``delay_proxy``)."""
    netns = net.hosts[host].netns
    added = run(
        "ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False
    )
    if added.returncode == 0:
        run("ip", "netns", "exec", netns, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    return added.returncode == 0
