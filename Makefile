# Two commands on a fresh Debian 12 machine (as root): `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
GUEST := build/guest

.PHONY: deps venv guest demo test test-fast test-faults lint bench bench-sweep bench-storage bench-tls bench-drs bench-announce bench-evacuate bench-memory bench-backlog clean lab-down

deps:
	@scripts/install-deps.sh

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

$(GUEST)/initrd.img: guest/build.sh guest/init guest/probe.c guest/echod.c
	guest/build.sh $(GUEST)

guest: deps $(GUEST)/initrd.img

lint: venv
	$(VENV)/bin/ruff check ferry tests bench
	$(VENV)/bin/mypy

# The lab demo: a 3-host cluster, a probe VM on host1, live-migrated host1 → host2 → host3.
demo: deps venv guest
	$(VENV)/bin/ferry lab demo

# The whole suite, real-QEMU tests (marked slow) included. Two workers, each with a lab
# of its own (tests/integration/conftest.py): the lab tests mostly wait on guests, links
# and timers, so two share the machine's cores; a file's tests stay on one worker.
TEST_WORKERS ?= 2
test: deps venv guest lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

# Unit tests only (no root, no QEMU).
test-fast: venv
	$(VENV)/bin/pytest -q -m "not slow"

# The whole fault matrix (root; `make test` runs only its CI share).
test-faults: deps venv guest
	FERRY_FAULTS=all $(VENV)/bin/pytest -q -m faults

# Benchmarks (root; each brings up and removes its own lab). Tables go to stdout.
bench: deps venv guest
	$(PY) bench/migrate_vs_qemu.py --json build/bench-migrate.json

bench-sweep: deps venv guest
	$(PY) bench/convergence_sweep.py --json build/bench-sweep.json

bench-storage: deps venv guest
	$(PY) bench/storage_vs_copy.py --json build/bench-storage.json

# Pure simulation (no root, no lab): the DRS planner against ProxLB- and PVE-style baselines.
bench-drs: venv
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/drs_sim.py

bench-announce: deps venv guest
	$(PY) bench/announce.py --json build/bench-announce.json

bench-memory: deps venv guest
	$(PY) bench/memory_check.py --json build/bench-memory.json

bench-tls: deps venv guest
	$(PY) bench/tls_cost.py --json build/bench-tls.json

bench-evacuate: deps venv guest
	$(PY) bench/evacuate.py --json build/bench-evacuate.json

# No guest: two namespaces and a userspace delay line (long round trips).
bench-backlog: deps venv
	$(PY) bench/backlog_cap.py --json build/bench-backlog.json

lab-down: venv
	$(VENV)/bin/ferry lab down

clean:
	rm -rf build $(VENV)
