"""The whole bed: PostgreSQL primary and replica, two EST nodes behind HAProxy, two OCSP
responders, two CRL publishers and a client, each on a host (network namespace) of its own, each
chargepki node with its own home and its own copy of the token.

The token: SoftHSM2 has no network mode, so each node gets a copy of the token directory made
after ``init`` (the same keys). A real deployment shares a network HSM instead; keys created later
(a rotated OCSP signer, a new CA) would exist only in the copy of the node that made them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from ca.config import Config, EstSettings, OcspSettings, Pkcs11Settings, find_softhsm_module, write_config
from ca.keys.softhsm import write_softhsm_conf
from tests.helpers import make_csr
from tests.scale.delay_proxy import set_delay
from tests.scale.net import Net, Proc, Processes, run
from tests.scale.postgres import Postgres, check_tools

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CHARGEPKI = [PYTHON, "-c", "from cli.main import main; main()"]
ORG = "Acme Charging"
SERVER_NAME = "est.scale.test"  # the EST service's DNS name: the LB's and both nodes' certificates
TOKEN_LABEL = "scale"
EST_PORT, OCSP_PORT, LB_PORT = 8443, 8081, 8443
# host -> last octet of its address on the bed's /24
HOSTS = {
    "db1": 11,
    "db2": 12,
    "lb": 20,
    "est1": 21,
    "est2": 22,
    "ocsp1": 31,
    "ocsp2": 32,
    "crl1": 41,
    "crl2": 42,
    "client": 50,
}
EST_NODES, OCSP_NODES, CRL_NODES = ("est1", "est2"), ("ocsp1", "ocsp2"), ("crl1", "crl2")
ADMIN_HOST = "est1"  # where the operator's CLI runs (revocations, device registration)


def clean_environment() -> dict[str, str]:
    """This process's environment without chargepki's or SoftHSM's settings: each node reads its home."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CHARGEPKI_", "SOFTHSM2"))}


