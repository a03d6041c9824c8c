"""The documentation stays true to the code: the CLI reference is the commands' own help, every
relative link in README.md, ARCHITECTURE.md, CHANGELOG.md and docs/ reaches a file of the
repository, and the docs name no internal issue numbers and no file outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools import cli_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_cli_reference_is_the_commands_help() -> None:
    assert cli_reference.TARGET.read_text(encoding="utf-8") == cli_reference.render(), (
        "docs/cli.md is out of date: run .venv/bin/python tools/cli_reference.py"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_reach_files_of_the_repository(doc: Path) -> None:
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{doc.name}: broken link {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_internal_issue_numbers_or_outside_files(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert not re.search(r"\bissues? \d", text, re.IGNORECASE), f"{doc.name} names an internal issue number"
    assert "DESIGN.md" not in text, f"{doc.name} cites DESIGN.md, which is not in the repository"
