# The front door. Every target sets up what it needs first, so a fresh clone needs only make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
LINTED := $(wildcard src tests example_app benchmarks) loopback.py
BENCH_STAMP := $(VENV)/.bench-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000
UPSTREAM_PORT ?= 8001

.PHONY: install run test check lint format typecheck imports bench bench-workers chaos soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start the example app on 127.0.0.1:8000 with in-memory storage (no Redis needed),
## and the flaky inventory upstream it calls on 127.0.0.1:8001. A port already in use stops it,
## naming a free one: make run PORT=8010 UPSTREAM_PORT=8011
run: install
	$(PY) -m example_app.run --host $(HOST) --port $(PORT) --upstream-port $(UPSTREAM_PORT)

## The whole test suite, with coverage of src/ reported.
test: install
	$(PY) -m pytest --cov=fastapi_resilience --cov-report=term $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: install
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

typecheck: install
	$(VENV)/bin/mypy

## The layers of the package (.importlinter): no upward import, no cycle in a concept.
imports: install
	$(VENV)/bin/lint-imports

## Quality gates: ruff (lint + format), mypy --strict on src/ and the import contracts.
check: lint typecheck imports

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(BENCH_STAMP)

## Benchmarks side by side with the peers; writes docs/benchmarks.md (about 11 minutes).
## A smoke run that keeps the doc: make bench BENCH_ARGS=--quick
bench: $(BENCH_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

## uvicorn --workers 1, 2, 4 sharing one private Redis, and Redis's ceiling for the limiter's
## script; writes docs/scaling.md and appends to benchmarks/HISTORY.md (about 3 minutes).
## A smoke run that keeps the docs: make bench-workers BENCH_ARGS=--quick
bench-workers: $(BENCH_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@command -v redis-benchmark >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-tools)
	$(PY) -m benchmarks.workers $(BENCH_ARGS)

## Chaos: the example app, two processes behind nginx sharing one redis-server, under an
## open-loop load while Redis, the upstream and a process fail in turn; writes its report into
## docs/reliability.md (about 5 minutes). Short form in CI: tests/test_chaos.py.
chaos: install
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -qq && apt-get install -y -qq nginx)
	$(PY) -m benchmarks.chaos $(CHAOS_ARGS)

## Soak: the chaos set-up for SOAK_SECONDS (600) with periodic faults; checks memory, tasks,
## descriptors and Redis connections, writes its figures and docs/images/soak-memory.png.
SOAK_SECONDS ?= 600
soak: install
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -qq && apt-get install -y -qq nginx)
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m benchmarks.chaos.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
