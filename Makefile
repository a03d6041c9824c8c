# All set-up on a fresh Debian machine happens here: `make run` and `make test`
# both depend on `setup`, which creates .venv, installs the package and installs
# Debian's softhsm2 (the embedded PKCS#11 token) and nginx-light (the front door in
# front of EST, the CSMS API and OCSP) when they are missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOFTHSM_MODULE := /usr/lib/softhsm/libsofthsm2.so
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export CHARGEPKI_HOME ?= $(CURDIR)/var

.PHONY: setup system-deps test-deps clock-deps scale-deps test-clock test-scale run test lint fuzz fuzz-api fuzz-props bench bench-crl bench-ocsp bench-lookups bench-floor bench-abuse bench-rotation soak clean

setup: system-deps $(STAMP)

NGINX_FOUND = command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]

system-deps:
	@if [ ! -e $(SOFTHSM_MODULE) ] || ! command -v openssl >/dev/null || ! { $(NGINX_FOUND); }; then \
	  echo "installing Debian packages: softhsm2 openssl nginx-light"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 openssl nginx-light; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python >= 3.11 is required ($(PYTHON) is older)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/chargepki run

# The examples' tests drive real peers: Debian's nginx (examples/nginx) and curl; the fleet console's
# browser test drives Debian's headless chromium through its chromedriver.
test-deps:
	@if ! { $(NGINX_FOUND); } || ! command -v curl >/dev/null || [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing Debian packages for the tests: nginx-light curl chromium chromium-driver"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light curl chromium chromium-driver; \
	fi

# One pytest worker more than cores: the CPU idles for ~30% of a run with one per core (servers
# starting, lockouts running out, fsync), which the extra worker fills (docs/testing.md). A test
# file stays on one worker, so its module-scoped servers start once.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
XDIST = -n $(TEST_WORKERS) --dist loadfile
test: setup test-deps clock-deps
	$(BIN)/pytest $(XDIST) $(PYTEST_ARGS)

# The suite again with the system clock moved (Debian's libfaketime): a year ahead, and nine years
# ahead, where new CAs' validity reaches past 2038 and 2050. CLOCK_OFFSETS and PYTEST_ARGS narrow it.
CLOCK_OFFSETS ?= +400d +9y
test-clock: setup test-deps clock-deps
	CLOCK_OFFSETS="$(CLOCK_OFFSETS)" tests/clock_shift/run.sh $(XDIST) $(PYTEST_ARGS)

clock-deps:
	@if ! dpkg -s libfaketime >/dev/null 2>&1 || ! command -v cc >/dev/null; then \
	  echo "installing Debian packages for the moved-clock run: faketime gcc libc6-dev"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime gcc libc6-dev; \
	fi

# The scale-out bed (tests/scale/, docs/scale-out.md): hosts as network namespaces inside one with no
# route out, a PostgreSQL 15 primary and streaming replica, two EST nodes behind HAProxy, two OCSP
# responders, two CRL publishers, and faults (cuts, partitions, loss, tbf, failover). Needs root;
# 3 to 4 minutes on 2 cores. Logs and the figures it measured (figures.json): /tmp/chargepki-scale-last/.
PG15_BIN := /usr/lib/postgresql/15/bin
scale-deps:
	@if [ ! -x /usr/sbin/nft ] || [ ! -x /usr/sbin/haproxy ] || [ ! -x /usr/bin/ping ] || [ ! -x $(PG15_BIN)/initdb ]; then \
	  echo "installing Debian packages for the scale-out bed: nftables haproxy iputils-ping postgresql-15"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables haproxy iputils-ping postgresql-15; \
	fi

test-scale: setup scale-deps
	$(SUDO) $(BIN)/pytest -m scale -s tests/scale $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Hostile input: a coverage-guided atheris session over the edge parsers, FUZZ_SECONDS in all
# (default 5 minutes, plus ~10 s set-up per target); exits 1 when it found something. Then the
# CSMS API's schema-driven fuzz (tests/web/test_api_app.py, hypothesis-jsonschema from the OpenAPI
# document, starting from real requests that succeed) for API_FUZZ_SECONDS per database.
FUZZ_SECONDS ?= 300
API_FUZZ_SECONDS ?= 300
# Both run even when the first finds something; the exit status is 1 when either did.
fuzz: setup $(VENV)/.fuzz-installed
	@status=0; \
	$(BIN)/python -m tests.fuzz --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS) || status=1; \
	$(MAKE) --no-print-directory fuzz-api || status=1; \
	exit $$status

fuzz-api: setup
	API_FUZZ_SECONDS=$(API_FUZZ_SECONDS) $(BIN)/pytest -q -p no:xdist tests/web/test_api_app.py \
	  -k test_schema_valid_requests_are_never_refused_by_the_schema_nor_answered_5xx

# The property tests of tests/**/test_hostile_*.py with a large budget (hypothesis' "fuzz" profile).
fuzz-props: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q tests/test_hostile_parsers.py tests/web/test_hostile_http.py tests/cli/test_hostile_cli.py

$(VENV)/.fuzz-installed: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,fuzz]'
	touch $@

# Benchmarks (not tests): chargepki next to the peers named in the issues, same machine, same run.
bench: setup
	@command -v cfssl >/dev/null && command -v cfssljson >/dev/null || { echo "installing Debian package golang-cfssl"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-cfssl; }
	$(BIN)/python bench/enroll.py $(BENCH_ARGS)
	$(MAKE) bench-floor
	$(MAKE) bench-crl
	$(MAKE) bench-ocsp
	$(MAKE) bench-lookups

# What one enrollment cannot cost less than here: its signatures, checks and commits, each alone,
# next to the pipeline in-process (bench/results-floor.md).
bench-floor: setup
	$(BIN)/python bench/floor.py $(BENCH_FLOOR_ARGS)

# CRL of 100k and 1M entries against openssl ca -gencrl (bench/results-crl.md).
bench-crl: setup
	$(BIN)/python bench/crl.py $(BENCH_CRL_ARGS)

# OCSP: chargepki's responder next to cfssl ocspserve and openssl ocsp, loaded by wrk.
bench-ocsp: setup
	@command -v cfssl >/dev/null && command -v wrk >/dev/null || { echo "installing Debian packages golang-cfssl wrk"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-cfssl wrk; }
	$(BIN)/python bench/ocsp.py $(BENCH_OCSP_ARGS)

# Legitimate enrollments and OCSP requests while idle and slow clients hold EST and OCSP, with the
# front door (nginx) and in the direct mode (bench/results-abuse.md).
bench-abuse: setup
	@command -v wrk >/dev/null || { echo "installing Debian package wrk"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	$(BIN)/python bench/abuse.py $(BENCH_ABUSE_ARGS)

# Hot-path lookups on 1,000,000 certificate rows, SQLite and PostgreSQL (bench/results-lookups.md).
bench-lookups: setup
	$(BIN)/python bench/lookups.py $(BENCH_LOOKUPS_ARGS)

# Fleet rotation: 100,000 chargers of issuing CA 1 in a store of 1,000,000 certificate rows
# re-enroll after `ca rotate` by mTLS simplereenroll and /api/v1/sign relays (bench/results-rotation.md).
# Smaller: BENCH_ROTATION_ARGS="--chargers 2000 --rows 50000"; PostgreSQL: add --postgresql.
bench-rotation: setup
	$(BIN)/python bench/rotation.py $(BENCH_ROTATION_ARGS)

# Mixed load on loopback against `chargepki run`'s processes, bounded (SOAK_SECONDS, default 600).
SOAK_SECONDS ?= 600
soak: setup
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
