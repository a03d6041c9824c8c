"""The PKCS#11 token that holds every CA key: loading, login, a session pool, key management.

PKCS#11 allows one ``C_Initialize`` per process, so loaded modules are cached per process
(keyed by path) and re-initialised after a ``fork`` (gunicorn workers) or when the embedded
SoftHSM2 configuration changes. Everything else is an explicit ``Token`` object passed to
whoever needs to sign.

Services outlive token outages: a ``Token`` that fails drops its session, reconnects at most
once per ``RECONNECT_INTERVAL`` (re-initialising the module when reconnecting alone does not
help) and reports each outcome to a ``TokenHealth`` the interfaces audit. A PIN the token
refused is never offered again until the configured PIN changes: an HSM locks its PIN after a
few wrong attempts, and a service retrying on every request would get there in seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pkcs11
from asn1crypto.core import OctetString
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

from ca import observe
from ca.errors import ChargepkiError, TokenError
from ca.keys.keyspec import KeySpec

# Errors that say the token (or our session with it) is in trouble, not that a request was wrong:
# the session, the login it carried and the key handles found in it cannot be trusted any more.
# SoftHSM2 answers ObjectHandleInvalid and then GeneralError when its token directory goes away.
_TOKEN_TROUBLE = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.DeviceMemory,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.UserNotLoggedIn,
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
    p11.GeneralError,
    p11.FunctionFailed,
    p11.SlotIDInvalid,
)
RECONNECT_INTERVAL = 1.0  # seconds between attempts to reach a failed token (requests meanwhile fail at once)

PinSource = str | Callable[[], str]


class PinRefused(TokenError):
    """The token refused the PIN (or it is the PIN it refused before, which is not offered again)."""


class KeyMissing(TokenError):
    """No key under that label: misconfiguration, or a module whose view of the token went stale
    (SoftHSM2 finds nothing in a session opened before its token directory went away and came back)."""


class TokenHealth:
    """Whether this process's last use of the token worked, and which change is not yet audited.

    Kept apart from ``Token`` so that a token that cannot even be opened has a health too; the
    interfaces (``ca.context.Pki.audit_token_health``) turn changes into audit entries: one when
    the token fails, one more if the reason changes (gone, then a wrong PIN), one when it is back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failure: str | None = None  # the one-line reason of the last failure, None when working
        self._audited: str | None = None

    def failed(self, reason: str) -> None:
        with self._lock:
            self.failure = reason

    def succeeded(self) -> None:
        if self.failure is not None:
            with self._lock:
                self.failure = None

    def unaudited(self) -> tuple[bool, str | None] | None:
        """(available now, reason) when that differs from what was last audited, else None."""
        with self._lock:
            return None if self.failure == self._audited else (self.failure is None, self.failure)

    def audited(self, reason: str | None) -> None:
        with self._lock:
            self._audited = reason


class _Library:
    """A loaded module, remembering the process and SoftHSM2 configuration it was initialised in."""

    def __init__(self, path: str, softhsm_conf: str | None) -> None:
        self.path = path
        self.softhsm_conf = softhsm_conf
        self.pid = os.getpid()
        self.generation = 0
        self.lib = pkcs11.lib(path)

    def refresh(self, softhsm_conf: str | None, *, force: bool = False) -> None:
        """Re-initialise after a fork, when the SoftHSM2 configuration must change, or on demand."""
        if self.pid == os.getpid() and self.softhsm_conf == softhsm_conf and not force:
            return
        self.restart(softhsm_conf)

    def restart(self, softhsm_conf: str | None) -> None:
        """``C_Finalize`` + ``C_Initialize``: every session of the process ends (tokens reconnect
        when they see the new generation), and the module looks at its slots afresh."""
        with suppress(p11.PKCS11Error):
            self.lib.finalize()
        try:
            self.lib.initialize()
        except p11.PKCS11Error as exc:
            raise TokenError(f"cannot initialise PKCS#11 module {self.path}: {_describe(exc)}") from None
        finally:
            self.pid = os.getpid()
            self.softhsm_conf = softhsm_conf
            self.generation += 1


