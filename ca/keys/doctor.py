"""`chargepki token doctor`: can this CA use its PKCS#11 token, and if not, why, in plain words.

The services take every step implicitly (load the module, find the token by label, log in, pick
mechanisms, generate, sign) and report a failure as one line from whichever step broke. Here each
step runs on its own and a failure names the step, the PKCS#11 error (``CKR_…``) and what to check.

Nothing here changes the token, except one temporary key pair per key type under a unique label
(``chargepki-doctor-…``), generated as the CA generates its keys (token objects: that the token
accepts new keys is part of what is checked) and destroyed before its step ends, failed or not; the
step then looks for the label again and reports a key it could not remove. The PIN is read, sent
to the token once, and never shown: findings name where it came from, not what it is.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Mechanism, SlotFlag, TokenFlag
from pkcs11 import exceptions as p11

from ca.config import Pkcs11Settings
from ca.errors import ChargepkiError, TokenError
from ca.keys.keyspec import KeySpec, key_spec
from ca.keys.pkcs11_token import _CALL_LOCK, Token, _library
from ca.keys.token_keys import token_private_key

TEMPORARY_PREFIX = "chargepki-doctor-"
OK, WARNING, PROBLEM, SKIPPED = "ok", "warning", "problem", "skipped"
RSA_PADDINGS = ("pkcs1", "pss")  # what `init --rsa-padding` offers; both are checked for every RSA key type


@dataclass
class Finding:
    """One step's outcome. ``error`` is the PKCS#11 return code's name (``CKR_PIN_INCORRECT``), or a
    chargepki name where PKCS#11 has none (``module_missing``, ``no_such_token``, ``mechanism_missing``)."""

    check: str  # config | module | slots | token | login | mechanisms | leftover_keys | sign_verify
    status: str  # ok | warning | problem | skipped
    summary: str
    key_type: str | None = None
    error: str | None = None
    explanation: str | None = None
    remedy: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# PKCS#11 errors in plain words: (CKR name, what it means, what to check).
