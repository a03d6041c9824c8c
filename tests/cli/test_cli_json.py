"""`--json` (and the reports' `--format json`) against docs/cli-json.md, on SQLite and PostgreSQL.

The field tables of the document are parsed and each command's output is held to them: every
documented field present, no undocumented one. Every list, show, status and verify command has
`--json`, and every command with `--json` is documented. stdout is exactly one JSON document,
errors included, and no secret appears in any of it.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from ca.authorities.issuers import get_authority, issuer_for
from ca.config import Pkcs11Settings
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.devices import get_device
from ca.store.engine import Store
from ca.work import Work
from cli.main import cli
from ocsp.presign import Presigner
from tests.helpers import ROOT, make_key, oem_root_pem

DOC = ROOT / "docs" / "cli-json.md"
SECTION = re.compile(r"^(#+) (.+)$", re.MULTILINE)
REPORT_FIELDS = {"report", "generated_at", "parameters"}
HEX_SERIALS = {"certificates[].serial", "authorities[].serial", "firmware_signers[].serial"}


def _sections() -> dict[str, list[tuple[str, str, str]]]:
    """Level-3 heading -> the (field, type, meaning) rows of the tables up to the next heading."""
    text = DOC.read_text(encoding="utf-8")
    found = {}
    headings = list(SECTION.finditer(text))
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        body = text[heading.end() : following.start() if following else len(text)]
        rows = []
        for line in body.splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if line.startswith("| ") and len(cells) >= 3 and cells[0] not in ("field", "status", "---"):
                rows.append((cells[0].strip("`"), cells[1], cells[2]))
        if heading.group(1) == "###":
            found[heading.group(2).strip("`")] = rows
    return found


SECTIONS = _sections()


def _reference(kind: str) -> str | None:
    match = re.search(r"\[(\w+)\]\(#\w+\)", kind)
    return match.group(1) if match else None


def documented(section: str) -> tuple[set[str], set[str]]:
    """(every documented path, the free-form objects not to descend into) of one section."""
    paths: set[str] = set()
    free: set[str] = set()
    for field, kind, meaning in SECTIONS[section]:
        referenced = _reference(kind)
        if field == "(all of)":
            if kind == "report":
                paths |= REPORT_FIELDS
            else:
                assert referenced is not None, (section, kind)
                inner, inner_free = documented(referenced)
                paths |= inner
                free |= inner_free
            continue
        paths.add(field)
        if referenced is not None:
            inner, inner_free = documented(referenced)
            prefix = f"{field}[]." if kind.startswith("array") else f"{field}."
            paths |= {prefix + path for path in inner}
            free |= {prefix + path for path in inner_free}
        elif kind == "object" and "free-form" in meaning:
            free.add(field)
    return paths, free


def actual(document: Any, free: set[str], prefix: str = "") -> set[str]:
    """Every path in ``document``: ``a``, ``a.b``, ``a[].b`` (the union over an array's objects)."""
    paths: set[str] = set()
    for key, value in document.items():
        path = prefix + key
        paths.add(path)
        if path in free:
            continue
        if isinstance(value, dict):
            paths |= actual(value, free, path + ".")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    paths |= actual(item, free, path + "[].")
    return paths


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


@pytest.fixture
def installation(home: Path, db_url: str, token: Token, tmp_path: Path) -> dict[str, Any]:
    """Something of everything: CAs, a device with a certificate, a CSMS with a token, a rotation and
    its campaign, a manufacturer with a signed firmware file, a signed checkpoint."""
    steps = [
        ("init", "--org", "Acme Charging", "--country", "DE"),
        ("device", "add", "CP-1", "--model", "Wallbox 22"),
        ("csms", "add", "CSMS-1", "--no-certificate"),
        ("manufacturer", "init", "--org", "Acme Charging"),
        ("firmware", "signer", "add", "fw1"),
    ]
    for step in steps:
        assert run(home, *step).exit_code == 0, step
    store = Store(db_url)
    with store.session() as session:
        device = get_device(session, "CP-1")
        issuer = issuer_for(get_authority(session, "production-issuing-1"), token)
        request = IssueRequest(
            get_profile("charger"), make_key().public_key(), "CP-1", validity=timedelta(days=20), device_id=device.id
        )
        charger = issue(Work(session, "test", status=Presigner(token)), issuer=issuer, request=request).serial
    store.dispose()
    csms_token = run(home, "csms", "token", "CSMS-1").stdout.strip()
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"firmware image\n" * 100)
    oem_root = tmp_path / "oem-root.pem"
    oem_root.write_bytes(oem_root_pem())
    for step in (
        ("csms", "oem-root", "add", str(oem_root)),
        ("ca", "rotate"),
        ("campaign", "start", "--from-ca", "production-issuing-1"),
        ("firmware", "sign", str(firmware), "--signer", "fw1"),
        ("audit", "checkpoint"),
    ):
        assert run(home, *step).exit_code == 0, step
    return {"charger": charger, "csms_token": csms_token, "firmware": firmware}


