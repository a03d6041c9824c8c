"""The examples in `examples/` run against a real `chargepki serve est`."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from ca.config import EstSettings, Pkcs11Settings
from cli.main import cli
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server, write_home
from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"


def chargepki(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(
    request, tmp_path_factory, token, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[tuple[EstServer, Path]]:
    tmp = tmp_path_factory.mktemp(f"examples-{request.param}")
    with database(request.param, tmp) as url:
        home = write_home(tmp / "home", url, token_settings[0], EstSettings(default_environment="production"))
        chargepki(home, "init", "--org", "Acme Charging")
        root = tmp / "root.pem"
        root.write_text(chargepki(home, "ca", "chain", "--ca", "production-root-1"))
        server = start_server(home, free_port())
        yield server, root
        server.stop()


def test_est_curl_sh(served, tmp_path: Path) -> None:
    server, root = served
    chargepki(server.home, "device", "add", "CP-CURL-1")
    secret = chargepki(server.home, "token", "issue", "CP-CURL-1").strip()
    result = subprocess.run(
        [
            "bash",
            str(EXAMPLES / "est_curl.sh"),
            server.url,
            str(root),
            "CP-CURL-1",
            secret,
            "Acme Charging",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "renewed.pem: OK" in result.stdout and "CN = CP-CURL-1" in result.stdout


def test_factory_station_with_secrets_and_with_an_ra(served, tmp_path: Path) -> None:
    server, root = served
    serials = [f"CP-F-{n:03d}" for n in range(12)]
    registry = tmp_path / "devices.csv"
    registry.write_text("serial,model\n" + "".join(f"{s},Wallbox\n" for s in serials))
    chargepki(server.home, "device", "import", str(registry))
    (tmp_path / "first.txt").write_text("\n".join(serials[:8]) + "\n")
    chargepki(
        server.home,
        "token",
        "issue-batch",
        "--file",
        str(tmp_path / "first.txt"),
        "--out",
        str(tmp_path / "secrets.csv"),
    )
    rows = list(csv.DictReader((tmp_path / "secrets.csv").open()))
    rows[-1]["secret"] = "wrong"  # one device gets a bad secret: refused and reported
    with (tmp_path / "secrets.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base = [
        sys.executable,
        str(EXAMPLES / "factory_station.py"),
        "--url",
        server.url,
        "--root",
        str(root),
        "--org",
        "Acme Charging",
    ]
    run = subprocess.run(
        [*base, "--secrets", str(tmp_path / "secrets.csv"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "enrolled 7 of 8 devices" in run.stdout and "refused CP-F-007: HTTP 401" in run.stdout
    assert len(list((tmp_path / "out").glob("*.pem"))) == 7

    chargepki(server.home, "ra", "add", "Line 3", "--out-dir", str(tmp_path))
    (tmp_path / "rest.txt").write_text("\n".join(serials[8:]) + "\n")
    run = subprocess.run(
        [
            *base,
            "--serials",
            str(tmp_path / "rest.txt"),
            "--ra-cert",
            str(tmp_path / "Line_3.pem"),
            "--ra-key",
            str(tmp_path / "Line_3.key"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "enrolled 4 of 4 devices" in run.stdout
