"""The fleet console in a real browser: Debian's chromium, headless, driven by Selenium through chromedriver.

One real installation (``chargepki run --setup-only``: SQLite and the embedded SoftHSM2 token) with a
few devices, a revoked certificate and an admin certificate, all made by the CLI; one ``serve console``
on a loopback HTTPS port; one browser. The browser is refused before logging in, logs in with a
one-time login link, loads every page (content checked against the database, a screenshot of each),
and cannot use the link again. The client-certificate path is shown with a plain TLS client.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from ca.config import load_config
from tests.est_server import EstServer, free_port, start_server
from tests.fault_helpers import children
from tests.helpers import chargepki

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ORG = "Console Charging"
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="Debian's chromium and chromium-driver (make test-deps)"
)


@dataclass
class Site:
    home: Path
    server: EstServer
    root: Path  # the installation's root certificate: the console's TLS trust anchor
    admin_dir: Path
    revoked_serial: str

    @property
    def url(self) -> str:
        return f"https://localhost:{self.server.port}"

    def cli(self, *args: str) -> str:
        done = chargepki(self.home, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def rows(self, query: str) -> list[tuple]:  # type: ignore[type-arg]
        with sqlite3.connect(f"file:{self.home / 'chargepki.db'}?mode=ro", uri=True) as connection:
            return connection.execute(query).fetchall()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("console")
    home = tmp / "var"
    assert chargepki(home, "run", "--setup-only", env={"CHARGEPKI_ORG": ORG}).returncode == 0
    site = Site(home, None, tmp / "root.pem", tmp / "admin", "")  # type: ignore[arg-type]
    chain = site.cli("ca", "chain", "--all")
    site.root.write_text(chain)
    site.cli("device", "add", "CP-WEB-1", "--model", "AC22")
    site.cli("device", "add", "CP-WEB-2", "--model", "DC150")
    csr = tmp / "cp.csr"
    from tests.helpers import make_csr

    csr.write_bytes(make_csr("CP-WEB-9", organization=ORG))
    issued = site.cli("issue", "--csr", str(csr), "--profile", "charger", "--out", str(tmp / "cp.pem"))
    site.revoked_serial = site.rows("SELECT serial FROM certificates WHERE common_name = 'CP-WEB-9'")[0][0]
    assert issued is not None
    site.cli("revoke", site.revoked_serial, "--reason", "keyCompromise")
    site.cli("console", "admin-cert", "--name", "alice", "--out", str(site.admin_dir))
    site.cli("audit", "checkpoint")
    # The PIN in the environment, as with a real HSM: the server reads the audit key, then drops it.
    pin = load_config(home, {}).pkcs11.read_pin({})
    site.server = start_server(
        home, free_port(), service="console", workers=1, direct=False, environ={"CHARGEPKI_PKCS11_PIN": pin}
    )
    try:
        yield site
    finally:
        site.server.stop()


@pytest.fixture(scope="module")
def browser(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1400",
        # the console's certificate chains to this installation's root, which this fresh profile does not hold
        "--ignore-certificate-errors",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _heading(driver: object) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "h1").text  # type: ignore[attr-defined]


def _submit(driver: object, button_id: str) -> None:
    """Click a form's button and wait for the next page (the old one going stale), not for a time."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    button = driver.find_element(By.ID, button_id)  # type: ignore[attr-defined]
    button.click()

    def gone(_driver: object) -> bool:
        # chromedriver reports an element of the page being replaced either as stale or, when the
        # question meets the navigation half-way, as an inspector error about a node no longer in the
        # document (seen once in CI): both mean the old page is gone.
        try:
            button.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" not in str(exc):
                raise
            return True
        return False

    WebDriverWait(driver, 60).until(gone)


