# pf-metering developer targets. Everything runs from the project's own .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
STRIPE_MOCK_VERSION := v0.197.0
PROMTOOL_VERSION := v0.316.0
export PATH := $(CURDIR)/.cache/bin:$(PATH)

.PHONY: install lint test demo bench bench-peers soak kafka kafka-stop postgres postgres-stop stripe-mock promtool clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock schemas/_native_decoder.c consumer/_native_fetch.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(BIN)/pip install -q uv==0.13.8
	$(UV) pip sync -q --python $(BIN)/python requirements.lock
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	@# PostgreSQL's server binaries for deploy/local-postgres (cluster mode), apt-get once.
	@deploy/local-postgres install || echo "warning: no PostgreSQL server binaries; cluster-mode tests need them"
	@# PYTHONDONTWRITEBYTECODE may be set: precompile once so every CLI start is fast.
	@$(BIN)/python -m compileall -q -j 2 $(VENV)/lib > /dev/null 2>&1 || true
	@touch $@

# Re-lock after editing dependencies in pyproject.toml.
lock:
	$(UV) pip compile -q pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports --no-cache

# The official stripe-mock, built once from the Go module proxy into .cache/bin.
stripe-mock: .cache/bin/stripe-mock
.cache/bin/stripe-mock:
	@mkdir -p .cache/bin
	GOBIN=$(CURDIR)/.cache/bin go install github.com/stripe/stripe-mock@$(STRIPE_MOCK_VERSION) \
	  || echo "warning: stripe-mock could not be built; its contract tests need STRIPE_MOCK_URL"

# Prometheus' own checker (promtool check metrics), for the export-metrics test (~5 min once).
promtool: .cache/bin/promtool
.cache/bin/promtool:
	@mkdir -p .cache/bin
	GOBIN=$(CURDIR)/.cache/bin go install github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_VERSION) \
	  || echo "warning: promtool could not be built; the export-metrics promtool test is skipped"

kafka: install
	deploy/local-kafka start

kafka-stop:
	deploy/local-kafka stop

postgres: install
	deploy/local-postgres start

postgres-stop:
	deploy/local-postgres stop

test: install lint stripe-mock promtool
	deploy/ensure-chromium > /dev/null
	$(BIN)/pytest -q tests

soak: install stripe-mock promtool
	PF_SOAK=1 $(BIN)/pytest -q tests

demo: install
	bash deploy/demo.sh

# The peers' venvs (.cache/peers/<name>, from bench/peers/requirements): installed here,
# never while measuring; one that fails is reported by the bench as not installable.
bench-peers: install
	$(BIN)/python -m bench.peers.install

bench: install bench-peers
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