_LIBRARIES: dict[str, _Library] = {}
_LIBRARIES_LOCK = threading.Lock()


def _library(path: str, softhsm_conf: Path | None, *, reload: bool = False) -> _Library:
    conf = str(softhsm_conf) if softhsm_conf is not None else None
    if conf is not None:
        # SoftHSM2 reads its configuration from the environment at C_Initialize only.
        os.environ["SOFTHSM2_CONF"] = conf
    with _LIBRARIES_LOCK:
        loaded = _LIBRARIES.get(path)
        if loaded is None:
            if not Path(path).exists():
                raise TokenError(f"PKCS#11 module not found: {path}")
            try:
                loaded = _Library(path, conf)
            except p11.PKCS11Error as exc:
                raise TokenError(f"cannot load PKCS#11 module {path}: {_describe(exc)}") from None
            _LIBRARIES[path] = loaded
        else:
            loaded.refresh(conf if conf is not None else loaded.softhsm_conf, force=reload)
        return loaded


def _restart_library(path: str, softhsm_conf: Path | None) -> None:
    """Re-initialise a loaded module (nothing to do when it never loaded). Caller holds ``_CALL_LOCK``."""
    conf = str(softhsm_conf) if softhsm_conf is not None else None
    if conf is not None:
        os.environ["SOFTHSM2_CONF"] = conf
    with _LIBRARIES_LOCK:
        loaded = _LIBRARIES.get(path)
        if loaded is not None:
            loaded.restart(conf if conf is not None else loaded.softhsm_conf)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# PINs the token refused, per (module, token), as keyed digests: never the PIN itself, even in memory.
_REFUSED_PINS: dict[tuple[str, str], bytes] = {}
_PIN_DIGEST_KEY = secrets.token_bytes(32)


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_DIGEST_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


# python-pkcs11 calls C_Initialize(NULL), which tells the module that the application will not
# call it from several threads at once; SoftHSM2 then runs without its own mutexes and aborts
# under concurrent calls. So every call into a module goes through this one lock. A process
# signs at the token's single-thread speed; more throughput comes from more processes.
_CALL_LOCK = threading.RLock()


def _renew_lock_after_fork() -> None:
    global _CALL_LOCK
    _CALL_LOCK = threading.RLock()  # a lock held by another thread at fork time is never released


os.register_at_fork(after_in_child=_renew_lock_after_fork)


# SoftHSM2 keeps a token in files, and every login rewrites the token's own file (its flags); a process
# reading it at that moment gets CKR_GENERAL_ERROR ("Token integrity check failed", SoftHSMv2 issue
# #757), or, inside C_Initialize, leaves the token out of its slot list. `make soak` met both when EST
# workers, the OCSP signer and CLI processes logged in together. So on those two errors only, finding
# the token and logging in are retried a few times, briefly, with the module initialised again.
_CONNECT_ATTEMPTS = 5


class _Transient(TokenError):
    """CKR_GENERAL_ERROR or no such token while finding the token or logging in: maybe a concurrent login."""


