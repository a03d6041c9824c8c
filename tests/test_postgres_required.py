"""Without PostgreSQL the PostgreSQL half skips with a message, and fails under CHARGEPKI_REQUIRE_POSTGRES=1.

Runs pytest in a subprocess against a closed port, on two tests: one with the per-test ``db_url``
fixture and one whose module-scoped fixture opens its database itself (``tests/e2e/test_est.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.est_server import free_port
from tests.helpers import ROOT

TESTS = [
    "tests/ca/store/test_migrations.py::test_upgrade_is_idempotent[sqlite]",
    "tests/ca/store/test_migrations.py::test_upgrade_is_idempotent[postgresql]",
    "tests/e2e/test_est.py::test_cacerts_is_the_chain_as_base64_pkcs7[postgresql]",
]


def _pytest(require: bool) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "CHARGEPKI_REQUIRE_POSTGRES"}
    environment["CHARGEPKI_TEST_PG"] = f"postgresql://postgres@127.0.0.1:{free_port()}/test"  # nobody listens
    if require:
        environment["CHARGEPKI_REQUIRE_POSTGRES"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", *TESTS],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize("require", [False, True], ids=["developer", "ci"])
def test_unreachable_postgresql_skips_or_fails(require: bool) -> None:
    result = _pytest(require)
    output = result.stdout + result.stderr
    assert "PostgreSQL unreachable at postgresql://postgres@127.0.0.1:" in output, output
    if require:
        assert result.returncode == 1, output
        assert "1 passed" in output and "2 errors" in output and "skipped" not in output, output
        assert "CHARGEPKI_REQUIRE_POSTGRES=1 makes that a failure" in output, output
    else:
        assert result.returncode == 0, output
        assert "1 passed, 2 skipped" in output, output
        assert "set CHARGEPKI_TEST_PG to a reachable server" in output, output