_EXPLAINED: dict[type[p11.PKCS11Error], tuple[str, str, str]] = {
    p11.PinIncorrect: (
        "CKR_PIN_INCORRECT",
        "the token refused the configured PIN",
        "correct the PIN at its source ({pin_source}). Every wrong attempt counts against the token's retry "
        "limit and most HSMs lock the PIN after a few: fix the PIN before running this again",
    ),
    p11.PinLocked: (
        "CKR_PIN_LOCKED",
        "the user PIN is locked after too many wrong attempts",
        "the token's security officer must unlock or reset the user PIN (SoftHSM2: softhsm2-util --init-pin; "
        "an HSM: its administration tool), then put the new PIN at its source ({pin_source})",
    ),
    p11.PinExpired: (
        "CKR_PIN_EXPIRED",
        "the token requires the user PIN to be changed before it signs anything",
        "change the user PIN with the HSM's tool, then put the new PIN at its source ({pin_source})",
    ),
    p11.PinLenRange: (
        "CKR_PIN_LEN_RANGE",
        "the PIN's length is outside what the token accepts: the source holds something else",
        "check {pin_source} holds the PIN alone (no other text); whitespace around it is ignored",
    ),
    p11.PinInvalid: (
        "CKR_PIN_INVALID",
        "the PIN contains characters the token does not accept",
        "check {pin_source} holds the PIN alone",
    ),
    p11.UserPinNotInitialized: (
        "CKR_USER_PIN_NOT_INITIALIZED",
        "the token was initialised but never given a user PIN",
        "the security officer sets it (SoftHSM2: softhsm2-util --init-pin --token LABEL; an HSM: its "
        "administration tool), then put it at {pin_source}",
    ),
    p11.TokenNotPresent: (
        "CKR_TOKEN_NOT_PRESENT",
        "the slot exists but holds no token: removed, or the HSM partition is offline",
        "check the HSM is connected and the partition online; SoftHSM2: that the token directory named in "
        "softhsm2.conf exists and this user can read it",
    ),
    p11.TokenNotRecognised: (
        "CKR_TOKEN_NOT_RECOGNIZED",
        "the module does not recognise the token in the slot",
        "check the module belongs to this HSM (and its version); SoftHSM2: that the token files are intact",
    ),
    p11.SlotIDInvalid: (
        "CKR_SLOT_ID_INVALID",
        "the module does not know that slot: slots are renumbered when tokens come and go or the HSM client restarts",
        "chargepki finds its token by label: check [pkcs11] token_label against the slots listed above",
    ),
    p11.DeviceRemoved: (
        "CKR_DEVICE_REMOVED",
        "the token was removed, or the connection to the HSM dropped, during the operation",
        "check the HSM's connection and its client log, then run this again",
    ),
    p11.DeviceError: (
        "CKR_DEVICE_ERROR",
        "the token reported a hardware or connection fault",
        "check the HSM's status and its client log",
    ),
    p11.DeviceMemory: (
        "CKR_DEVICE_MEMORY",
        "the token has no room for new objects",
        "free room on the HSM (old keys of retired CAs are its operator's to archive), or enlarge the partition",
    ),
    p11.GeneralError: (
        "CKR_GENERAL_ERROR",
        "the module failed without a reason; SoftHSM2 answers this when it cannot read its configuration "
        "file or token directory",
        "SoftHSM2: check that the softhsm2.conf in [pkcs11] softhsm_conf exists and names a token directory "
        "this user can read and write; an HSM: its client log",
    ),
    p11.FunctionFailed: (
        "CKR_FUNCTION_FAILED",
        "the token could not complete the operation",
        "check the HSM's client log; run this again to see whether it is lasting",
    ),
    p11.MechanismInvalid: (
        "CKR_MECHANISM_INVALID",
        "the token does not offer this mechanism (or not for this key)",
        "enable the mechanism in the HSM's policy, or create CAs with a key type it supports (--key-type)",
    ),
    p11.MechanismParamInvalid: (
        "CKR_MECHANISM_PARAM_INVALID",
        "the token refused the mechanism's parameters (RSA-PSS: hash, MGF or salt length)",
        "use PKCS#1 v1.5 padding for RSA CAs on this token (init --rsa-padding pkcs1)",
    ),
    p11.KeySizeRange: (
        "CKR_KEY_SIZE_RANGE",
        "the token does not generate keys of this size",
        "create CAs with a key type it supports (--key-type)",
    ),
    p11.DomainParamsInvalid: (
        "CKR_DOMAIN_PARAMS_INVALID",
        "the token does not support this elliptic curve",
        "create CAs with a curve it supports (--key-type)",
    ),
    p11.TokenWriteProtected: (
        "CKR_TOKEN_WRITE_PROTECTED",
        "the token refuses new objects: existing keys sign, but no CA, rotation or OCSP signer can be created",
        "check the HSM partition's policy and that the token directory is writable (SoftHSM2)",
    ),
    p11.TemplateInconsistent: (
        "CKR_TEMPLATE_INCONSISTENT",
        "the token's policy refuses the key attributes chargepki asks for (sensitive, not extractable, sign only)",
        "allow such keys in the HSM partition's policy",
    ),
    p11.AttributeValueInvalid: (
        "CKR_ATTRIBUTE_VALUE_INVALID",
        "the token's policy refuses a key attribute chargepki asks for (sensitive, not extractable, sign only)",
        "allow such keys in the HSM partition's policy",
    ),
    p11.SessionCount: (
        "CKR_SESSION_COUNT",
        "the token has no session left for this process",
        "other processes hold its sessions: check the HSM's session limit against the running services",
    ),
    p11.FunctionNotSupported: (
        "CKR_FUNCTION_NOT_SUPPORTED",
        "the module does not implement a function chargepki needs",
        "check the module is the HSM vendor's PKCS#11 library, in a version supporting PKCS#11 2.20 or later",
    ),
}


def _pkcs11_cause(exc: BaseException) -> p11.PKCS11Error | None:
    """The PKCS#11 error behind a ``TokenError`` (raised ``from None``, which keeps ``__context__``)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, p11.PKCS11Error):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def explain(exc: BaseException, pin_source: str = "the PIN source") -> tuple[str, str, str]:
    """(error name, what it means, what to check) for a PKCS#11 error or a ``TokenError`` around one."""
    cause = _pkcs11_cause(exc)
    if cause is not None:
        for kind, (name, meaning, remedy) in _EXPLAINED.items():
            if isinstance(cause, kind):
                return name, meaning, remedy.format(pin_source=pin_source)
        name = type(cause).__name__
        return name, f"the token answered {name}", "look the error up in the HSM's documentation and client log"
    return "token_error", str(exc), "see the message; the steps above say what works"


def pin_source(settings: Pkcs11Settings, environ: Mapping[str, str]) -> str:
    """Where the PIN comes from, in words (never the PIN)."""
    if environ.get(settings.pin_env):
        return f"the environment variable {settings.pin_env}"
    if settings.pin_file is not None:
        return f"the file {settings.pin_file}"
    return "nowhere"


def _flag_names(flags: int, kind: type[TokenFlag] | type[SlotFlag]) -> list[str]:
    return [member.name for member in kind if member.name and member.value and flags & member.value]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip().rstrip("\x00").strip()


def _slot_content(slot: Mapping[str, Any]) -> str:
    if not slot["token_present"]:
        return "(no token)"
    return repr(slot["token_label"]) if slot["token_label"] else "(uninitialised token)"


def _softhsm_tokendir(conf: Path) -> Path | None:
    for line in conf.read_text(encoding="utf-8").splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "directories.tokendir" and value.strip():
            return Path(value.strip())
    return None


# -- mechanisms each key type needs ----------------------------------------------------------
_ECDSA_COMBINED = {
    "sha256": Mechanism.ECDSA_SHA256,
    "sha384": Mechanism.ECDSA_SHA384,
    "sha512": Mechanism.ECDSA_SHA512,
}
_RSA_COMBINED = {"pkcs1": Mechanism.SHA256_RSA_PKCS, "pss": Mechanism.SHA256_RSA_PKCS_PSS}
_RSA_RAW = {"pkcs1": Mechanism.RSA_PKCS, "pss": Mechanism.RSA_PKCS_PSS}


def _signing_options(spec: KeySpec) -> list[tuple[str, tuple[Mechanism, ...]]]:
    """(what is signed, mechanisms any one of which does it), in the order ``token_keys`` prefers them."""
    if spec.algorithm == "ec":
        hash_name = spec.signature_hash.name
        return [(f"ECDSA with {hash_name.upper()}", (_ECDSA_COMBINED[hash_name], Mechanism.ECDSA))]
    return [
        (f"RSA {'PKCS#1 v1.5' if padding_name == 'pkcs1' else 'PSS'} with SHA256",
         (_RSA_COMBINED[padding_name], _RSA_RAW[padding_name]))
        for padding_name in RSA_PADDINGS
    ]  # fmt: skip


def _generation(spec: KeySpec) -> Mechanism:
    return Mechanism.EC_KEY_PAIR_GEN if spec.algorithm == "ec" else Mechanism.RSA_PKCS_KEY_PAIR_GEN


def _signatures(spec: KeySpec) -> list[tuple[str, Any]]:
    """(name, the ``cryptography`` arguments after the data) of each signature the CA makes with this key type."""
    hash_algorithm = spec.signature_hash
    if spec.algorithm == "ec":
        return [(f"ECDSA-{hash_algorithm.name.upper()}", (ec.ECDSA(hash_algorithm),))]
    pss = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
    return [
        (f"RSA-PKCS1v15-{hash_algorithm.name.upper()}", (padding.PKCS1v15(), hash_algorithm)),
        (f"RSA-PSS-{hash_algorithm.name.upper()}", (pss, hash_algorithm)),
    ]


