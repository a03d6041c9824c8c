"""The core stays framework-free: ca/, ocsp/ and crl/ never import Flask or click."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

FORBIDDEN = {"flask", "click", "werkzeug", "gunicorn", "web", "cli"}


@pytest.mark.parametrize("package", ["ca", "ocsp", "crl", "metrics"])
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


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _package(module: str) -> str:
    """The part of the tree a module belongs to: ``ca.issuance.flow`` → ``ca.issuance``, ``ca.errors`` →
    ``ca.errors``, ``web.api`` → ``web``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "ca" else parts[0]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top in ("ca", "ocsp", "crl", "web", "cli", "metrics"):
        for path in (ROOT / top).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out.append((dotted, path))
    return out


def test_no_module_reaches_into_another_packages_private_names() -> None:
    """A package's private names stay inside it; what others need is public (and re-exported)."""
    offenders = []
    for module, path in _modules():
        for imported, names in _imports(path):
            if imported.split(".")[0] not in {"ca", "ocsp", "crl", "web", "cli", "metrics"}:
                continue
            if _package(imported) == _package(module if path.name != "__init__.py" else module + ".x"):
                continue
            offenders += [f"{module} imports {imported}.{name}" for name in names if name.startswith("_")]
    assert offenders == []


# The foundations import nothing above them: the token and the store know no certificates' rules.
FOUNDATIONS = {
    "ca.keys",
    "ca.store",
    "ca.kinds",
    "ca.clock",
    "ca.errors",
    "ca.config",
    "ca.ocpp_limits",
    "ca.lazy",
    "ca.observe",
}


@pytest.mark.parametrize("package", ["ca.keys", "ca.store"])
def test_the_foundations_import_only_foundations(package: str) -> None:
    for module, path in _modules():
        if _package(module) != package:
            continue
        for imported, _ in _imports(path):
            if imported.startswith("ca."):
                assert _package(imported) in FOUNDATIONS, f"{module} imports {imported}"


def test_the_core_imports_no_status_service() -> None:
    """ca/ is below ocsp/ and crl/: it defines the StatusSigner seam, they implement it."""
    for module, path in _modules():
        if module.startswith("ca"):
            for imported, _ in _imports(path):
                assert imported.split(".")[0] not in {"ocsp", "crl"}, f"{module} imports {imported}"


def test_the_core_knows_no_metrics_library() -> None:
    """ca/ reports events through ca.observe; metrics/ (prometheus_client) is above it."""
    for module, path in _modules():
        if module.startswith("ca"):
            for imported, _ in _imports(path):
                assert imported.split(".")[0] not in {"metrics", "prometheus_client"}, f"{module} imports {imported}"
