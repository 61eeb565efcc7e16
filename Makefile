# `make` is the entry point for everything; see README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= authpool_server/example-config.json
LISTEN ?= 127.0.0.1:50051

.PHONY: help venv run test test-unit test-integration bench bench-ab loadtest simulate lint format proto proto-check clean interop-deps k8s

help:
	@echo "make run          serve the example config on $(LISTEN), auth off (local development only)"
	@echo "make test         run the whole test suite"
	@echo "make bench        run the benchmarks; figures go to var/bench/latest.json"
	@echo "make bench-ab     A/B of server variants in many short rounds: AB='off:chain=off new:traced old:ref=HEAD~1,traced'"
	@echo "make loadtest     the guide's load-test plan against a real server; report and plot in var/loadtest/"
	@echo "make simulate     replay the shipped traces through the balancer; report and plots in var/sim/"
	@echo "make lint         ruff check and format check, generated code freshness"
	@echo "make proto        regenerate the protobuf code from protos/"
	@echo "make k8s          regenerate the PrometheusRule, render deploy/k8s into var/k8s/, run tests/deploy"

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e clients/python
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/authpool serve --config $(CONFIG) --listen $(LISTEN) --insecure-no-auth

test: $(STAMP) interop-deps
	$(BIN)/pytest

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/pytest tests/integration

bench: $(STAMP)
	$(BIN)/python -m bench

# An A/B of server variants (see bench/ab.py): the first is the yardstick.
AB ?= off:chain=off before:ref=HEAD~1,traced after:traced
AB_ROUNDS ?= 6
bench-ab: $(STAMP)
	$(BIN)/python -m bench.ab $(AB) --rounds $(AB_ROUNDS)

loadtest: $(STAMP)
	$(BIN)/python -m loadtest

simulate: $(STAMP)
	$(BIN)/authpool simulate run --out var/sim

lint: $(STAMP) proto-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

# The Node.js interop test's npm packages (@grpc/grpc-js, @grpc/proto-loader), exactly as locked,
# into tests/interop/node_modules (git-ignored); `make test` installs them. (A bare `pytest` without them
# skips that test, except under CI.)
INTEROP := tests/interop
interop-deps: $(INTEROP)/node_modules/.package-lock.json

$(INTEROP)/node_modules/.package-lock.json: $(INTEROP)/package.json $(INTEROP)/package-lock.json
	cd $(INTEROP) && npm ci --no-audit --no-fund

k8s: $(STAMP)
	$(BIN)/python deploy/prometheus/prometheusrule.py
	mkdir -p var/k8s
	for dir in overlays/embedded overlays/ha monitoring; do \
		kubectl kustomize deploy/k8s/$$dir > var/k8s/$$(basename $$dir).yaml || exit 1; \
	done
	$(BIN)/pytest tests/deploy -q

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis
