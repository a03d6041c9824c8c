"""Secrets never leave the places meant for them.

A real first-run home (embedded SoftHSM2 token, PINs in 0600 files) serves EST and OCSP in
their own processes; the test enrolls with one-time secrets, with wrong passwords and through
an RA, issues secrets in a batch, runs commands with a wrong PIN and against a server whose
PIN is wrong, checks the token with `token doctor`, prints the JSON views and signs a report, logs in
to the fleet console with a one-time link and an admin certificate and views its pages,
then reads everything the services and commands wrote: every file in the home
except the few that exist to hold a secret, the server logs, every audit column, the SQLite
database bytes, CLI output and HTTP error bodies. None may contain a PIN, a one-time secret,
a wrong password, a wrong PIN or private key material.
"""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import requests
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import text

from ca.store.engine import Store
from tests.est_server import free_port, start_server
from tests.helpers import chargepki, make_csr, make_key

ORG = "Secret Charging"
PKCS10 = {"Content-Type": "application/pkcs10"}


def _b64csr(serial: str, key=None) -> bytes:  # type: ignore[no-untyped-def]
    pem = make_csr(serial, organization=ORG, key=key or make_key())
    return base64.encodebytes(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))


def _key_material(pem: str) -> list[str]:
    """Distinctive pieces of a PEM private key: its base64 lines."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def test_no_secret_reaches_a_log_an_audit_entry_an_error_or_an_output(tmp_path: Path) -> None:
    home = tmp_path / "var"
    outputs: list[str] = []  # everything commands and servers said to a person

    def cli(*args: str, env: dict[str, str] | None = None, keep: bool = True) -> str:
        result = chargepki(home, *args, env={"CHARGEPKI_ORG": ORG, **(env or {})})
        if keep:
            outputs.append(result.stdout + result.stderr)
        return result.stdout

    cli("run", "--setup-only")
    user_pin = (home / "softhsm" / "user.pin").read_text().strip()
    so_pin = (home / "softhsm" / "so.pin").read_text().strip()
    root_pem = cli("ca", "chain").split("-----END CERTIFICATE-----")[1] + "-----END CERTIFICATE-----\n"
    root = tmp_path / "root.pem"
    root.write_text(root_pem.lstrip())

    # One-time secrets: printed once by `token issue` (that output is the one place they belong).
    cli("device", "add", "CP-S-1")
    cli("device", "add", "CP-S-2")
    cli("device", "add", "CP-S-3")
    secret = cli("token", "issue", "CP-S-1", keep=False).strip()
    serials = tmp_path / "serials.txt"
    serials.write_text("CP-S-3\n")
    batch = tmp_path / "batch.csv"
    cli("token", "issue-batch", "--file", str(serials), "--out", str(batch))
    batch_secret = batch.read_text().splitlines()[1].split(",")[1]
    ra_dir = tmp_path / "ra"
    cli("ra", "add", "Line 1", "--out-dir", str(ra_dir))
    ra_key = (ra_dir / "Line_1.key").read_text()

    wrong_passwords = [f"WRONG-{secrets.token_hex(8)}" for _ in range(3)]
    wrong_pin = f"WRONGPIN-{secrets.token_hex(8)}"
    est = start_server(home, free_port())
    ocsp = start_server(home, free_port(), service="ocsp")
    answers: list[str] = []
    try:
        url = est.url
        for password in wrong_passwords:
            answers.append(
                requests.post(
                    f"{url}/simpleenroll", data=_b64csr("CP-S-1"), auth=("CP-S-1", password), headers=PKCS10,
                    verify=str(root), timeout=30,
                ).text
            )  # fmt: skip
        good = requests.post(
            f"{url}/simpleenroll", data=_b64csr("CP-S-1"), auth=("CP-S-1", secret), headers=PKCS10,
            verify=str(root), timeout=30,
        )  # fmt: skip
        assert good.status_code == 200, good.text
        reused = requests.post(
            f"{url}/simpleenroll", data=_b64csr("CP-S-1"), auth=("CP-S-1", secret), headers=PKCS10,
            verify=str(root), timeout=30,
        )  # fmt: skip
        assert reused.status_code == 401
        answers.append(reused.text)
        by_ra = requests.post(
            f"{url}/simpleenroll", data=_b64csr("CP-S-2"), headers=PKCS10, verify=str(root), timeout=30,
            cert=(str(ra_dir / "Line_1.pem"), str(ra_dir / "Line_1.key")),
        )  # fmt: skip
        assert by_ra.status_code == 200, by_ra.text
        ocsp_answer = requests.get(f"http://127.0.0.1:{ocsp.port}/ocsp/MAA=", timeout=30)
        assert ocsp_answer.status_code == 200
    finally:
        est.stop()
        ocsp.stop()

    # A wrong PIN: from the environment for a command, from a PIN file for a server.
    cli("issue", "--csr", str(_write_csr(tmp_path)), "--profile", "charger", env={"CHARGEPKI_PKCS11_PIN": wrong_pin})
    assert "Error:" in outputs[-1] and "PIN" in outputs[-1], outputs[-1]  # refused, saying why
    wrong_home = _home_with_wrong_pin(home, tmp_path / "wrong-home", wrong_pin)
    wrong_est = start_server(wrong_home, free_port())
    try:
        refused = requests.post(
            f"{wrong_est.url}/simpleenroll", data=_b64csr("CP-S-3"), auth=("CP-S-3", batch_secret), headers=PKCS10,
            verify=str(root), timeout=30,
        )  # fmt: skip
        assert refused.status_code == 503, refused.text
        answers.append(refused.text)
    finally:
        wrong_est.stop()
    # The fleet console: a login link (printed once, by that command) spent over HTTPS, pages viewed with the
    # session and with an admin certificate; the link's token, the cookie and the admin's key stay out of
    # every log, page and audit entry.
    admin_dir = tmp_path / "admin"
    cli("console", "admin-cert", "--name", "alice", "--out", str(admin_dir))
    admin_key = (admin_dir / "alice.key").read_text()
    link = cli("console", "login-link", "--name", "alice", keep=False).strip()
    login_token = link.split("token=", 1)[1]
    console = start_server(home, free_port(), service="console", workers=1, direct=False)
    try:
        base = f"https://localhost:{console.port}"
        browser = requests.Session()
        answers.append(browser.get(f"{base}/login?token={login_token}", verify=str(root), timeout=30).text.replace(
            login_token, ""  # the login form carries the token back to the one who holds it: its only place
        ))  # fmt: skip
        logged_in = browser.post(f"{base}/login", data={"token": login_token}, verify=str(root), timeout=30)
        assert logged_in.status_code == 200 and "alice (login link)" in logged_in.text, logged_in.text[:300]
        session_cookie = browser.cookies.get("chargepki_console")
        assert session_cookie
        for path in ("/", "/devices", "/devices/CP-S-1", "/audit", "/campaigns", "/audit?action=secret.issued"):
            page = browser.get(base + path, verify=str(root), timeout=30)
            assert page.status_code == 200, path
            answers.append(page.text)
        by_certificate = requests.get(
            f"{base}/audit", cert=(str(admin_dir / "alice.pem"), str(admin_dir / "alice.key")), verify=str(root),
            timeout=30,
        )  # fmt: skip
        assert by_certificate.status_code == 200
        answers.append(by_certificate.text)
        answers.append(requests.post(f"{base}/login", data={"token": login_token}, verify=str(root), timeout=30).text)
    finally:
        console.stop()
    cli("crl", "publish")
    cli("audit", "show", "--limit", "1000")
    cli("audit", "verify")

    # The operations commands: the token doctor (which reads the PIN and logs in), the JSON views and a
    # signed report. They say where the PIN comes from, never what it is.
    cli("token", "doctor")
    assert "token doctor: the token is ready" in outputs[-1], outputs[-1]
    cli("token", "doctor", "--json", env={"CHARGEPKI_PKCS11_PIN": wrong_pin})
    assert "CKR_PIN_INCORRECT" in outputs[-1] and "CHARGEPKI_PKCS11_PIN" in outputs[-1]
    for command in (
        ("device", "list", "--json"), ("device", "show", "CP-S-1", "--json"), ("cert", "list", "--json"),
        ("audit", "show", "--limit", "1000", "--json"), ("audit", "verify", "--json"), ("ca", "list", "--json"),
        ("report", "expiring", "--format", "json"), ("report", "inventory", "--format", "csv"),
    ):  # fmt: skip
        printed = cli(*command)
        assert printed, command
        if "--json" in command or "json" in command:
            json.loads(printed)  # one JSON document on stdout, nothing else
    export = tmp_path / "inventory.json"
    cli("report", "inventory", "--format", "json", "--out", str(export), "--sign")
    assert "Verified OK" in _openssl_verify(outputs[-1])

    forbidden = {
        "the user PIN": user_pin,
        "the SO PIN": so_pin,
        "a one-time secret": secret,
        "a batch secret": batch_secret,
        "a wrong PIN": wrong_pin,
        **{f"wrong password {i}": value for i, value in enumerate(wrong_passwords)},
        **{f"RA key line {i}": line for i, line in enumerate(_key_material(ra_key))},
        **{
            f"EST TLS key line {i}": line
            for i, line in enumerate(_key_material((home / "est" / "server.key").read_text()))
        },
        "a PEM private key": "PRIVATE KEY-----",
        "a console login link's token": login_token,
        "a console session cookie": session_cookie,
        **{f"admin key line {i}": line for i, line in enumerate(_key_material(admin_key))},
        **{
            f"console TLS key line {i}": line
            for i, line in enumerate(_key_material((home / "console" / "server.key").read_text()))
        },
    }
    places = _everything_written(home, wrong_home) | {f"output {i}": o.encode() for i, o in enumerate(outputs)}
    places |= {path.name: path.read_bytes() for path in tmp_path.glob("inventory.json*")}
    places |= {f"HTTP answer {i}": a.encode() for i, a in enumerate(answers)}
    places["audit table"] = _audit_rows(home).encode()
    assert "enrollment.refused" in places["audit table"].decode(), "the refusals were audited"
    assert (home / "est").exists() and any(name.startswith("est-") for name in places)
    leaks = [
        f"{what} in {where}"
        for where, data in places.items()
        for what, value in forbidden.items()
        if value.encode() in data
    ]
    assert not leaks, leaks


def _openssl_verify(output: str) -> str:
    """Run the `verify: openssl …` command a signed report printed; its stdout."""
    (line,) = [line for line in output.splitlines() if line.startswith("verify: ")]
    done = subprocess.run(shlex.split(line.removeprefix("verify: ")), capture_output=True, text=True, timeout=60)
    return done.stdout


def _write_csr(tmp_path: Path) -> Path:
    path = tmp_path / "cp.csr"
    path.write_bytes(make_csr("CP-S-9", organization=ORG))
    return path


def _home_with_wrong_pin(home: Path, other: Path, wrong_pin: str) -> Path:
    """A second home on the same database and token whose PIN file holds a wrong PIN."""
    other.mkdir(mode=0o700)
    config = tomllib.loads((home / "chargepki.toml").read_text())
    pin_file = other / "wrong.pin"
    pin_file.write_text(wrong_pin + "\n")
    pin_file.chmod(0o600)
    config["pkcs11"]["pin_file"] = str(pin_file)
    config["pkcs11"]["embedded"] = False
    (other / "chargepki.toml").write_text(tomli_w.dumps(config))
    shutil.copytree(home / "est", other / "est")  # the service's TLS identity, so no issuance is needed at start
    return other


# Files that exist to hold a secret: the PIN files, the token's own storage, the TLS key.
_SECRET_HOLDERS = (
    "softhsm/user.pin", "softhsm/so.pin", "softhsm/tokens/", "est/server.key", "console/server.key", "wrong.pin",
)  # fmt: skip


def _everything_written(*homes: Path) -> dict[str, bytes]:
    found = {}
    for home in homes:
        for path in home.rglob("*"):
            relative = path.relative_to(home).as_posix()
            if path.is_file() and not any(relative.startswith(holder) for holder in _SECRET_HOLDERS):
                found[relative] = path.read_bytes()
    return found


def _audit_rows(home: Path) -> str:
    store = Store(f"sqlite:///{home / 'chargepki.db'}", read_only=True)
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(text("SELECT actor, action, subject, details FROM audit_events")).all()
    finally:
        store.dispose()
    return json.dumps([list(row) for row in rows])