class _Doctor:
    """The steps in order; each returns its finding and leaves what later steps need on ``self``."""

    def __init__(self, settings: Pkcs11Settings, environ: Mapping[str, str], key_types: Sequence[str]) -> None:
        self.settings = settings
        self.environ = environ
        self.specs = [key_spec(name) for name in key_types]
        self.source = pin_source(settings, environ)
        self.pin: str | None = None
        self.library: Any = None
        self.slots: list[Any] = []
        self.token: Any = None
        self.logged_in = False
        self.mechanisms_ok: dict[str, bool] = {}
        self.signer: Token | None = None
        self.signer_error: ChargepkiError | None = None

    def _problem(self, check: str, exc: BaseException, summary: str, **extra: Any) -> Finding:
        error, meaning, remedy = explain(exc, self.source)
        return Finding(check, PROBLEM, f"{summary}: {error}", error=error, explanation=meaning, remedy=remedy, **extra)

    # -- config -------------------------------------------------------------------------
    def config(self) -> Finding:
        settings = self.settings
        details: dict[str, Any] = {
            "module": settings.module,
            "token_label": settings.token_label,
            "pin_source": self.source,
            "softhsm_conf": str(settings.softhsm_conf) if settings.softhsm_conf else None,
        }
        try:
            self.pin = settings.read_pin(self.environ)
        except ChargepkiError as exc:
            return Finding(
                "config", PROBLEM, f"no usable PIN: {exc}", error="no_pin",
                explanation="chargepki reads the user PIN from an environment variable or a file, never an argument",
                remedy=f"set {settings.pin_env}, or [pkcs11] pin_file in chargepki.toml to a 0600 file holding the PIN",
                details=details,
            )  # fmt: skip
        conf = settings.softhsm_conf
        if conf is not None:
            problem = self._softhsm_problem(conf)
            if problem is not None:
                return Finding(
                    "config", PROBLEM, problem, error="softhsm_conf",
                    explanation="SoftHSM2 reads its configuration (SOFTHSM2_CONF) and token directory at start",
                    remedy="chargepki run --setup-only re-creates the embedded token's configuration; otherwise "
                    "correct [pkcs11] softhsm_conf",
                    details=details,
                )  # fmt: skip
        summary = f"module {settings.module}, token {settings.token_label!r}, PIN from {self.source}"
        if settings.pin_file is not None and not self.environ.get(settings.pin_env):
            mode = stat.S_IMODE(settings.pin_file.stat().st_mode)
            details["pin_file_mode"] = f"{mode:04o}"
            if mode & 0o077:
                return Finding(
                    "config", WARNING, f"{summary}; the PIN file is mode {mode:04o}",
                    explanation="other accounts on this machine can read the PIN",
                    remedy=f"chmod 600 {settings.pin_file}", details=details,
                )  # fmt: skip
        return Finding("config", OK, summary, details=details)

    @staticmethod
    def _softhsm_problem(conf: Path) -> str | None:
        if not conf.is_file():
            return f"the SoftHSM2 configuration {conf} does not exist"
        try:
            tokendir = _softhsm_tokendir(conf)
        except (OSError, UnicodeError) as exc:
            return f"cannot read the SoftHSM2 configuration {conf}: {exc}"
        if tokendir is None:
            return f"{conf} names no directories.tokendir"
        if not tokendir.is_dir() or not os.access(tokendir, os.R_OK | os.W_OK | os.X_OK):
            return f"the token directory {tokendir} named in {conf} is missing or not readable and writable"
        return None

    # -- module -------------------------------------------------------------------------
    def module(self) -> Finding:
        path = Path(self.settings.module)
        details: dict[str, Any] = {"path": str(path)}
        if not path.exists():
            return Finding(
                "module", PROBLEM, f"no file at {path}", error="module_missing",
                explanation="the PKCS#11 module (a shared library from the HSM's client or SoftHSM2) is not there",
                remedy="install it (Debian: apt-get install softhsm2; an HSM: its client package) or correct "
                "[pkcs11] module in chargepki.toml",
                details=details,
            )  # fmt: skip
        if not os.access(path, os.R_OK):
            return Finding(
                "module", PROBLEM, f"{path} is not readable by this user", error="module_unreadable",
                explanation="the module file exists but this account may not read it",
                remedy=f"check the permissions of {path} and of the directories above it", details=details,
            )  # fmt: skip
        try:
            with _CALL_LOCK:
                self.library = _library(str(path), self.settings.softhsm_conf).lib
        except TokenError as exc:
            cause = _pkcs11_cause(exc)
            if cause is not None and type(cause) is p11.PKCS11Error:  # python-pkcs11: dlopen or C_GetFunctionList
                return Finding(
                    "module", PROBLEM, f"cannot load {path}: {cause}", error="module_unloadable",
                    explanation="the file is not a PKCS#11 module, is built for another architecture, or a "
                    "library it needs is missing",
                    remedy=f"ldd {path}; check it is the HSM vendor's PKCS#11 library", details=details,
                )  # fmt: skip
            return self._problem("module", exc, f"{path} loaded but did not initialise (C_Initialize)", details=details)
        library = self.library
        details.update(
            manufacturer=_text(library.manufacturer_id),
            description=_text(library.library_description),
            library_version="{}.{}".format(*library.library_version),
            cryptoki_version="{}.{}".format(*library.cryptoki_version),
        )
        summary = (
            f"{details['description']} {details['library_version']} by {details['manufacturer']} "
            f"(Cryptoki {details['cryptoki_version']}): {path}"
        )
        return Finding("module", OK, summary, details=details)

    # -- slots --------------------------------------------------------------------------
    def list_slots(self) -> Finding:
        try:
            with _CALL_LOCK:
                self.slots = list(self.library.get_slots())
                listed = [self._slot(slot) for slot in self.slots]
        except p11.PKCS11Error as exc:
            return self._problem("slots", exc, "cannot list the slots (C_GetSlotList)")
        if not listed:
            return Finding(
                "slots", PROBLEM, "the module reports no slot", error="no_slots",
                explanation="the module sees no token at all",
                remedy="SoftHSM2: check directories.tokendir in softhsm2.conf; an HSM: that its client is "
                "configured and the partition assigned to this client",
            )  # fmt: skip
        shown = ", ".join(f"{slot['slot_id']:#x} {_slot_content(slot)}" for slot in listed)
        return Finding("slots", OK, f"{len(listed)} slot(s): {shown}", details={"slots": listed})

    @staticmethod
    def _slot(slot: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "slot_id": int(slot.slot_id),
            "description": _text(slot.slot_description),
            "token_present": bool(slot.flags & SlotFlag.TOKEN_PRESENT),
            "token_label": None,
        }
        if entry["token_present"]:
            try:
                entry["token_label"] = _text(slot.get_token().label)
            except p11.PKCS11Error as exc:  # a slot whose token went away between the two calls
                entry["token_label"] = None
                entry["error"] = explain(exc)[0]
        return entry

    # -- token --------------------------------------------------------------------------
    def find_token(self) -> Finding:
        label = self.settings.token_label
        matches = []
        try:
            with _CALL_LOCK:
                for slot in self.slots:
                    if slot.flags & SlotFlag.TOKEN_PRESENT:
                        token = slot.get_token()
                        if _text(token.label) == label:
                            matches.append(token)
        except p11.PKCS11Error as exc:
            return self._problem("token", exc, f"cannot read the token information of {label!r} (C_GetTokenInfo)")
        if not matches:
            return Finding(
                "token", PROBLEM, f"no token labelled {label!r} in any slot", error="no_such_token",
                explanation="PKCS#11 has no error code for this: no slot holds a token with that label",
                remedy="compare [pkcs11] token_label with the slots listed above; SoftHSM2: that softhsm2.conf "
                "points at the token directory that holds it (chargepki init creates the embedded token)",
            )  # fmt: skip
        if len(matches) > 1:
            return Finding(
                "token", PROBLEM, f"{len(matches)} tokens are labelled {label!r}", error="several_tokens",
                explanation="chargepki finds its token by label, so the label must be unique in the module",
                remedy="relabel or remove the other tokens",
            )  # fmt: skip
        token = self.token = matches[0]
        flags = int(token.flags)
        details = {
            "label": _text(token.label),
            "manufacturer": _text(token.manufacturer_id),
            "model": _text(token.model),
            "serial": _text(token.serial),
            "slot_id": int(token.slot.slot_id),
            "flags": _flag_names(flags, TokenFlag),
        }
        summary = (
            f"{details['label']!r}: {details['manufacturer']} {details['model']}, serial {details['serial']}, "
            f"flags {', '.join(details['flags']) or '-'}"
        )
        if not flags & TokenFlag.TOKEN_INITIALIZED:
            return Finding(
                "token", PROBLEM, summary, error="token_not_initialized", details=details,
                explanation="the token was never initialised (C_InitToken): it has no SO PIN, user PIN or keys",
                remedy="initialise it with the HSM's tool (SoftHSM2: softhsm2-util --init-token), or let "
                "chargepki init create the embedded one",
            )  # fmt: skip
        if flags & TokenFlag.USER_PIN_LOCKED:
            return Finding(
                "token", PROBLEM, summary, error="CKR_PIN_LOCKED", details=details,
                explanation="the token says its user PIN is locked after too many wrong attempts",
                remedy=_EXPLAINED[p11.PinLocked][2].format(pin_source=self.source),
            )  # fmt: skip
        if flags & TokenFlag.USER_PIN_FINAL_TRY:
            return Finding(
                "token", PROBLEM, summary, error="pin_final_try", details=details,
                explanation="one more wrong PIN locks the token, so the doctor did not try to log in",
                remedy=f"make sure {self.source} holds the right PIN; the next successful login (any chargepki "
                "command that signs) resets the count",
            )  # fmt: skip
        if flags & (TokenFlag.USER_PIN_COUNT_LOW | TokenFlag.USER_PIN_TO_BE_CHANGED | TokenFlag.WRITE_PROTECTED):
            return Finding(
                "token", WARNING, summary, details=details,
                explanation="USER_PIN_COUNT_LOW: a wrong PIN was offered since the last good login; "
                "USER_PIN_TO_BE_CHANGED: the token wants a new PIN; WRITE_PROTECTED: no new keys can be made",
                remedy="see the flags above",
            )  # fmt: skip
        return Finding("token", OK, summary, details=details)

    # -- login --------------------------------------------------------------------------
    def login(self) -> Finding:
        try:
            with _CALL_LOCK, self.token.open(rw=True, user_pin=self.pin):
                pass
        except p11.UserAlreadyLoggedIn:
            self.logged_in = True
            return Finding(
                "login", WARNING, "this process was logged in already: the PIN was not checked again",
                explanation="PKCS#11 logs in a whole process; another part of this process logged in first",
                remedy="run `chargepki token doctor` in a process of its own",
            )  # fmt: skip
        except p11.PKCS11Error as exc:
            return self._problem("login", exc, f"cannot log in with the PIN from {self.source}")
        self.logged_in = True
        return Finding("login", OK, f"logged in as the user with the PIN from {self.source}, then logged out")

    # -- mechanisms ---------------------------------------------------------------------
    def mechanisms(self, spec: KeySpec) -> Finding:
        try:
            with _CALL_LOCK:
                offered = set(self.token.slot.get_mechanisms())
                generation = _generation(spec)
                info = self.token.slot.get_mechanism_info(generation) if generation in offered else None
        except p11.PKCS11Error as exc:
            self.mechanisms_ok[spec.name] = False
            return self._problem("mechanisms", exc, "cannot list the mechanisms", key_type=spec.name)
        missing, used = [], []
        if info is None:
            missing.append(f"CKM_{generation.name} (key generation)")
        else:
            low, high = info.min_key_length, info.max_key_length
            used.append(f"CKM_{generation.name} ({low}-{high} bits)")
            # RSA only: PKCS#11 gives RSA sizes in bits, but some modules give EC sizes in bytes (the
            # round trip below shows whether a curve works).
            if spec.algorithm == "rsa" and low and high and not low <= spec.bits <= high:
                missing.append(f"CKM_{generation.name} for {spec.bits}-bit keys (the token: {low}-{high})")
        for what, choices in _signing_options(spec):
            present = [mechanism for mechanism in choices if mechanism in offered]
            if present:
                used.append(f"CKM_{present[0].name}")
            else:
                missing.append(f"{' or '.join(f'CKM_{m.name}' for m in choices)} ({what})")
        self.mechanisms_ok[spec.name] = not missing
        details = {"present": used, "missing": missing}
        if missing:
            return Finding(
                "mechanisms", PROBLEM, f"{spec.name}: missing {'; '.join(missing)}", key_type=spec.name,
                error="mechanism_missing", details=details,
                explanation=f"the token cannot make {spec.name} keys or their signatures",
                remedy=f"enable the mechanism in the HSM's policy, or create no CA with {spec.name} keys (--key-type)",
            )  # fmt: skip
        return Finding("mechanisms", OK, f"{spec.name}: {', '.join(used)}", key_type=spec.name, details=details)

    # -- keys ---------------------------------------------------------------------------
    def open_signer(self) -> None:
        """The CA's own ``Token`` class from here on: the round trips take the code path the CA takes."""
        settings = self.settings
        try:
            self.signer = Token(
                settings.module, settings.token_label, self.pin or "", softhsm_conf=settings.softhsm_conf
            )
        except ChargepkiError as exc:
            self.signer_error = exc

    def leftover_keys(self) -> Finding:
        if self.signer is None:
            assert self.signer_error is not None
            return self._problem("leftover_keys", self.signer_error, "cannot open a session")
        try:
            left = sorted(self.signer.key_labels(TEMPORARY_PREFIX))
        except TokenError as exc:
            return self._problem("leftover_keys", exc, "cannot list the token's keys")
        if left:
            return Finding(
                "leftover_keys", WARNING, f"temporary keys of an interrupted earlier run: {', '.join(left)}",
                details={"labels": left},
                explanation="a doctor run was killed between generating and destroying its temporary key",
                remedy="delete them with the HSM's tool, e.g. pkcs11-tool --delete-object --type privkey --label LABEL "
                "(and --type pubkey); no CA uses these labels",
            )  # fmt: skip
        return Finding("leftover_keys", OK, "no temporary key of an earlier run", details={"labels": []})

    def sign_verify(self, spec: KeySpec) -> Finding:
        signer = self.signer
        if signer is None:
            assert self.signer_error is not None
            return self._problem("sign_verify", self.signer_error, f"{spec.name}: cannot open a session",
                                 key_type=spec.name)  # fmt: skip
        label = f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}"
        details: dict[str, Any] = {"label": label, "signatures": [], "destroyed": False}
        outcome: Finding | None = None
        try:
            public_key = signer.generate_key(spec, label)
            private_key = token_private_key(signer, label, public_key)
            challenge = secrets.token_bytes(64)
            for name, arguments in _signatures(spec):
                signature = private_key.sign(challenge, *arguments)
                _verify(public_key, signature, challenge, arguments)
                details["signatures"].append(name)
        except InvalidSignature:
            outcome = Finding(
                "sign_verify", PROBLEM, f"{spec.name}: the token's signature does not verify", key_type=spec.name,
                error="signature_invalid", details=details,
                explanation="the token returned a signature that the key's public half does not verify",
                remedy="a faulty HSM firmware or module: report it to the vendor; do not create CAs with this key type",
            )  # fmt: skip
        except ChargepkiError as exc:
            outcome = self._problem("sign_verify", exc, f"{spec.name}: {exc}", key_type=spec.name, details=details)
        finally:
            cleanup = self._destroy(label, spec, details)
        if cleanup is not None:
            return cleanup
        if outcome is not None:
            return outcome
        signed = ", ".join(details["signatures"])
        summary = f"{spec.name}: {signed} signed in the token and verified; temporary key destroyed"
        return Finding("sign_verify", OK, summary, key_type=spec.name, details=details)

    def _destroy(self, label: str, spec: KeySpec, details: dict[str, Any]) -> Finding | None:
        """Destroy the temporary key and look again; a finding only when something is left."""
        assert self.signer is not None
        try:
            self.signer.destroy_key(label)
            left = self.signer.key_labels(label)
        except ChargepkiError as exc:
            name, meaning, _ = explain(exc, self.source)
            left, details["destroy_error"] = {label}, f"{name}: {meaning}"
        details["destroyed"] = not left
        if not left:
            return None
        return Finding(
            "sign_verify", PROBLEM, f"{spec.name}: the temporary key {label!r} could not be destroyed",
            key_type=spec.name, error="key_left_behind", details=details,
            explanation="the token kept the temporary key pair of this check",
            remedy=f"delete the objects labelled {label} with the HSM's tool (pkcs11-tool --delete-object "
            f"--type privkey --label {label}, then --type pubkey); no CA uses this label",
        )  # fmt: skip

    def close(self) -> None:
        if self.signer is not None:
            self.signer.close()


