"""File permissions of a new home, in real processes under the loosest umask (000): the home,
the token directory and everything secret in them are the owner's only (0700 / 0600)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import CHARGEPKI, ROOT


def _first_run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CHARGEPKI_", "SOFTHSM2"))}
    environment["CHARGEPKI_ORG"] = "Perm Charging"
    return subprocess.run(
        [*CHARGEPKI, "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        cwd=ROOT,
        preexec_fn=lambda: os.umask(0),  # the point: nothing may rely on the umask
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_private(home: Path) -> None:
    assert _mode(home) == 0o700
    for directory in ("softhsm", "softhsm/tokens"):
        assert _mode(home / directory) == 0o700, directory
    for name in ("chargepki.toml", "chargepki.db", "softhsm/softhsm2.conf", "softhsm/user.pin", "softhsm/so.pin"):
        assert _mode(home / name) == 0o600, f"{name} is {oct(_mode(home / name))}"
    # Whatever the token's own files are, nobody but the owner can reach them through the home.
    for path in (home / "softhsm" / "tokens").rglob("*"):
        assert _mode(path) & 0o007 == 0, f"{path} is world-accessible: {oct(_mode(path))}"


@pytest.mark.parametrize("command", [("run", "--setup-only"), ("init", "--org", "Perm Charging")])
def test_a_new_home_is_the_owners_only_whatever_the_umask(tmp_path: Path, command: tuple[str, ...]) -> None:
    home = tmp_path / "var"
    result = _first_run(home, *command)
    assert result.returncode == 0, result.stderr
    _assert_private(home)


def test_an_existing_empty_home_is_tightened_on_first_run(tmp_path: Path) -> None:
    home = tmp_path / "var"
    home.mkdir()
    home.chmod(0o777)
    result = _first_run(home, "run", "--setup-only")
    assert result.returncode == 0, result.stderr
    _assert_private(home)


def test_the_audit_checkpoint_file_is_the_owners_only(tmp_path: Path) -> None:
    home = tmp_path / "var"
    assert _first_run(home, "init", "--org", "Perm Charging").returncode == 0
    result = _first_run(home, "audit", "checkpoint")
    assert result.returncode == 0, result.stderr
    assert _mode(home / "audit-checkpoints.jsonl") == 0o600
