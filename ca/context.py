"""One installation, opened: its config, its store and (on demand) its token.

The CLI and the services build a ``Pki`` once per process and pass its parts down
explicitly; the core functions never reach for it themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from ca import audit
from ca.config import Config, ensure_home, load_config, write_config
from ca.errors import ConfigError, TokenError
from ca.keys.pkcs11_token import RECONNECT_INTERVAL, Token, TokenHealth
from ca.keys.softhsm import create_token, token_exists, write_softhsm_conf
from ca.store.engine import Store

log = logging.getLogger(__name__)


@dataclass
class Pki:
    config: Config
    environ: Mapping[str, str]
    create: bool = True  # may the store create an SQLite file that is missing (first run only)
    store: Store = field(init=False)
    token_health: TokenHealth = field(default_factory=TokenHealth, init=False, repr=False)
    _token: Token | None = field(default=None, init=False, repr=False)
    _token_error: tuple[float, TokenError] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.store = Store(self.config.database_url, create=self.create, settings=self.config.database)

    @classmethod
    def open(cls, home: Path, environ: Mapping[str, str], *, create: bool = False, check_schema: bool = True) -> Pki:
        """Open an existing home; with ``create`` (init, run) set it up first if it is new.

        ``check_schema=False`` (service workers, whose parent checked it) opens without touching
        the database, so a worker started while the database is away still starts and answers 503.
        """
        config = load_config(home, environ)
        if not create and not config.config_path.exists() and "CHARGEPKI_DATABASE_URL" not in environ:
            raise ConfigError(
                f"{home} is not a chargepki home yet: run `chargepki init --org NAME` (or `make run`) first"
            )
        if create:
            ensure_home(home)  # 0700 before anything (the SQLite file, the token) is created inside
        pki = cls(config, environ, create=create)
        if create:
            pki.prepare()
        if check_schema:
            pki.store.ensure_schema()
        return pki

    def prepare(self) -> None:
        """First-run set-up: config file, embedded SoftHSM2 token with random PINs, schema."""
        if not self.config.config_path.exists():
            write_config(self.config)
        settings = self.config.pkcs11
        if settings.embedded:
            if settings.softhsm_conf is not None:
                write_softhsm_conf(settings.softhsm_conf)
            if not token_exists(settings):
                create_token(settings)

    def token(self) -> Token:
        """The logged-in token; while it cannot be opened, the last error again (retried every second)."""
        if self._token is None:
            if self._token_error is not None and time.monotonic() - self._token_error[0] < RECONNECT_INTERVAL:
                raise self._token_error[1]
            settings = self.config.pkcs11
            try:
                self._token = Token(
                    settings.module,
                    settings.token_label,
                    lambda: settings.read_pin(self.environ),  # read at every login: a fixed PIN file is seen
                    softhsm_conf=settings.softhsm_conf,
                    health=self.token_health,
                )
            except TokenError as exc:
                self._token_error = (time.monotonic(), exc)
                raise
            self._token_error = None
        return self._token

    def audit_token_health(self, actor: str) -> None:
        """Record in the audit log that the token became unavailable (with the reason) or is back.

        Services call this after work that used the token, outside any transaction. One entry per
        change and process, not per failed request; if the database is away too, the change is
        recorded at a later call.
        """
        change = self.token_health.unaudited()
        if change is None:
            return
        available, reason = change
        label = self.config.pkcs11.token_label
        try:
            with self.store.session() as session:
                if available:
                    audit.record(session, "token.available", actor=actor, subject=label)
                else:
                    audit.record(session, "token.unavailable", actor=actor, subject=label, details={"reason": reason})
                session.commit()
        except SQLAlchemyError as exc:
            log.warning("cannot audit the token's state yet: %s", type(exc).__name__)
            return
        self.token_health.audited(reason)

    def close(self) -> None:
        self.store.dispose()
