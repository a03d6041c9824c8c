"""The core stays framework-free: ca/, ocsp/ and crl/ never import Flask or click."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

FORBIDDEN = {"flask", "click", "werkzeug", "gunicorn", "web", "cli"}


@pytest.mark.parametrize("package", ["ca", "ocsp", "crl"])
def test_core_packages_import_no_interface_framework(package: str) -> None:
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {name}"
