"""The embedded default token: a SoftHSM2 token directory inside the home.

The token gets its own ``softhsm2.conf`` so nothing touches the machine's tokens, and
random SO and user PINs written to files readable only by the owner. ``softhsm2-util``
only takes PINs as arguments (visible in ``ps``) or from a terminal, so the token is
initialised through the module's own ``C_InitToken``/``C_InitPIN`` instead.
"""

from __future__ import annotations

import ctypes
import os
import secrets
from pathlib import Path

import pkcs11
from pkcs11 import TokenFlag

from ca.config import Pkcs11Settings
from ca.errors import TokenError
from ca.keys.pkcs11_token import _library

_CKR_OK = 0


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")


def _existing(path: Path | None) -> str | None:
    if path is None or not path.exists():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def write_softhsm_conf(conf: Path) -> Path:
    """A configuration that keeps this home's tokens in ``<conf dir>/tokens``."""
    tokens = conf.parent / "tokens"
    conf.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the token directory and its PIN files
    tokens.mkdir(exist_ok=True, mode=0o700)
    if not conf.exists():
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(
                f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
                "slots.removable = false\n"
            )
    return conf


def token_exists(settings: Pkcs11Settings) -> bool:
    library = _library(settings.module, settings.softhsm_conf)
    return any(True for _ in library.lib.get_tokens(token_label=settings.token_label))


def create_token(settings: Pkcs11Settings, *, user_pin: str | None = None, so_pin: str | None = None) -> str:
    """Initialise a new token labelled ``settings.token_label`` in a free slot; return the user PIN.

    The user PIN goes to ``settings.pin_file`` and the SO PIN next to it (``so.pin``), both
    mode 0600, unless the caller supplied them (tests give each run its own random PINs).
    """
    if settings.softhsm_conf is not None:
        write_softhsm_conf(settings.softhsm_conf)
    library = _library(settings.module, settings.softhsm_conf)
    if token_exists(settings):
        raise TokenError(f"a token labelled {settings.token_label!r} already exists")
    free = [
        slot
        for slot in library.lib.get_slots(token_present=True)
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED
    ]
    if not free:
        raise TokenError(f"no free slot for a new token in {settings.module}")
    # PIN files left from an earlier token (its directory was wiped) are reused, so they stay true.
    user_pin = user_pin or _existing(settings.pin_file) or secrets.token_urlsafe(24)
    so_pin = (
        so_pin
        or _existing(settings.pin_file.with_name("so.pin") if settings.pin_file else None)
        or secrets.token_urlsafe(24)
    )
    module = ctypes.CDLL(settings.module)  # same handle python-pkcs11 initialised
    module.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    label = settings.token_label.encode("utf-8")
    if len(label) > 32:
        raise TokenError("token labels are at most 32 bytes")
    so = so_pin.encode("utf-8")
    rv = module.C_InitToken(free[0].slot_id, so, len(so), label.ljust(32, b" "))
    if rv != _CKR_OK:
        raise TokenError(f"C_InitToken failed with CKR 0x{rv:x}")
    token = library.lib.get_token(token_label=settings.token_label)
    try:
        with token.open(rw=True, so_pin=so_pin) as session:
            session.init_pin(user_pin)
    except pkcs11.PKCS11Error as exc:
        raise TokenError(f"cannot set the user PIN of {settings.token_label!r}: {exc}") from None
    if settings.pin_file is not None:
        for path, pin in ((settings.pin_file, user_pin), (settings.pin_file.with_name("so.pin"), so_pin)):
            if not path.exists():
                _write_secret(path, pin)
    return user_pin
