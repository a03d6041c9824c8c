"""Hostile command-line arguments (click's CliRunner in process, hypothesis).

Random and mutated values for durations, serials, reasons, dates, names and paths (files with
random contents, directories, missing or over-long paths, a file used as a directory; all inside
a sandbox) go to the commands that take them. Properties: exit status 0, 1 or 2; never an
uncaught exception, a traceback or an "internal error"; a failing command prints an ``Error:``
line and leaves the database as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy import select

from ca.status.revocation import REASONS
from ca.store.models import Certificate
from cli.main import cli
from tests.hostile import DEVICE, Drawn, Finding, World, bounded, mutate_bytes, snapshot


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandbox")


@pytest.fixture(scope="module")
def serial(world: World) -> str:
    with world.pki.store.session() as session:
        value = session.scalar(select(Certificate.serial).where(Certificate.common_name == "CP-SEED-1"))
        session.commit()
    assert value is not None
    return value


# -- values -------------------------------------------------------------------------------------------------
# What a command line can carry: any text without NUL, and undecodable bytes as the surrogates
# Python makes of them (os.fsdecode).
ARG_TEXT = st.one_of(
    st.text(st.characters(exclude_characters="\x00"), max_size=40),
    st.builds(os.fsdecode, st.binary(max_size=30).filter(lambda b: b"\x00" not in b)),
)
DURATIONS = st.one_of(
    st.from_regex(r"\A ?-?[0-9]{1,25} ?[dhms]?\Z"),
    st.sampled_from(["0", "0m", "90d", "99999999999999999999d", "1e3d", "١٢d", "12 h", ""]),
    ARG_TEXT,
)
DATES = st.one_of(
    st.sampled_from(
        ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-02-30", "2026-11-24T10:00:00Z", "now"]
    ),
    st.datetimes().map(lambda d: d.isoformat()),
    ARG_TEXT,
)


def serials(serial: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([serial, serial.lower(), "0x" + serial, ":".join(serial[i : i + 2] for i in range(0, 40, 2))]),
        st.sampled_from(["0", "-1", "F" * 41, "0x", "::", DEVICE]),
        ARG_TEXT,
    )


REASON_VALUES = st.one_of(st.sampled_from([*REASONS, "key-compromise", "KEY_COMPROMISE", "removeFromCRL"]), ARG_TEXT)


@st.composite
def paths(draw: st.DrawFn, sandbox: Path) -> str:
    """Somewhere inside the sandbox: a file with drawn contents, a directory, or a path that cannot be used."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        target = sandbox / "input.bin"
        target.write_bytes(draw(st.binary(max_size=400)))
        return str(target)
    if kind == 1:
        target = sandbox / "input.txt"
        target.write_text(draw(st.text(max_size=400)), encoding="utf-8", errors="surrogatepass")
        return str(target)
    if kind == 2:
        return str(sandbox)
    if kind == 3:
        return str(sandbox / "missing" / "child.pem")
    if kind == 4:
        (sandbox / "input.bin").write_bytes(b"x")
        return str(sandbox / "input.bin" / "child")
    if kind == 5:
        return str(sandbox / ("n" * 300))
    name = draw(st.text(st.characters(exclude_characters="\x00/"), min_size=1, max_size=30))
    return str(sandbox / ("_" + name if name in (".", "..") else name))


# -- the property -------------------------------------------------------------------------------------------
def run(world: World, args: list[str]) -> None:
    before = snapshot(world.pki.store)
    runner = CliRunner()
    with bounded(20):
        result = runner.invoke(cli, ["--home", str(world.home), *args], catch_exceptions=True)
    shown = " ".join(repr(a)[:60] for a in args)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise Finding(f"chargepki {shown}: uncaught {type(result.exception).__name__}: {result.exception}")
    if result.exit_code not in (0, 1, 2):
        raise Finding(f"chargepki {shown}: exit status {result.exit_code}")
    if "Traceback" in output or "internal error" in output:
        raise Finding(f"chargepki {shown}: {output.strip().splitlines()[-1][:300]!r}")
    if result.exit_code != 0:
        refused_rows = args[:2] == ["device", "import"] and "refused" in output
        if "Error:" not in output and not refused_rows:
            raise Finding(f"chargepki {shown}: failed without an Error: line: {output[-300:]!r}")
        after = snapshot(world.pki.store)
        if after != before:
            changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
            raise Finding(f"chargepki {shown} failed (exit {result.exit_code}) but changed the database: {changed}")


@st.composite
def commands(draw: st.DrawFn, serial: str, sandbox: Path) -> list[str]:
    path = paths(sandbox)
    choice = draw(st.integers(0, 13))
    if choice == 0:
        return ["issue", "--csr", draw(path), "--profile", draw(st.sampled_from(["charger", "root", "x"])),
                "--validity", draw(DURATIONS), "--out", draw(path)]  # fmt: skip
    if choice == 1:
        return ["cert", "show", draw(serials(serial))]
    if choice == 2:
        return ["cert", "list", "--expiring-within", draw(ARG_TEXT), "--limit", draw(ARG_TEXT)]
    if choice == 3:
        return ["revoke", draw(serials(serial)), "--reason", draw(REASON_VALUES), "--invalidity-date", draw(DATES)]
    if choice == 4:
        return ["unhold", draw(serials(serial))]
    if choice == 5:
        return ["token", "issue", draw(st.one_of(st.just(DEVICE), ARG_TEXT)), "--ttl", draw(DURATIONS)]
    if choice == 6:
        return ["device", "add", draw(ARG_TEXT), "--model", draw(ARG_TEXT)]
    if choice == 7:
        return ["device", "disable", draw(st.one_of(st.just("CP-NONE"), ARG_TEXT)), "--reason", draw(REASON_VALUES)]
    if choice == 8:
        return ["device", "import", draw(path)]
    if choice == 9:
        return ["token", "issue-batch", "--file", draw(path), "--out", draw(path), "--ttl", draw(DURATIONS)]
    if choice == 10:
        return ["ra", "add", draw(ARG_TEXT), "--out-dir", draw(path), "--validity", draw(DURATIONS)]
    if choice == 11:
        return ["crl", "publish", "--dir", draw(path), "--next-update", draw(DURATIONS)]
    if choice == 12:
        return ["audit", "show", "--action", draw(ARG_TEXT), "--subject", draw(ARG_TEXT), "--limit", draw(ARG_TEXT)]
    return ["device", "show", draw(st.one_of(st.just(DEVICE), ARG_TEXT))]


def test_hostile_arguments_never_crash_and_failures_change_nothing(world: World, serial: str, sandbox: Path) -> None:
    @given(commands(serial, sandbox))
    @example(["token", "issue", DEVICE, "--ttl", "99999999999d"])
    @example(["revoke", serial, "--reason", "keyCompromise", "--invalidity-date", "0001-01-01T00:00:00+01:00"])
    @example(["device", "import", str(sandbox)])
    @example(["audit", "show", "--subject", "\udcff"])
    def check(args: list[str]) -> None:
        run(world, args)

    check()


def test_mutated_csv_files_import_or_are_refused(world: World, sandbox: Path) -> None:
    seed = b"serial,model,environment\nCP-M-1,Wallbox,production\nCP-M-2,,staging\n"

    @given(st.data())
    @example(None)
    def check(data: st.DataObject | None) -> None:
        content = b"\xff\xfe" + seed if data is None else mutate_bytes(seed, Drawn(data))
        target = sandbox / "devices.csv"
        target.write_bytes(content)
        run(world, ["device", "import", str(target)])

    check()