def _text(driver: object, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text  # type: ignore[attr-defined]


def test_the_console_in_a_browser(site: Site, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser

    def visit(path: str, shot: str) -> None:
        driver.get(site.url + path)  # type: ignore[attr-defined]
        driver.save_screenshot(str(tmp_path / f"{shot}.png"))  # type: ignore[attr-defined]

    # Not logged in: refused, and nothing of the fleet on the page.
    visit("/", "refused")
    assert _heading(driver) == "401"
    assert "CP-WEB" not in driver.page_source  # type: ignore[attr-defined]

    link = site.cli("console", "login-link", "--name", "alice").strip()
    assert link.startswith("https://localhost:8444/login?token=")  # [console] port: the printed origin
    path = link.split(":", 2)[2].split("/", 1)[1]
    visit("/" + path, "login")
    _submit(driver, "login")
    assert _heading(driver) == "Overview: production"
    driver.save_screenshot(str(tmp_path / "overview.png"))  # type: ignore[attr-defined]
    assert _text(driver, "admin") == "alice (login link)"
    cas = [name for (name,) in site.rows("SELECT name FROM authorities WHERE environment = 'production'")]
    assert cas and all(name in _text(driver, "cas") for name in cas)
    (revoked,) = site.rows("SELECT count(*) FROM certificates WHERE status = 'revoked'")[0]
    assert _text(driver, "revocations-total") == str(revoked)
    status_cell = driver.find_element(By.CSS_SELECTOR, '#by-status td[data-status="revoked"]')  # type: ignore[attr-defined]
    assert status_cell.text == str(revoked)
    assert driver.find_elements(By.CSS_SELECTOR, "svg#revocations rect")  # type: ignore[attr-defined]

    visit("/devices?model=DC150", "devices")
    assert "CP-WEB-2" in _text(driver, "results") and "CP-WEB-1" not in _text(driver, "results")

    visit("/devices/CP-WEB-1", "device")
    assert _heading(driver) == "Device CP-WEB-1" and "no certificate yet" in _text(driver, "history")

    visit(f"/certificates/{site.revoked_serial}", "certificate")
    assert _text(driver, "status") == "revoked"
    assert "revoked" in _text(driver, "ocsp") and "key_compromise" in _text(driver, "ocsp")

    visit("/campaigns", "campaigns")
    assert _heading(driver) == "Re-enrollment campaigns"

    visit("/audit?action=certificate.revoked", "audit")
    (seq,) = site.rows("SELECT max(seq) FROM audit_events WHERE action = 'certificate.revoked'")[0]
    assert str(seq) in _text(driver, "entries")
    (checkpoint,) = site.rows("SELECT max(seq) FROM audit_checkpoints")[0]
    assert _text(driver, "checkpoint-seq") == str(checkpoint)

    visit("/devices?page=zero", "bad-input")
    assert _heading(driver) == "400" and "page" in _text(driver, "message")

    # The link was spent by the login above: a second browser session cannot use it.
    driver.delete_all_cookies()  # type: ignore[attr-defined]
    visit("/" + path, "login-again")
    _submit(driver, "login")
    assert _heading(driver) == "403"
    visit("/", "refused-again")
    assert _heading(driver) == "401"
    assert len(list(tmp_path.glob("*.png"))) == 11


def test_an_admin_certificate_opens_the_console_without_a_link(site: Site) -> None:
    cert = (str(site.admin_dir / "alice.pem"), str(site.admin_dir / "alice.key"))
    answer = requests.get(f"{site.url}/devices?serial=CP-WEB", cert=cert, verify=str(site.root), timeout=30)
    assert answer.status_code == 200 and "alice (client certificate)" in answer.text and "CP-WEB-1" in answer.text
    assert requests.get(f"{site.url}/", verify=str(site.root), timeout=30).status_code == 401
    (serial,) = site.rows("SELECT serial FROM certificates WHERE profile = 'admin'")[0]
    site.cli("revoke", serial, "--reason", "cessationOfOperation")
    assert requests.get(f"{site.url}/", cert=cert, verify=str(site.root), timeout=30).status_code == 403


def test_page_views_reach_the_audit_log_in_summary(site: Site) -> None:
    shown = json.loads(site.cli("audit", "show", "--action", "activity.summary", "--json"))["entries"]
    assert shown and {entry["actor"] for entry in shown} == {"admin:alice"}


def test_the_console_and_its_workers_hold_no_pin(site: Site) -> None:
    """The server reads the audit key's public half before it forks; no console process keeps the PIN."""
    pids = [site.server.process.pid, *children(site.server.process.pid)]
    assert len(pids) >= 2
    for pid in pids:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environment if v.startswith(b"CHARGEPKI_PKCS11_PIN=")], pid