@dataclass
class Bed:
    directory: Path
    net: Net
    procs: Processes
    pg: Postgres
    homes: dict[str, Path] = field(default_factory=dict)
    services: dict[str, Proc] = field(default_factory=dict)
    issuing: Path | None = None  # the issuing CA's certificate (PEM)
    root: Path | None = None  # the root's (PEM): the clients' trust anchor
    proxies: dict[str, Path] = field(default_factory=dict)  # delay proxy name -> its delay file
    _clients: int = 0  # client runs so far (names their logs and answers)

    # -- running chargepki ---------------------------------------------------------------------
    def cli(
        self, host: str, home: Path, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The CLI on a host, as an operator there would run it."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.net.hosts[host].netns, *CHARGEPKI, "--home", str(home), *args],
            capture_output=True,
            text=True,
            env=clean_environment(),
            cwd=ROOT,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"chargepki {' '.join(args)} on {host} exited {result.returncode}: {result.stdout}{result.stderr}"
            )
        return result

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli(ADMIN_HOST, self.homes["admin"], *args, check=check)

    def client(self, *args: str, timeout: float = 300) -> Any:
        """``tests.scale.client`` on the client host; its JSON answer."""
        return self.client_async(*args)(timeout)

    def client_async(self, *args: str) -> Callable[..., Any]:
        """The same in the background, through the process helper (a process group, a log, killed at
        teardown if still running); call the result to wait for the answer."""
        self._clients += 1
        answer = self.directory / f"client-{self._clients}.json"
        proc = self.procs.start(
            f"client-{self._clients}-{args[0]}",
            self.net.hosts["client"].netns,
            [PYTHON, "-m", "tests.scale.client", "--answer", str(answer), *args],
            env=clean_environment(),
            cwd=ROOT,
        )

        def result(timeout: float = 300) -> Any:
            code = proc.popen.wait(timeout=timeout)
            self.procs.stop(proc)
            if code != 0:
                raise RuntimeError(f"client {args[0]} exited {code}: {proc.tail()}")
            return json.loads(answer.read_text())

        return result

    def start_service(self, name: str, argv: list[str], *, port: int | None = None) -> Proc:
        """A chargepki service of a node (``name`` is the host), ready when its port listens."""
        home = self.homes[name]
        proc = self.procs.start(
            name,
            self.net.hosts[name].netns,
            [*CHARGEPKI, "--home", str(home), *argv],
            env=clean_environment(),
            cwd=ROOT,
        )
        self.services[name] = proc
        if port is not None:
            self.wait_listening(name, port, proc)
        return proc

    def wait_listening(self, host: str, port: int, proc: Proc, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
            listening = self.net.exec(host, "ss", "-Hltn", f"sport = :{port}").stdout
            if listening.strip():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{proc.name} does not listen on {port}: {proc.tail()}")

    def restart_service(self, name: str) -> Proc:
        """The node's service stopped (its whole process group) and started again with the same arguments."""
        old = self.services[name]
        self.procs.stop(old)
        port = {**dict.fromkeys(EST_NODES, EST_PORT), **dict.fromkeys(OCSP_NODES, OCSP_PORT)}.get(name)
        return self.start_service(name, old.argv[len(CHARGEPKI) + 2 :], port=port)

    # -- addresses -----------------------------------------------------------------------------
    @property
    def est_url(self) -> str:
        return f"https://{self.net.address('lb')}:{LB_PORT}/.well-known/est"

    def ocsp_url(self, node: str) -> str:
        return f"http://{self.net.address(node)}:{OCSP_PORT}/ocsp"

    # -- the CA's own view -----------------------------------------------------------------------
    def register(self, prefix: str, count: int) -> Path:
        """``count`` new devices and a one-time secret each; the CSV (serial,secret) for the client."""
        serials = self.directory / f"{prefix}.serials"
        serials.write_text("serial\n" + "".join(f"{prefix}-{i:04d}\n" for i in range(count)))
        self.admin("device", "import", str(serials))
        secrets = self.directory / f"{prefix}.secrets.csv"
        self.admin("token", "issue-batch", "--file", str(serials), "--out", str(secrets))
        return secrets

    def issue(self, name: str) -> tuple[Path, str]:
        """A charger certificate issued by the operator's CLI; its file and hex serial."""
        csr = self.directory / f"{name}.csr"
        csr.write_bytes(make_csr(name, organization=ORG))
        leaf = self.directory / f"{name}.pem"
        result = self.admin("issue", "--profile", "charger", "--csr", str(csr), "--out", str(leaf))
        output = result.stdout + result.stderr
        return leaf, output.split("serial ")[1].split()[0]

    def revoke(self, serial: str, host: str = ADMIN_HOST) -> float:
        """Revoke on ``host`` with the operator's CLI; the wall-clock time its ``main()`` returned,
        right after the commit (an atexit hook stamps it, so interpreter start-up is not counted)."""
        stamped = [
            PYTHON,
            "-c",
            "import atexit, time; atexit.register(lambda: print('returned-at', time.time())); "
            "from cli.main import main; main()",
        ]
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.net.hosts[host].netns,
                *stamped,
                "--home",
                str(self.homes["admin"]),
                "revoke",
                serial,
                "--reason",
                "keyCompromise",
            ],
            capture_output=True,
            text=True,
            env=clean_environment(),
            cwd=ROOT,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"revoke {serial} on {host} failed: {result.stdout}{result.stderr}")
        return float(result.stdout.rsplit("returned-at", 1)[1])

    def crl(self, node: str) -> x509.CertificateRevocationList | None:
        """The issuing CA's CRL as a publisher node last wrote it (None before its first)."""
        assert self.issuing is not None
        issuer = x509.load_pem_x509_certificate(self.issuing.read_bytes()).subject
        for path in (self.homes[node] / "pki").glob("*.crl"):
            crl = x509.load_der_x509_crl(path.read_bytes())
            if crl.issuer == issuer:
                return crl
        return None

    def delay(self, name: str, seconds: float) -> None:
        set_delay(self.proxies[name], seconds)


