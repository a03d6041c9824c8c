"""Where chargepki keeps its state and how it reaches its database and PKCS#11 token.

Everything lives under one home directory (``--home`` / ``CHARGEPKI_HOME``, default
``./var``): ``chargepki.toml``, the SQLite database and, for the embedded default, a
SoftHSM2 token directory with its own ``softhsm2.conf``. Any module, token and SQLAlchemy
URL can be configured instead. The PIN is read from an environment variable or a file at
run time; it is never a command-line argument and never stored in the database.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import tomli_w

from ca.errors import ConfigError

CONFIG_NAME = "chargepki.toml"
DEFAULT_TOKEN_LABEL = "chargepki"
PIN_ENV = "CHARGEPKI_PKCS11_PIN"
DEFAULT_OCSP_URL = "http://127.0.0.1:8081/ocsp"
DEFAULT_REPOSITORY_URL = "http://127.0.0.1:8081/pki"
_T = TypeVar("_T")

# Where Debian, Fedora and Homebrew put SoftHSM2's module.
SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def find_softhsm_module() -> str:
    """The first SoftHSM2 module on this machine, or the Debian path (to name in errors)."""
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return SOFTHSM_MODULE_CANDIDATES[0]


@dataclass(frozen=True)
class Pkcs11Settings:
    """How to reach the token; ``embedded`` means this home created it and may create it."""

    module: str
    token_label: str
    pin_file: Path | None
    pin_env: str = PIN_ENV
    softhsm_conf: Path | None = None
    embedded: bool = False

    def read_pin(self, environ: Mapping[str, str]) -> str:
        """The user PIN from the environment variable, else from the PIN file."""
        pin = environ.get(self.pin_env)
        if pin:
            return pin
        if self.pin_file is not None:
            try:
                pin = self.pin_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read PIN file {self.pin_file}: {exc.strerror}") from None
            if pin:
                return pin
            raise ConfigError(f"PIN file {self.pin_file} is empty")
        raise ConfigError(f"no PKCS#11 PIN: set {self.pin_env} or pkcs11.pin_file in {CONFIG_NAME}")


@dataclass(frozen=True)
class DatabaseSettings:
    """How every PostgreSQL connection bounds its waits (``[database]``, beside ``url``).

    A server that stopped answering (a silent partition, a crashed host) must fail a request within
    seconds instead of hanging it: libpq's ``connect_timeout``, TCP keepalives on idle connections,
    ``tcp_user_timeout`` on unacknowledged writes, and server-side statement and lock timeouts. A
    parameter the URL sets itself wins over these (an operator's explicit choice). SQLite ignores
    them: its lock wait is the URL's ``?timeout=`` seconds.
    """

    connect_timeout_seconds: int = 5  # libpq connect_timeout, per host of a multi-host URL
    statement_timeout_ms: int = 15_000  # server-side; 0 = none (migrations always run without)
    lock_timeout_ms: int = 10_000  # a row or table lock waited for longer fails the statement; 0 = none
    tcp_user_timeout_ms: int = 5_000  # data sent but unacknowledged this long: the connection is dead
    keepalives_idle_seconds: int = 5  # an idle connection is probed after this long …
    keepalives_interval_seconds: int = 2  # … every this many seconds …
    keepalives_count: int = 3  # … and declared dead after this many unanswered probes


@dataclass(frozen=True)
class EstSettings:
    """The EST service (``[est]`` in the config file)."""

    host: str = "127.0.0.1"
    port: int = 8443
    tls: bool = True  # false only behind a TLS-terminating proxy on a trusted network
    workers: int = 2
    server_names: tuple[str, ...] = ("localhost",)  # DNS names of the service's TLS certificate
    default_environment: str | None = None  # for /.well-known/est/ without a label
    supersede_grace_seconds: int = 0  # re-enrollment: revoke the old certificate after this long
    require_tls_unique: bool = False  # RFC 7030 §3.5 channel binding mandatory
    # Behind a TLS-terminating proxy (opt-in): the client certificate comes from this header, URL-encoded
    # PEM as nginx's $ssl_client_escaped_cert, and only from these proxy addresses.
    client_cert_header: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    # Failed authentications (wrong secret, refused client certificate) counted in the database, so
    # every worker and process shares them: this many within the window lock the device (username or
    # certificate CN) or the client address out for auth_lockout_seconds (HTTP 429). 0 switches one off.
    auth_max_failures_per_device: int = 5
    auth_max_failures_per_address: int = 50
    auth_failure_window_seconds: int = 900
    auth_lockout_seconds: int = 900
    # A connection silent (or not reading) this long in the middle of a request is closed (slowloris).
    request_timeout_seconds: int = 10
    # OPCP-compatible CPO EST for CSMSs with a Hubject provider (web/opcp.py): {base}/cpo/simpleenroll/…
    # and {base}/cpo/cacerts/… under each of these bases ("": the host root); an empty list turns it off.
    opcp_bases: tuple[str, ...] = ("", "/.well-known")


@dataclass(frozen=True)
class OcspSettings:
    """The OCSP responder, its on-demand signer and the refresher (``[ocsp]`` in the config file)."""

    host: str = "127.0.0.1"
    port: int = 8081
    workers: int = 2
    server: str = "granian"  # granian | gunicorn
    path: str = "/ocsp"  # must match the path of the OCSP URL in the certificates' AIA
    repository_path: str = "/pki"  # the publication directory (CRLs, CA certificates) served here too
    validity_hours: int = 24  # nextUpdate - thisUpdate of every response; re-signed at half-life
    max_age_seconds: int = 3600  # Cache-Control max-age cap (never beyond nextUpdate)
    presign_hashes: tuple[str, ...] = ("sha1",)  # CertID hashes signed ahead; others on first request
    cache_entries: int = 50_000  # per responder worker: responses, and as many requests remembered by their bytes
    signer_socket: str | None = None  # default <home>/run/ocsp-signer.sock
    unknown_per_second: int = 100  # on-demand signing budget of the signer (unknown serials etc.)
    refresh_interval_seconds: int = 300
    signer_validity_days: int = 30  # delegated signer certificates, rotated when a third is left
    request_timeout_seconds: int = 10  # to read a request's headers (granian), or per read/write (gunicorn)
    # The store lost (stopped, partitioned): a cached good is served at most this long after the last
    # moment the responder knew its cache current, then tryLater; permanent revocations until nextUpdate.
    stale_bound_seconds: int = 10
    store_timeout_ms: int = 2000  # a responder's read of the store taking longer fails (tryLater)
    standby_poll_ms: int = 500  # on a hot standby (no LISTEN there): how often the change counter is read
    # Where the keyless responder reads (e.g. a hot standby on this host); default [database] url.
    # The on-demand signer and everything else write through [database] url.
    database_url: str | None = None


@dataclass(frozen=True)
class FrontDoorSettings:
    """The reverse proxy (Debian's nginx) in front of EST, the CSMS API and OCSP (``[front_door]``).

    ``mode = "nginx"`` (the default): nginx listens on ``est.host:est.port`` and
    ``ocsp.host:ocsp.port``, buffers whole requests and responses, enforces the limits below and
    forwards to the application servers over Unix sockets in ``<home>/run``. ``"direct"``: the
    application servers listen themselves (needed for RFC 7030 tls-unique, which no proxy carries).
    """

    mode: str = "nginx"  # nginx | direct
    nginx: str = "nginx"  # the binary: a path, or a name looked up in PATH, /usr/sbin and /sbin
    worker_processes: int = 2
    worker_connections: int = 4096  # per nginx worker: idle connections cost nginx memory, not threads
    connections_per_address: int = 64  # EST/API: concurrent connections from one client address (429 beyond)
    requests_per_second: int = 200  # EST/API: per client address, with a burst of the same size (429 beyond)
    # OCSP's relying parties (a CSMS's TLS terminator checking every charger handshake) ask from one
    # address at line rate, and every answer is pre-signed: a wide connection limit, no rate limit (0).
    ocsp_connections_per_address: int = 1024
    ocsp_requests_per_second: int = 0
    header_timeout_seconds: int = 10  # to send the request head
    body_timeout_seconds: int = 10  # between two reads of the body
    send_timeout_seconds: int = 10  # between two writes of the response
    keepalive_timeout_seconds: int = 15  # an idle keep-alive connection is closed after this
    verify_client_certificates: bool = True  # EST/API: ask for (optional) client certificates
    # When chargepki runs as root, nginx's workers run as this account ("": the home's owner when that is
    # not root, else nobody); they reach only the application sockets (home and run dir 0710 for its group).
    user: str = ""
    log_max_megabytes: int = 64  # access.log / error.log are rotated to .1 beyond this (nginx reopens them)


@dataclass(frozen=True)
class CrlSettings:
    """The CRL publishers (``[crl]``): ``crl publish --watch`` on several hosts elects one writer."""

    # The writer's lease (crl/leader.py): renewed every third of it; a follower takes over at most
    # this long (plus a second) after the leader's last renewal when the leader died or was cut off.
    # Keep it above the longest publication pass, or a slow pass loses the lease half way.
    leader_lease_seconds: int = 15


@dataclass(frozen=True)
class AuditSettings:
    """The audit log (``[audit]`` in the config file)."""

    # A signed checkpoint of the chain head at most this often, and at least this often while the
    # chain grows and a long-running service (EST, the OCSP refresher, crl publish --watch) runs:
    # entries newer than the last checkpoint are only hash-chained, so this is the window of exposure.
    checkpoint_interval_seconds: int = 300


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus metrics listeners (``[metrics]``): one per service, loopback only by default,
    each served by a process or thread of its own, never by the request workers (docs/metrics.md)."""

    enabled: bool = True
    address: str = "127.0.0.1"  # never behind the front door; expose further on purpose only
    est_port: int = 9810  # serve est
    ocsp_port: int = 9811  # serve ocsp (the responder, its workers and its signer)
    crl_port: int = 9812  # crl publish --watch
    # Store-derived values (expiring certificates, lockouts, campaigns, OCSP and CRL freshness) are
    # computed at a scrape at most this often; scrapes in between get the last values.
    cache_seconds: int = 15

    def port(self, service: str) -> int:
        return {"est": self.est_port, "ocsp": self.ocsp_port, "crl": self.crl_port}[service]


@dataclass(frozen=True)
class ConsoleSettings:
    """The read-only fleet console (``[console]``): its own HTTPS listener, loopback by default."""

    enabled: bool = True  # started by `chargepki run`
    host: str = "127.0.0.1"  # an admin listener: expose further on purpose only
    port: int = 8444
    workers: int = 1
    threads: int = 4
    session_minutes: int = 30  # a session opened by a login link ends this long after the login
    login_link_minutes: int = 10  # a login link printed by `console login-link` is usable this long, once
    # The origin printed in login links (default https://<est.server_names[0]>:<port>).
    public_url: str | None = None
    request_timeout_seconds: int = 10  # a connection stalled mid-request is closed (slowloris)


@dataclass(frozen=True)
class Config:
    home: Path
    database_url: str
    pkcs11: Pkcs11Settings
    database: DatabaseSettings = DatabaseSettings()
    ocsp_url: str = DEFAULT_OCSP_URL
    repository_url: str = DEFAULT_REPOSITORY_URL
    est: EstSettings = EstSettings()
    ocsp: OcspSettings = OcspSettings()
    front_door: FrontDoorSettings = FrontDoorSettings()
    crl: CrlSettings = CrlSettings()
    audit: AuditSettings = AuditSettings()
    metrics: MetricsSettings = MetricsSettings()
    console: ConsoleSettings = ConsoleSettings()

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_NAME


def resolve_home(home: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    """``--home`` wins over ``CHARGEPKI_HOME``, which wins over ``./var``."""
    chosen = home if home is not None else environ.get("CHARGEPKI_HOME") or "var"
    return Path(chosen).expanduser().absolute()


def embedded_defaults(home: Path) -> Config:
    """SQLite and a SoftHSM2 token, both inside the home."""
    return Config(
        home=home,
        database_url=f"sqlite:///{home / 'chargepki.db'}",
        pkcs11=Pkcs11Settings(
            module=find_softhsm_module(),
            token_label=DEFAULT_TOKEN_LABEL,
            pin_file=home / "softhsm" / "user.pin",
            softhsm_conf=home / "softhsm" / "softhsm2.conf",
            embedded=True,
        ),
    )


def _path(home: Path, value: object, key: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{CONFIG_NAME}: {key} must be a non-empty string")
    path = Path(value).expanduser()
    return path if path.is_absolute() else home / path


def _string(table: Mapping[str, object], key: str, default: str, where: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{CONFIG_NAME}: {where}.{key} must be a non-empty string")
    return value


def load_config(home: Path, environ: Mapping[str, str]) -> Config:
    """Read ``chargepki.toml`` (absent: embedded defaults), then apply environment overrides."""
    config = embedded_defaults(home)
    path = home / CONFIG_NAME
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        config = _apply_file(config, data)
    return _apply_environment(config, environ)


def _apply_file(config: Config, data: Mapping[str, object]) -> Config:
    home = config.home
    database = data.get("database", {})
    pkcs11 = data.get("pkcs11", {})
    urls = data.get("urls", {})
    for name, table in (("database", database), ("pkcs11", pkcs11), ("urls", urls)):
        if not isinstance(table, dict):
            raise ConfigError(f"{CONFIG_NAME}: [{name}] must be a table")
    defaults = config.pkcs11
    embedded = pkcs11.get("embedded", defaults.embedded)
    if not isinstance(embedded, bool):
        raise ConfigError(f"{CONFIG_NAME}: pkcs11.embedded must be true or false")
    settings = Pkcs11Settings(
        module=_string(pkcs11, "module", defaults.module, "pkcs11"),
        token_label=_string(pkcs11, "token_label", defaults.token_label, "pkcs11"),
        pin_env=_string(pkcs11, "pin_env", defaults.pin_env, "pkcs11"),
        pin_file=_path(
            home,
            pkcs11.get("pin_file", str(defaults.pin_file) if defaults.pin_file else None),
            "pkcs11.pin_file",
        ),
        softhsm_conf=_path(
            home,
            pkcs11.get("softhsm_conf", str(defaults.softhsm_conf) if defaults.softhsm_conf else None),
            "pkcs11.softhsm_conf",
        ),
        embedded=embedded,
    )
    return replace(
        config,
        database=_database_settings({key: value for key, value in database.items() if key != "url"}),
        est=_est_settings(data.get("est", {})),
        ocsp=_ocsp_settings(data.get("ocsp", {})),
        front_door=_front_door_settings(data.get("front_door", {})),
        crl=_crl_settings(data.get("crl", {})),
        audit=_audit_settings(data.get("audit", {})),
        metrics=_metrics_settings(data.get("metrics", {})),
        console=_console_settings(data.get("console", {})),
        database_url=_string(database, "url", config.database_url, "database"),
        pkcs11=settings,
        ocsp_url=_string(urls, "ocsp", config.ocsp_url, "urls"),
        repository_url=_string(urls, "repository", config.repository_url, "urls"),
    )


_DATABASE_TYPES: dict[str, type] = {name: int for name in DatabaseSettings.__dataclass_fields__}
_EST_TYPES: dict[str, type] = {
    "host": str,
    "port": int,
    "tls": bool,
    "workers": int,
    "server_names": list,
    "default_environment": str,
    "supersede_grace_seconds": int,
    "require_tls_unique": bool,
    "client_cert_header": str,
    "trusted_proxies": list,
    "auth_max_failures_per_device": int,
    "auth_max_failures_per_address": int,
    "auth_failure_window_seconds": int,
    "auth_lockout_seconds": int,
    "request_timeout_seconds": int,
    "opcp_bases": list,
}
_OCSP_TYPES: dict[str, type] = {
    "host": str,
    "port": int,
    "workers": int,
    "server": str,
    "path": str,
    "repository_path": str,
    "validity_hours": int,
    "max_age_seconds": int,
    "presign_hashes": list,
    "cache_entries": int,
    "signer_socket": str,
    "unknown_per_second": int,
    "refresh_interval_seconds": int,
    "signer_validity_days": int,
    "request_timeout_seconds": int,
    "stale_bound_seconds": int,
    "store_timeout_ms": int,
    "standby_poll_ms": int,
    "database_url": str,
}


_FRONT_DOOR_TYPES: dict[str, type] = {
    "mode": str,
    "nginx": str,
    "worker_processes": int,
    "worker_connections": int,
    "connections_per_address": int,
    "requests_per_second": int,
    "ocsp_connections_per_address": int,
    "ocsp_requests_per_second": int,
    "header_timeout_seconds": int,
    "body_timeout_seconds": int,
    "send_timeout_seconds": int,
    "keepalive_timeout_seconds": int,
    "verify_client_certificates": bool,
    "user": str,
    "log_max_megabytes": int,
}


_AUDIT_TYPES: dict[str, type] = {"checkpoint_interval_seconds": int}
_CRL_TYPES: dict[str, type] = {"leader_lease_seconds": int}
_OPCP_BASE = re.compile(r"(/[A-Za-z0-9._~-]+)+")
_METRICS_TYPES: dict[str, type] = {
    "enabled": bool,
    "address": str,
    "est_port": int,
    "ocsp_port": int,
    "crl_port": int,
    "cache_seconds": int,
}


_CONSOLE_TYPES: dict[str, type] = {
    "enabled": bool,
    "host": str,
    "port": int,
    "workers": int,
    "threads": int,
    "session_minutes": int,
    "login_link_minutes": int,
    "public_url": str,
    "request_timeout_seconds": int,
}


def _table_settings(table: object, name: str, defaults: _T, types: Mapping[str, type]) -> _T:
    """A settings dataclass from a TOML table, refusing unknown keys and wrong types by name."""
    if not isinstance(table, dict):
        raise ConfigError(f"{CONFIG_NAME}: [{name}] must be a table")
    values: dict[str, object] = {}
    for key, value in table.items():
        if key not in types:
            raise ConfigError(f"{CONFIG_NAME}: unknown setting {name}.{key}")
        if not isinstance(value, types[key]) or (types[key] is int and isinstance(value, bool)):
            raise ConfigError(f"{CONFIG_NAME}: {name}.{key} must be of type {types[key].__name__}")
        if types[key] is list:
            if not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{CONFIG_NAME}: {name}.{key} must be a list of strings")
            value = tuple(value)
        values[key] = value
    return replace(defaults, **values)  # type: ignore[type-var]


def _database_settings(table: object) -> DatabaseSettings:
    settings = _table_settings(table, "database", DatabaseSettings(), _DATABASE_TYPES)
    positive = ("connect_timeout_seconds", "keepalives_idle_seconds", "keepalives_interval_seconds", "keepalives_count")
    for key in positive:
        if getattr(settings, key) <= 0:
            raise ConfigError(f"{CONFIG_NAME}: database.{key} must be positive")
    for key in ("statement_timeout_ms", "lock_timeout_ms", "tcp_user_timeout_ms"):
        if getattr(settings, key) < 0:
            raise ConfigError(f"{CONFIG_NAME}: database.{key} must be 0 (none) or positive")
    return settings


def _est_settings(table: object) -> EstSettings:
    settings = _table_settings(table, "est", EstSettings(), _EST_TYPES)
    for key in ("auth_max_failures_per_device", "auth_max_failures_per_address"):
        if getattr(settings, key) < 0:
            raise ConfigError(f"{CONFIG_NAME}: est.{key} must be 0 (off) or positive")
    for key in ("auth_failure_window_seconds", "auth_lockout_seconds", "workers", "request_timeout_seconds"):
        if getattr(settings, key) <= 0:
            raise ConfigError(f"{CONFIG_NAME}: est.{key} must be positive")
    bases = tuple(base.rstrip("/") for base in settings.opcp_bases)  # "/" is the host root, as ""
    for base in bases:
        if (base and not _OPCP_BASE.fullmatch(base)) or base == "/api" or base.startswith("/api/"):
            raise ConfigError(
                f"{CONFIG_NAME}: est.opcp_bases: {base!r} must be empty (the host root) or a path such as "
                '"/.well-known" (letters, digits, ".", "_", "~", "-" between slashes), outside /api'
            )
    if len(set(bases)) != len(bases):
        raise ConfigError(f"{CONFIG_NAME}: est.opcp_bases lists a base twice")
    return replace(settings, opcp_bases=bases)


def _ocsp_settings(table: object) -> OcspSettings:
    settings = _table_settings(table, "ocsp", OcspSettings(), _OCSP_TYPES)
    unknown = set(settings.presign_hashes) - {"sha1", "sha256", "sha384", "sha512"}
    if unknown or not settings.presign_hashes:
        raise ConfigError(f"{CONFIG_NAME}: ocsp.presign_hashes must list some of sha1, sha256, sha384, sha512")
    if settings.server not in ("granian", "gunicorn"):
        raise ConfigError(f"{CONFIG_NAME}: ocsp.server must be granian or gunicorn")
    if not settings.path.startswith("/") or not settings.repository_path.startswith("/"):
        raise ConfigError(f"{CONFIG_NAME}: ocsp.path and ocsp.repository_path must start with /")
    for key in (
        "validity_hours",
        "max_age_seconds",
        "cache_entries",
        "unknown_per_second",
        "workers",
        "request_timeout_seconds",
        "store_timeout_ms",
        "standby_poll_ms",
    ):
        if getattr(settings, key) <= 0:
            raise ConfigError(f"{CONFIG_NAME}: ocsp.{key} must be positive")
    # The watcher confirms the cache about once a second, each read bounded by store_timeout_ms.
    if settings.stale_bound_seconds * 1000 < max(1000, settings.standby_poll_ms) + settings.store_timeout_ms + 1000:
        raise ConfigError(
            f"{CONFIG_NAME}: ocsp.stale_bound_seconds must exceed store_timeout_ms and standby_poll_ms "
            "(and one second) by at least a second: a store that merely answers slowly would look lost"
        )
    if settings.refresh_interval_seconds >= settings.validity_hours * 3600 / 2:
        raise ConfigError(f"{CONFIG_NAME}: ocsp.refresh_interval_seconds must be under half of validity_hours")
    return settings


def _front_door_settings(table: object) -> FrontDoorSettings:
    settings = _table_settings(table, "front_door", FrontDoorSettings(), _FRONT_DOOR_TYPES)
    if settings.mode not in ("nginx", "direct"):
        raise ConfigError(f"{CONFIG_NAME}: front_door.mode must be nginx or direct")
    for key, value in settings.__dict__.items():
        if key == "ocsp_requests_per_second" and value == 0:
            continue  # off
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"{CONFIG_NAME}: front_door.{key} must be positive")
    return settings


def _crl_settings(table: object) -> CrlSettings:
    settings = _table_settings(table, "crl", CrlSettings(), _CRL_TYPES)
    if settings.leader_lease_seconds < 3:
        raise ConfigError(f"{CONFIG_NAME}: crl.leader_lease_seconds must be at least 3")
    return settings


def _audit_settings(table: object) -> AuditSettings:
    settings = _table_settings(table, "audit", AuditSettings(), _AUDIT_TYPES)
    if settings.checkpoint_interval_seconds <= 0:
        raise ConfigError(f"{CONFIG_NAME}: audit.checkpoint_interval_seconds must be positive")
    return settings


def _metrics_settings(table: object) -> MetricsSettings:
    settings = _table_settings(table, "metrics", MetricsSettings(), _METRICS_TYPES)
    ports = (settings.est_port, settings.ocsp_port, settings.crl_port)
    if not all(0 < port < 65536 for port in ports):
        raise ConfigError(f"{CONFIG_NAME}: metrics.est_port, ocsp_port and crl_port must be between 1 and 65535")
    if len(set(ports)) != len(ports):
        raise ConfigError(f"{CONFIG_NAME}: metrics.est_port, ocsp_port and crl_port must differ")
    if not settings.address:
        raise ConfigError(f"{CONFIG_NAME}: metrics.address must not be empty")
    if settings.cache_seconds < 0:
        raise ConfigError(f"{CONFIG_NAME}: metrics.cache_seconds must be 0 (no cache) or positive")
    return settings


def _console_settings(table: object) -> ConsoleSettings:
    settings = _table_settings(table, "console", ConsoleSettings(), _CONSOLE_TYPES)
    if not 0 < settings.port < 65536:
        raise ConfigError(f"{CONFIG_NAME}: console.port must be between 1 and 65535")
    for key in ("workers", "threads", "session_minutes", "login_link_minutes", "request_timeout_seconds"):
        if getattr(settings, key) <= 0:
            raise ConfigError(f"{CONFIG_NAME}: console.{key} must be positive")
    if settings.login_link_minutes > 60:
        raise ConfigError(f"{CONFIG_NAME}: console.login_link_minutes must be at most 60")
    if settings.session_minutes > 24 * 60:
        raise ConfigError(f"{CONFIG_NAME}: console.session_minutes must be at most 1440 (a day)")
    if settings.public_url is not None and not settings.public_url.startswith("https://"):
        raise ConfigError(f"{CONFIG_NAME}: console.public_url must start with https://")
    return settings


def _apply_environment(config: Config, environ: Mapping[str, str]) -> Config:
    settings = config.pkcs11
    if environ.get("CHARGEPKI_PKCS11_MODULE"):
        settings = replace(settings, module=environ["CHARGEPKI_PKCS11_MODULE"], embedded=False, softhsm_conf=None)
    if environ.get("CHARGEPKI_TOKEN_LABEL"):
        settings = replace(settings, token_label=environ["CHARGEPKI_TOKEN_LABEL"])
    if environ.get("CHARGEPKI_PKCS11_PIN_FILE"):
        settings = replace(settings, pin_file=Path(environ["CHARGEPKI_PKCS11_PIN_FILE"]))
    url = environ.get("CHARGEPKI_DATABASE_URL") or config.database_url
    return replace(config, pkcs11=settings, database_url=url)


def _table(settings: object) -> dict[str, object]:
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in settings.__dict__.items()
        if value is not None
    }


def write_config(config: Config) -> Path:
    """Write the settings (never the PIN) so later runs and other processes agree on them."""
    settings = config.pkcs11
    pkcs11: dict[str, object] = {
        "module": settings.module,
        "token_label": settings.token_label,
        "pin_env": settings.pin_env,
        "embedded": settings.embedded,
    }
    if settings.pin_file is not None:
        pkcs11["pin_file"] = str(settings.pin_file)
    if settings.softhsm_conf is not None:
        pkcs11["softhsm_conf"] = str(settings.softhsm_conf)
    document = {
        "database": {"url": config.database_url} | _table(config.database),
        "pkcs11": pkcs11,
        "urls": {"ocsp": config.ocsp_url, "repository": config.repository_url},
        "est": _table(config.est),
        "ocsp": _table(config.ocsp),
        "front_door": _table(config.front_door),
        "crl": _table(config.crl),
        "audit": _table(config.audit),
        "metrics": _table(config.metrics),
        "console": _table(config.console),
    }
    ensure_home(config.home)
    _write_document(config.config_path, document, settings.pin_env)
    return config.config_path


def save_urls(config: Config, ocsp_url: str, repository_url: str) -> None:
    """Remember the URLs ``init`` was given in the file's ``[urls]``, so later hierarchies (``v2g
    init``, ``manufacturer init``) and rotations put the same ones in AIA/CDP. Only that table
    changes: settings that came from the environment are not written into the file."""
    path = config.config_path
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot update {path}: {exc}") from None
    document["urls"] = {"ocsp": ocsp_url, "repository": repository_url}
    pkcs11 = document.get("pkcs11", {})
    _write_document(path, document, pkcs11.get("pin_env", config.pkcs11.pin_env) if isinstance(pkcs11, dict) else "")


def _write_document(path: Path, document: dict[str, object], pin_env: str) -> None:
    """Replace the configuration file atomically, mode 0600 from its creation."""
    tmp = path.with_suffix(".tmp")
    text = (
        "# chargepki configuration. The PKCS#11 PIN is never stored here: it comes from\n"
        f"# the environment variable named by pkcs11.pin_env ({pin_env}) or pkcs11.pin_file.\n"
        + tomli_w.dumps(document)
    )
    tmp.unlink(missing_ok=True)  # a leftover could have other permissions: the file is created 0600 below
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def ensure_home(home: Path) -> None:
    """The home directory, mode 0700: it holds the database, the token and the PIN files.

    ``mkdir(mode=)`` is subject to the umask and leaves an existing directory alone, so a home
    that exists when the configuration is first written (nothing of ours in it yet) is tightened.
    """
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (home / CONFIG_NAME).exists() and home.stat().st_uid == os.getuid():
        home.chmod(0o700)
