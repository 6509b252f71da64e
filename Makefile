# NanoGrid developer entry points. Everything installs itself on first use
# (scripts/bootstrap.sh); services already running on this machine are reused.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -q

# Credentials for the local moto server, unless the environment has its own.
export AWS_ACCESS_KEY_ID ?= test
export AWS_SECRET_ACCESS_KEY ?= test
export AWS_DEFAULT_REGION ?= us-east-1

.PHONY: help bootstrap services images up down status test test-host test-cgroup2 unit lint format bench clean distclean

help:
	@echo "make up         start the whole local stack (services, images, worker, Flower) + demo run"
	@echo "make down       stop what 'make up' started"
	@echo "make status     show services, worker and Flower"
	@echo "make test       every test: the host suite, then the cgroup v2 VM suite (Debian 12)"
	@echo "make test-host  the host suite only (starts services, builds images)"
	@echo "make test-cgroup2  the cgroup tests on throw-away cgroup v2 Docker hosts (QEMU VMs:"
	@echo "                Debian 12 and 13; NANOGRID_VM_IMAGES=debian12 for one; see vm/README.md)"
	@echo "make unit       unit tests only, no services"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make format     apply ruff format + ruff check --fix"
	@echo "make bench      benchmarks (python -m benchmarks.run)"
	@echo "make clean      caches, build output and logs (keeps .venv); distclean also removes .venv"

bootstrap:
	@bash scripts/bootstrap.sh

services: bootstrap
	@bash scripts/services.sh up

images: services
	$(VENV)/bin/nanogrid images build

up:
	@bash scripts/stack.sh up

down:
	@bash scripts/stack.sh down

status:
	@bash scripts/stack.sh status

# pytest exits 5 when it collected no tests: treat that as a failure, and pass
# every other exit code through unchanged.
define run_pytest
	@rc=0; $(PYTEST) $(1) || rc=$$?; \
	if [ "$$rc" -eq 5 ]; then echo "error: pytest collected no tests in $(1)" >&2; exit 1; fi; \
	exit "$$rc"
endef

# Every test: the host suite, then the cgroup tests again on a throw-away cgroup v2 Docker
# host (Debian 12 VM; NANOGRID_VM_IMAGES="debian12 debian13" for both). test-host alone is
# the quick loop while developing.
test: test-host
	@NANOGRID_VM_IMAGES="$${NANOGRID_VM_IMAGES:-debian12}" bash vm/test-cgroup2.sh

test-host: images
	$(call run_pytest,tests/)

# Needs the runtime images in this host's Docker (built if missing), not its services:
# each VM runs its own Redis, moto and dockerd.
test-cgroup2: bootstrap
	@bash vm/test-cgroup2.sh

unit: bootstrap
	$(call run_pytest,tests/unit)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: bootstrap
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: images
	$(VENV)/bin/python -m benchmarks.run

clean:
	rm -rf build .pytest_cache .ruff_cache benchmarks/out
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
	find . -path ./.venv -prune -o -name '*.egg-info' -type d -exec rm -rf {} +
	rm -f .run/*.log .run/*.log.1

distclean: clean
	rm -rf $(VENV)