# -- building it -------------------------------------------------------------------------------
def _create_token(home: Path) -> Pkcs11Settings:
    """The operator's token: SoftHSM2 with random PINs in 0600 files (softhsm2-util, its own process)."""
    conf = write_softhsm_conf(home / "softhsm" / "softhsm2.conf")
    user_pin, so_pin = os.urandom(12).hex(), os.urandom(12).hex()
    for name, pin in (("user.pin", user_pin), ("so.pin", so_pin)):
        descriptor = os.open(home / "softhsm" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(pin + "\n")
    run(
        "softhsm2-util",
        "--init-token",
        "--free",
        "--label",
        TOKEN_LABEL,
        "--pin",
        user_pin,
        "--so-pin",
        so_pin,
        env={**clean_environment(), "SOFTHSM2_CONF": str(conf)},
    )
    return _token_settings(home)


def _token_settings(home: Path) -> Pkcs11Settings:
    return Pkcs11Settings(
        module=find_softhsm_module(),
        token_label=TOKEN_LABEL,
        pin_file=home / "softhsm" / "user.pin",
        softhsm_conf=home / "softhsm" / "softhsm2.conf",
    )


def _node_home(bed: Bed, name: str) -> Path:
    """A node's own home: its own copy of the token, its own addresses, the shared database."""
    home = bed.directory / "homes" / name
    source = bed.homes["admin"] / "softhsm"
    (home / "softhsm").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)
    shutil.copytree(source / "tokens", home / "softhsm" / "tokens")
    for pin in ("user.pin", "so.pin"):
        shutil.copy2(source / pin, home / "softhsm" / pin)
    write_softhsm_conf(home / "softhsm" / "softhsm2.conf")
    bed.homes[name] = home
    configure_node(bed, name)
    return home


def configure_node(bed: Bed, name: str, *, ocsp_reads: str | None = None) -> None:
    """The node's ``chargepki.toml``: the multi-host URL of the cluster; ``ocsp_reads``, where a
    responder reads instead (``[ocsp] database_url``, e.g. a hot standby). Defaults otherwise."""
    address = bed.net.address(name)
    write_config(
        Config(
            home=bed.homes[name],
            database_url=bed.pg.url(),
            pkcs11=_token_settings(bed.homes[name]),
            ocsp_url=f"http://{bed.net.address('ocsp1')}:{OCSP_PORT}/ocsp",
            repository_url=f"http://{bed.net.address('ocsp1')}:{OCSP_PORT}/pki",
            est=EstSettings(host=address, port=EST_PORT, server_names=(SERVER_NAME,), workers=2),
            ocsp=OcspSettings(host=address, port=OCSP_PORT, workers=2, database_url=ocsp_reads),
        )
    )


def _haproxy_config(bed: Bed) -> Path:
    """TLS ends at the balancer (the service certificate), re-encrypted to the nodes, verified
    against the CA; health checks every 500 ms; a failed connection, an empty answer or a
    timed-out one is retried, on another node (``option redispatch``). HAProxy retries a request
    only when it holds all of it: ``option http-buffer-request`` waits for the whole body first.
    A retried enrollment whose first attempt committed gets that certificate again (EST answers
    repeats), so the wider set of docs/deployment.md is safe and the bed uses it."""
    lb = bed.directory / "lb"
    lb.mkdir(mode=0o700)
    est_home = bed.homes["est1"]
    service = (est_home / "est" / "server.pem").read_bytes() + (est_home / "est" / "server.key").read_bytes()
    (lb / "service.pem").write_bytes(service)
    assert bed.root is not None
    verify_name = f"verifyhost {SERVER_NAME} sni str({SERVER_NAME})"
    servers = "".join(f"    server {name} {bed.net.address(name)}:{EST_PORT}\n" for name in EST_NODES)
    config = lb / "haproxy.cfg"
    config.write_text(
        f"""global
    log stdout format raw local0 info
    stats socket {lb}/admin.sock mode 600 level admin
    maxconn 2000

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 60s
    timeout server 5s
    timeout check 2s
    retries 3
    option redispatch 1
    option http-buffer-request
    retry-on conn-failure empty-response response-timeout 503

frontend est
    bind {bed.net.address("lb")}:{LB_PORT} ssl crt {lb}/service.pem
    default_backend est_nodes

backend est_nodes
    balance roundrobin
    option httpchk GET /.well-known/est/cacerts
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 2 ssl verify required ca-file {bed.root} {verify_name}
{servers}"""
    )
    return config


