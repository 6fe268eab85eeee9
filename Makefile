# Herald developer entry points. Services come from deploy/local (Debian
# packages, no Docker); Python tools from .venv.
#
#   make test PYTEST_ARGS='-k retry -x'     extra pytest arguments
#   make test MATRIX=                       only RabbitMQ 3.10 (no 4.0/4.3 runs)
#   make test-broker BROKER=4.0             the suite against RabbitMQ 4.0 (3.10, 4.0, 4.3)
#   HERALD_LOCAL_AMQP_PORT / HERALD_LOCAL_PG_PORT move the local services.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.herald-installed
# Prefix for commands that need the services' URLs (and the venv on PATH).
WITH_ENV := . deploy/local/env.sh &&
PYTEST_ARGS ?=
# The RabbitMQ version for test-broker (deploy/local/rabbitmq.sh: HERALD_LOCAL_RABBITMQ).
BROKER ?= 3.10
# The broker matrix of `make test` (and so of CI): the whole suite on 3.10
# (bookworm's, on the host), except the cluster tests (deploy/local/BROKERS.md:
# 3.10 strands dead-lettered retries when a node dies); then, on each version of
# MATRIX, the tests whose outcome depends on the broker: its quorum queues,
# the cluster, the consumers, the parking lot, retries, events and faults.
# On this 2-core machine: about 17 minutes for 3.10, 13.5 for each of 4.0 and 4.3.
MATRIX ?= 4.0 4.3
MATRIX_TESTS := tests/brokers tests/cluster $(addprefix tests/integration/test_,\
	parked.py consumers.py faults.py pipeline.py flow.py events.py channels.py \
	bad_input.py smoke.py domains.py)

.PHONY: help venv services lint typecheck test test-broker run bench bench-events bench-console bench-peers down clean-data

help:
	@echo 'make venv        create .venv and install herald[dev] (again when pyproject.toml changes)'
	@echo 'make services    start the local RabbitMQ (5673) and PostgreSQL (5433); install promtool,'
	@echo '                 the AsyncAPI parser, and chromium + chromedriver for the console tests'
	@echo 'make lint        ruff check .'
	@echo 'make typecheck   mypy (packages consumer and schemas)'
	@echo 'make test        venv + services + lint + typecheck + pytest $$PYTEST_ARGS on RabbitMQ 3.10,'
	@echo '                 then the broker-dependent tests on each of $$MATRIX (4.0 4.3)'
	@echo 'make test-broker BROKER=4.0  venv + services on that RabbitMQ (3.10, 4.0, 4.3) + pytest $$PYTEST_ARGS'
	@echo 'make run         venv + services + herald migrate + herald sandbox (background) + herald run'
	@echo 'make bench       venv + services + bench/bench_pipeline.py'
	@echo 'make bench-events venv + services + bench/bench_events.py (webhooks accepted/applied per second)'
	@echo 'make bench-console venv + services + bench/bench_console.py (a console page over 1,000,000 parked)'
	@echo 'make bench-peers venv + services + bench/bench_peers.py (Herald beside FastStream, Dramatiq, Celery;'
	@echo '                 BENCH_REPEAT, BENCH_MESSAGES_0MS, BENCH_MESSAGES_200MS, BENCH_SYSTEMS, BENCH_RSS_MESSAGES)'
	@echo 'make down        stop the local services, every RabbitMQ version and cluster (data kept)'
	@echo 'make clean-data  stop them and delete .local (all their data)'

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

services:
	deploy/local/up.sh
	deploy/local/prometheus.sh install
	deploy/local/asyncapi.sh install
	deploy/local/chromium.sh install

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) services lint typecheck
	$(WITH_ENV) $(BIN)/pytest --ignore=tests/cluster $(PYTEST_ARGS)
	for broker in $(MATRIX); do \
		$(MAKE) --no-print-directory test-broker BROKER=$$broker \
			PYTEST_ARGS='$(MATRIX_TESTS) $(PYTEST_ARGS)' || exit; \
	done

# Exported for the whole run: fault tests restart the broker through
# deploy/local/rabbitmq.sh, which must restart the same version.
test-broker: $(STAMP)
	export HERALD_LOCAL_RABBITMQ='$(BROKER)' && deploy/local/up.sh && deploy/local/prometheus.sh install && \
	$(WITH_ENV) $(BIN)/pytest $(PYTEST_ARGS)

run: $(STAMP) services
	deploy/local/run.sh

bench: $(STAMP) services
	$(WITH_ENV) $(BIN)/python bench/bench_pipeline.py

bench-events: $(STAMP) services
	$(WITH_ENV) $(BIN)/python bench/bench_events.py

bench-console: $(STAMP) services
	$(WITH_ENV) $(BIN)/python bench/bench_console.py

bench-peers: $(STAMP) services
	$(WITH_ENV) $(BIN)/python bench/bench_peers.py

down:
	deploy/local/down.sh

clean-data: down
	rm -rf .local