def _verify(public_key: Any, signature: bytes, data: bytes, arguments: tuple[Any, ...]) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        public_key.verify(signature, data, *arguments)
        return
    raise InvalidSignature


def _skipped(check: str, why: str, key_type: str | None = None) -> Finding:
    return Finding(check, SKIPPED, f"{key_type + ': ' if key_type else ''}skipped: {why}", key_type=key_type)


def diagnose(settings: Pkcs11Settings, environ: Mapping[str, str], *, key_types: Sequence[str]) -> Iterator[Finding]:
    """Every check in order, each yielded as soon as it is done (key generation takes seconds).

    A step that cannot run because an earlier one failed is yielded as ``skipped``, so the list of
    checks is the same on every run.
    """
    doctor = _Doctor(settings, environ, key_types)
    keys = doctor.specs
    steps: list[tuple[str, Callable[[], Finding]]] = [("module", doctor.module), ("slots", doctor.list_slots)]
    yield doctor.config()
    blocked: str | None = None
    for name, step in steps:
        if blocked:
            yield _skipped(name, blocked)
            continue
        finding = step()
        yield finding
        if finding.status == PROBLEM:
            blocked = f"the {name} check failed"
    if blocked:
        for name in ("token", "login"):
            yield _skipped(name, blocked)
        yield from (_skipped("mechanisms", blocked, spec.name) for spec in keys)
        yield _skipped("leftover_keys", blocked)
        yield from (_skipped("sign_verify", blocked, spec.name) for spec in keys)
        return
    token = doctor.find_token()
    yield token
    if token.status == PROBLEM:
        yield _skipped("login", "the token check failed")
        yield from (_skipped("mechanisms", "the token check failed", spec.name) for spec in keys)
        yield _skipped("leftover_keys", "the token check failed")
        yield from (_skipped("sign_verify", "the token check failed", spec.name) for spec in keys)
        return
    if doctor.pin is None:
        yield _skipped("login", "no PIN (see the config check)")
    else:
        yield doctor.login()
    for spec in keys:
        yield doctor.mechanisms(spec)
    if not doctor.logged_in:
        yield _skipped("leftover_keys", "not logged in")
        yield from (_skipped("sign_verify", "not logged in", spec.name) for spec in keys)
        return
    doctor.open_signer()
    try:
        yield doctor.leftover_keys()
        for spec in keys:
            if doctor.mechanisms_ok.get(spec.name):
                yield doctor.sign_verify(spec)
            else:
                yield _skipped("sign_verify", "its mechanisms are missing", spec.name)
    finally:
        doctor.close()
