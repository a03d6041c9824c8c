"""One installation, opened: its config, its store and (on demand) its token.

The CLI and the services build a ``Pki`` once per process and pass its parts down
explicitly; the core functions never reach for it themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ca.config import Config, ensure_home, load_config, write_config
from ca.errors import ConfigError
from ca.pkcs11_token import Token
from ca.softhsm import create_token, token_exists, write_softhsm_conf
from ca.store import Store


@dataclass
class Pki:
    config: Config
    environ: Mapping[str, str]
    store: Store = field(init=False)
    _token: Token | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.store = Store(self.config.database_url)

    @classmethod
    def open(cls, home: Path, environ: Mapping[str, str], *, create: bool = False) -> Pki:
        """Open an existing home; with ``create`` (init, run) set it up first if it is new."""
        config = load_config(home, environ)
        if not create and not config.config_path.exists() and "CHARGEPKI_DATABASE_URL" not in environ:
            raise ConfigError(
                f"{home} is not a chargepki home yet: run `chargepki init --org NAME` (or `make run`) first"
            )
        if create:
            ensure_home(home)  # 0700 before anything (the SQLite file, the token) is created inside
        pki = cls(config, environ)
        if create:
            pki.prepare()
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
        if self._token is None:
            settings = self.config.pkcs11
            self._token = Token(
                settings.module,
                settings.token_label,
                settings.read_pin(self.environ),
                softhsm_conf=settings.softhsm_conf,
            )
        return self._token

    def close(self) -> None:
        self.store.dispose()
