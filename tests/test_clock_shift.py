"""The moved-clock harness of ``make test-clock`` works, and the calendar's favourite victims pass
under it in every ``make test``: the suite may depend on the date only through a frozen or
injected clock, so moving the system clock nine years ahead must change no outcome."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.helpers import ROOT

# Tests that decide validity windows from the clock: expiry listing, issuer expiry, clamping,
# expired re-enrollment, retirement after the last certificate expired, UTCTime/GeneralizedTime.
DATE_SENSITIVE = [
    "tests/ca/issuance/test_issuance.py::test_expiry_listing_follows_the_clock",
    "tests/ca/issuance/test_issuance.py::test_validity_never_outlives_the_issuer",
    "tests/ca/issuance/test_issuance.py::test_an_expired_issuer_issues_nothing",
    "tests/ca/enrollment/test_enrollment.py::test_reenrollment_with_an_expired_certificate_is_refused_by_the_core",
    "tests/ca/authorities/test_rotation.py::test_the_old_ca_retires_once_its_last_certificate_expired",
    "tests/ca/issuance/test_profiles.py::test_utctime_until_2049_and_generalizedtime_from_2050",
]


def test_date_sensitive_tests_pass_with_the_clock_nine_years_ahead(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "FAKETIME"))}
    env |= {"CLOCK_OFFSETS": "+9y", "BIN": str(ROOT / ".venv" / "bin")}
    run = subprocess.run(
        [
            str(ROOT / "tests/clock_shift/run.sh"),
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path}",
            *DATE_SENSITIVE,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "== clock moved +9y: the tests see 20" in output  # the harness checked the clock really moved
    assert "system clock moved +9y by libfaketime" in output  # and pytest ran under it
    assert re.search(r"\b\d+ passed\b", output) and not re.search(r"\b\d+ (failed|errors?)\b", output), output[-2000:]