def start_delay_proxy(bed: Bed, name: str, host: str, listen_port: int, target: str) -> str:
    """A delaying TCP proxy on ``host`` (loopback) to ``target``; returns its address. Delay 0 to start."""
    delay_file = bed.directory / f"delay-{name}"
    set_delay(delay_file, 0)
    bed.proxies[name] = delay_file
    proc = bed.procs.start(
        f"delay-{name}",
        bed.net.hosts[host].netns,
        [PYTHON, "-m", "tests.scale.delay_proxy", f"127.0.0.1:{listen_port}", target, str(delay_file)],
        env=clean_environment(),
        cwd=ROOT,
    )
    bed.wait_listening(host, listen_port, proc)
    return f"127.0.0.1:{listen_port}"


def build(bed: Bed) -> None:
    """Everything, in order; the caller has registered the teardown before calling this."""
    check_tools()
    for tool in ("nft", "haproxy", "ss", "softhsm2-util", "runuser"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: `make test-scale` installs it")
    bed.net.create()
    for name, octet in HOSTS.items():
        bed.net.add_host(name, octet)

    pg = bed.pg
    pg.initdb()
    pg.start(pg.primary)
    pg.create_database()
    pg.basebackup_replica()
    pg.start(pg.replica)
    pg.wait_streaming()
    pg.make_synchronous()
    url = pg.url()

    admin = bed.directory / "homes" / "admin"
    (admin / "softhsm").mkdir(parents=True, mode=0o700)
    admin.chmod(0o700)
    bed.homes["admin"] = admin
    write_config(Config(home=admin, database_url=url, pkcs11=_create_token(admin)))
    bed.admin("db", "upgrade")
    ocsp, repository = (f"http://{bed.net.address('ocsp1')}:{OCSP_PORT}{path}" for path in ("/ocsp", "/pki"))
    bed.admin("init", "--org", ORG, "--ocsp-url", ocsp, "--crl-url", repository)
    # The audit key is made by the first checkpoint: made here, before the token is copied to the
    # nodes, or it would exist only in the copy of whichever node checkpointed first.
    bed.admin("audit", "checkpoint")
    chain = bed.admin("ca", "chain").stdout.split("-----END CERTIFICATE-----\n")
    bed.issuing = bed.directory / "issuing.pem"
    bed.issuing.write_text(chain[0] + "-----END CERTIFICATE-----\n")
    bed.root = bed.directory / "root.pem"
    bed.root.write_text(chain[1] + "-----END CERTIFICATE-----\n")
    for name in (*EST_NODES, *OCSP_NODES, *CRL_NODES):
        _node_home(bed, name)

    for name in EST_NODES:
        bed.start_service(name, ["serve", "est", "--direct"], port=EST_PORT)
    lb = _haproxy_config(bed)
    run("haproxy", "-c", "-f", str(lb))
    bed.services["lb"] = bed.procs.start("haproxy", bed.net.hosts["lb"].netns, ["haproxy", "-db", "-f", str(lb)])
    bed.wait_listening("lb", LB_PORT, bed.services["lb"])
    for name in OCSP_NODES:
        bed.start_service(name, ["serve", "ocsp", "--direct"], port=OCSP_PORT)
    for name in CRL_NODES:
        bed.start_service(name, ["crl", "publish", "--watch", "--interval", "5m"])
    wait_for(lambda: any(bed.crl(name) is not None for name in CRL_NODES), "a first CRL (from the publishers' leader)")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60, pause: float = 0.2) -> float:
    """Poll ``condition()`` until true (a generous hang guard, not a timing assertion); seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if condition():
            return time.monotonic() - began
        time.sleep(pause)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")
