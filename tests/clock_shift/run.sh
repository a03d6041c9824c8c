#!/usr/bin/env bash
# The test suite with the system clock moved (Debian's libfaketime), once per offset:
#   tests/clock_shift/run.sh [pytest arguments]      CLOCK_OFFSETS="+400d +9y" by default
# Every process the tests start (gunicorn, granian, nginx, openssl, SoftHSM2) inherits the moved
# clock; PostgreSQL, started outside, keeps the real one, which chargepki never asks for the time.
# The monotonic clock is left alone, so timeouts and sleeps keep their real length.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
OFFSETS=${CLOCK_OFFSETS:-+400d +9y}

faketime_lib=$(dpkg -L libfaketime 2>/dev/null | grep '/libfaketimeMT\.so\.1$' | head -n 1 || true)
[ -n "$faketime_lib" ] || { echo "libfaketime is not installed (make test-clock installs Debian's faketime)" >&2; exit 2; }
shim=$BIN/../lib/chargepki-monotonic-sleep.so
source=tests/clock_shift/monotonic_sleep.c
if [ ! -e "$shim" ] || [ "$source" -nt "$shim" ]; then
  cc -shared -fPIC -O2 -o "$shim" "$source" -ldl
fi

status=0
for offset in $OFFSETS; do
  export LD_PRELOAD="$shim $faketime_lib" FAKETIME="$offset" FAKETIME_DONT_FAKE_MONOTONIC=1 CHARGEPKI_CLOCK_OFFSET="$offset"
  # Refuse to report a pass for a clock that did not move, or for sleeps that libfaketime breaks.
  "$BIN/python" - "$offset" "$(env -u LD_PRELOAD date -u +%s)" <<'PY'
import sys, time
from datetime import UTC, datetime
offset, real = sys.argv[1], int(sys.argv[2])
assert abs(time.time() - real) > 86400, f"libfaketime did not move the clock by {offset}"
before = time.monotonic()
time.sleep(0.05)
assert time.monotonic() - before >= 0.05, "time.sleep does not sleep under libfaketime"
print(f"== clock moved {offset}: the tests see {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
PY
  if ! "$BIN/pytest" "$@"; then
    echo "== FAILED with the clock moved $offset" >&2
    status=1
  fi
  unset LD_PRELOAD FAKETIME FAKETIME_DONT_FAKE_MONOTONIC CHARGEPKI_CLOCK_OFFSET
done
exit $status