class Token:
    """A logged-in token, safe to share between threads.

    It keeps one logged-in session and serialises calls (see ``_CALL_LOCK``). When the token
    fails (``_TOKEN_TROUBLE``) the session is dropped and the next call logs in again, re-initialising
    the module if that alone does not reach the token, so a service resumes by itself when the
    token comes back. ``pin`` is the PIN or a callable that reads it, consulted at every login so a
    corrected PIN file is picked up without a restart.
    """

    def __init__(
        self,
        module: str,
        label: str,
        pin: PinSource,
        *,
        softhsm_conf: Path | None = None,
        health: TokenHealth | None = None,
    ) -> None:
        self.module = module
        self.label = label
        self._pin = pin
        self._softhsm_conf = softhsm_conf
        self.health = health or TokenHealth()
        self._session: Any = None
        self._signing_keys: dict[str, Any] = {}
        self._generation = -1
        self._pid = -1
        self._retry_at = 0.0
        self._last_error: TokenError | None = None
        self._suspect = False  # a key went missing: start the module afresh at the next connection
        self._restarted_at = -RECONNECT_INTERVAL
        self.mechanisms: frozenset[Mechanism] = frozenset()
        with self.session():
            pass  # fail now, with a clear error, rather than at the first signature

    def __repr__(self) -> str:
        return f"Token(module={self.module!r}, label={self.label!r})"

    # -- sessions ---------------------------------------------------------------------
    def _read_pin(self) -> str:
        return self._pin() if callable(self._pin) else self._pin

    def _connect(self) -> None:
        """(Re)load the module, find the token and log in. Caller holds ``_CALL_LOCK``."""
        library = _library(self.module, self._softhsm_conf)
        for attempt in range(_CONNECT_ATTEMPTS):
            try:
                token, session = self._login(library)
                break
            except _Transient:
                if attempt == _CONNECT_ATTEMPTS - 1:
                    raise
                time.sleep(0.02 * (attempt + 1))
                # SoftHSM2 reads its token files at C_Initialize: a token it could not read then stays
                # missing from the process until the module is initialised again.
                library = _library(self.module, self._softhsm_conf, reload=True)
        self._session = session
        self._signing_keys = {}
        self._generation = library.generation
        self._pid = os.getpid()
        self.mechanisms = frozenset(token.slot.get_mechanisms())

    def _login(self, library: _Library) -> tuple[Any, Any]:
        try:
            token = library.lib.get_token(token_label=self.label)
        except p11.NoSuchToken:
            raise _Transient(f"no token labelled {self.label!r} in PKCS#11 module {self.module}") from None
        except p11.MultipleTokensReturned:
            raise TokenError(f"several tokens are labelled {self.label!r} in {self.module}") from None
        except p11.GeneralError as exc:
            raise _Transient(f"token {self.label!r} unavailable: {_describe(exc)}") from None
        except p11.PKCS11Error as exc:
            raise TokenError(f"token {self.label!r} unavailable: {_describe(exc)}") from None
        pin = self._read_pin()
        key = (self.module, self.label)
        digest = _pin_digest(pin)
        if _REFUSED_PINS.get(key) == digest:
            raise PinRefused(f"wrong PIN for token {self.label!r} (not offered again until the configured PIN changes)")
        try:
            session = token.open(rw=True, user_pin=pin)
        except p11.PinIncorrect:
            _REFUSED_PINS[key] = digest
            raise PinRefused(f"wrong PIN for token {self.label!r}") from None
        except p11.PinLocked:
            raise PinRefused(f"the PIN of token {self.label!r} is locked") from None
        except p11.UserAlreadyLoggedIn:
            # Another Token object of this process logged in already; login state is per process.
            try:
                session = token.open(rw=True)
            except p11.PKCS11Error as exc:
                raise TokenError(f"cannot open a session with token {self.label!r}: {_describe(exc)}") from None
        except p11.GeneralError as exc:
            raise _Transient(f"cannot log in to token {self.label!r}: {_describe(exc)}") from None
        except p11.PKCS11Error as exc:
            raise TokenError(f"cannot log in to token {self.label!r}: {_describe(exc)}") from None
        _REFUSED_PINS.pop(key, None)
        return token, session

    def _reconnect(self) -> None:
        """Connect, or fail fast with the last error while a recent attempt failed.

        A module that lost a token keeps failing until it is initialised again (SoftHSM2 reads
        its token directory at ``C_Initialize``; a network HSM's client forgets its sessions),
        so a failed connection is retried once after re-initialising the module.
        """
        if self._last_error is not None and time.monotonic() < self._retry_at:
            raise self._last_error
        try:
            if self._suspect and time.monotonic() - self._restarted_at >= RECONNECT_INTERVAL:
                self._restart()
            self._suspect = False
            try:
                self._connect()
            except PinRefused:
                raise
            except TokenError:
                if self.module not in _LIBRARIES:
                    raise  # the module itself is missing or unloadable: nothing to re-initialise
                self._restart()
                self._connect()
        except ChargepkiError as exc:  # TokenError, or ConfigError from an unreadable PIN file
            self._last_error = exc if isinstance(exc, TokenError) else TokenError(str(exc))
            self._retry_at = time.monotonic() + RECONNECT_INTERVAL
            self.health.failed(str(exc))
            raise self._last_error from None
        self._last_error = None

    def _restart(self) -> None:
        _restart_library(self.module, self._softhsm_conf)
        self._restarted_at = time.monotonic()

    def _drop_session(self) -> None:
        session, self._session, self._signing_keys = self._session, None, {}
        if session is not None:
            with suppress(p11.PKCS11Error):
                session.close()

    def _stale(self) -> bool:
        library = _LIBRARIES.get(self.module)
        return (
            self._session is None
            or self._pid != os.getpid()
            or library is None
            or library.generation != self._generation
            or library.pid != os.getpid()
        )

    @contextmanager
    def session(self) -> Iterator[Any]:
        """The logged-in session, held exclusively for the duration of the ``with`` block."""
        with _CALL_LOCK:
            if self._stale():
                # Forget, never close: after a fork or a re-initialisation the handle may already
                # number another Token's new session.
                self._session, self._signing_keys = None, {}
                self._reconnect()
            try:
                yield self._session
            except KeyMissing:
                self._drop_session()
                self._suspect = True
                raise
            except _TOKEN_TROUBLE as exc:
                self._drop_session()
                message = f"token {self.label!r} became unavailable: {_describe(exc)}"
                self.health.failed(message)
                raise TokenError(message) from None
            self.health.succeeded()

    # -- keys ---------------------------------------------------------------------------
    def generate_key(self, spec: KeySpec, label: str) -> PublicKeyTypes:
        """Generate a key pair inside the token: sensitive, never extractable, sign-only."""
        key_id = secrets.token_bytes(16)
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        public_template = {
            Attribute.TOKEN: True,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
        }
        with self.session() as session:
            if self._find(session, ObjectClass.PRIVATE_KEY, label) is not None:
                raise TokenError(f"token {self.label!r} already holds a key labelled {label!r}")
            try:
                if spec.algorithm == "ec":
                    params = session.create_domain_parameters(
                        KeyType.EC,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters(spec.curve_name)},
                        local=True,
                    )
                    params.generate_keypair(
                        id=key_id,
                        label=label,
                        store=True,
                        public_template=public_template,
                        private_template=private_template,
                    )
                else:
                    session.generate_keypair(
                        KeyType.RSA,
                        spec.bits,
                        id=key_id,
                        label=label,
                        store=True,
                        public_template=public_template,
                        private_template=private_template,
                    )
            except _TOKEN_TROUBLE:
                raise
            except p11.PKCS11Error as exc:
                raise TokenError(f"key generation ({spec.name}) failed in {self.label!r}: {_describe(exc)}") from None
            return self._public_key(session, label)

    def public_key(self, label: str) -> PublicKeyTypes:
        with self.session() as session:
            return self._public_key(session, label)

    def key_attributes(self, label: str) -> dict[str, bool]:
        """The protection attributes of a private key, as the token reports them."""
        names = {
            "sensitive": Attribute.SENSITIVE,
            "extractable": Attribute.EXTRACTABLE,
            "always_sensitive": Attribute.ALWAYS_SENSITIVE,
            "never_extractable": Attribute.NEVER_EXTRACTABLE,
            "local": Attribute.LOCAL,
            "token": Attribute.TOKEN,
            "private": Attribute.PRIVATE,
        }
        with self.session() as session:
            key = self._require(session, ObjectClass.PRIVATE_KEY, label)
            return {name: bool(key[attribute]) for name, attribute in names.items()}

    def sign(self, label: str, mechanism: Mechanism, data: bytes, param: Any = None) -> bytes:
        started = time.perf_counter()
        with self.session() as session:
            # Object handles live as long as the session; finding the key each time costs more than signing.
            key = self._signing_keys.get(label)
            if key is None:
                key = self._signing_keys[label] = self._require(session, ObjectClass.PRIVATE_KEY, label)
            try:
                signature = bytes(key.sign(data, mechanism=mechanism, mechanism_param=param))
            except _TOKEN_TROUBLE:
                raise
            except p11.PKCS11Error as exc:
                raise TokenError(f"signing with {label!r} failed in {self.label!r}: {_describe(exc)}") from None
        observe.signed(mechanism.name, time.perf_counter() - started)
        return signature

    def check(self) -> None:
        """A cheap round trip on the logged-in session (8 random bytes from the token), logging in again
        first when the session was lost; ``TokenError`` when the token does not answer (health updated)."""
        with self.session() as session:
            try:
                session.generate_random(64)
            except _TOKEN_TROUBLE:
                raise
            except (p11.FunctionNotSupported, p11.RandomNoRNG):
                pass  # a token without a generator: having a session is all this can say
            except p11.PKCS11Error as exc:
                raise TokenError(f"token {self.label!r} does not answer: {_describe(exc)}") from None

    def destroy_key(self, label: str) -> None:
        """Remove both halves of a key pair (used to roll back a failed CA creation)."""
        with self.session() as session:
            self._signing_keys.pop(label, None)
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                found = self._find(session, object_class, label)
                if found is not None:
                    found.destroy()

    def key_labels(self, prefix: str = "") -> set[str]:
        """Labels of the key objects (either half of a pair) starting with ``prefix``: what temporary
        keys an interrupted run may have left behind (`token doctor` and its tests look)."""
        with self.session() as session:
            found: set[str] = set()
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for key in session.get_objects({Attribute.CLASS: object_class}):
                    label = str(key[Attribute.LABEL] or "")
                    if label.startswith(prefix):
                        found.add(label)
            return found

    def close(self) -> None:
        """End this object's session (the token logs the process out with its last session)."""
        with _CALL_LOCK:
            if self._stale():  # after a fork or a re-initialisation the handle is not ours to close
                self._session, self._signing_keys = None, {}
            else:
                self._drop_session()

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _find(session: Any, object_class: ObjectClass, label: str) -> Any:
        matches = list(session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: label}))
        if len(matches) > 1:
            raise TokenError(f"several keys are labelled {label!r}")
        return matches[0] if matches else None

    def _require(self, session: Any, object_class: ObjectClass, label: str) -> Any:
        found = self._find(session, object_class, label)
        if found is None:
            kind = "private" if object_class == ObjectClass.PRIVATE_KEY else "public"
            raise KeyMissing(f"no {kind} key labelled {label!r} in token {self.label!r}")
        return found

    def _public_key(self, session: Any, label: str) -> PublicKeyTypes:
        key = self._require(session, ObjectClass.PUBLIC_KEY, label)
        if key.key_type == KeyType.EC:
            curve = _curve_from_params(bytes(key[Attribute.EC_PARAMS]))
            point = OctetString.load(bytes(key[Attribute.EC_POINT])).native
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        if key.key_type == KeyType.RSA:
            modulus = int.from_bytes(bytes(key[Attribute.MODULUS]), "big")
            exponent = int.from_bytes(bytes(key[Attribute.PUBLIC_EXPONENT]), "big")
            return rsa.RSAPublicNumbers(exponent, modulus).public_key()
        raise TokenError(f"key {label!r} has an unsupported type {key.key_type!r}")


def _curve_from_params(params: bytes) -> ec.EllipticCurve:
    for curve in (ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()):
        if encode_named_curve_parameters(curve.name) == params:
            return curve
    raise TokenError(f"unsupported EC parameters {params.hex()}")


def new_key_label(prefix: str) -> str:
    """A label unique in the token even when a home is re-created over the same token."""
    return f"{prefix}-{secrets.token_hex(4)}"