def _commands(installation: dict[str, Any]) -> dict[str, list[str]]:
    firmware = str(installation["firmware"])
    return {
        "chargepki ca list --json": ["ca", "list", "--json"],
        "chargepki cert list --json": ["cert", "list", "--json"],
        "chargepki cert show SERIAL --json": ["cert", "show", installation["charger"], "--json"],
        "chargepki device list --json": ["device", "list", "--json"],
        "chargepki device show SERIAL --json": ["device", "show", "CP-1", "--json"],
        "chargepki csms list --json": ["csms", "list", "--json"],
        "chargepki csms oem-root list --json": ["csms", "oem-root", "list", "--json"],
        "chargepki campaign list --json": ["campaign", "list", "--json"],
        "chargepki campaign status --json": ["campaign", "status", "--json"],
        "chargepki audit show --json": ["audit", "show", "--json"],
        "chargepki audit verify --json": ["audit", "verify", "--json"],
        "chargepki firmware signer list --json": ["firmware", "signer", "list", "--json"],
        "chargepki firmware verify FILE --json": [
            "firmware",
            "verify",
            firmware,
            "--signature",
            f"{firmware}.sig",
            "--certificate",
            f"{firmware}.crt",
            "--json",
        ],
        "chargepki token doctor --json": ["token", "doctor", "--json"],
        "chargepki report expiring --format json": ["report", "expiring", "--within", "3650d", "--format", "json"],
        "chargepki report inventory --format json": ["report", "inventory", "--format", "json"],
        "chargepki report campaign [NAME] --format json": ["report", "campaign", "1", "--format", "json"],
        "error": ["cert", "show", "0BADC0DE", "--json"],
    }


def test_every_command_prints_the_documented_fields(
    home: Path, installation: dict[str, Any], token_settings: tuple[Pkcs11Settings, str]
) -> None:
    commands = _commands(installation)
    assert set(commands) == {name for name in SECTIONS if name.startswith("chargepki")} | {"error"}
    outputs = []
    for section, args in commands.items():
        result = run(home, *args)
        outputs.append(result.output)
        assert result.exit_code == (1 if section == "error" else 0), (section, result.output)
        document = json.loads(result.stdout)  # exactly one JSON document: anything else fails here
        paths, free = documented(section)
        found = actual(document, free)
        assert found - paths == set(), f"{section}: undocumented fields"
        assert paths - found == set(), f"{section}: documented fields missing"
        for path, value in _leaves(document, free):  # free-form details keep what was recorded, as it was
            if path.endswith(("_at", "not_before", "not_after", "until", "invalidity_date")) and value is not None:
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value), (section, path, value)
            if path in HEX_SERIALS or (path == "serial" and section.split()[1] in ("cert", "firmware")):
                assert re.fullmatch(r"[0-9A-F]+", value), (section, path, value)
    _, pin = token_settings
    for secret in (installation["csms_token"], pin):
        assert all(secret not in output for output in outputs)


def _leaves(document: Any, free: set[str], prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for key, value in document.items():
        if prefix + key in free:
            continue
        if isinstance(value, dict):
            found += _leaves(value, free, f"{prefix}{key}.")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    found += _leaves(item, free, f"{prefix}{key}[].")
        else:
            found.append((prefix + key, value))
    return found


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _walk(sub, (*path, name))
    return found


def _command_path(heading: str) -> str:
    """``chargepki cert show SERIAL --json`` -> ``chargepki cert show``."""
    return " ".join(word for word in heading.split(" --")[0].split() if word.islower())


def test_every_list_show_status_and_verify_command_has_json_and_is_documented() -> None:
    """Found by walking the command tree, so a new `… list` without --json fails here."""
    documented_commands = {_command_path(name) for name in SECTIONS if name.startswith("chargepki")}
    missing, undocumented = [], []
    for path, command in _walk(cli):
        if isinstance(command, click.Group) or not path:
            continue
        options = {option for param in command.params for option in getattr(param, "opts", [])}
        name = "chargepki " + " ".join(path)
        if path[-1] in ("list", "show", "status", "verify", "doctor") and "--json" not in options:
            missing.append(name)
        machine_readable = "--json" in options or (path[0] == "report" and "--format" in options)
        if machine_readable and name not in documented_commands:
            undocumented.append(name)
    assert missing == [] and undocumented == []
