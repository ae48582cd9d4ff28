# Agent Orchestrator Service. `make run` serves with embedded defaults; `make test` installs what
# it needs and runs every check CI runs.
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
BIN         := $(VENV)/bin
BUF_VERSION := 1.75.0
BUF         := .tools/node_modules/.bin/buf
STAMP       := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help setup tools gen gen-check breaking lua-check lint fmt test run bench soak docker clean

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)  ## Create .venv with the service and its dev tools.

$(BUF):
	npm install --silent --no-save --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

tools: $(STAMP) $(BUF)  ## Also install buf (npm) and redis-server (apt) when missing.
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

gen: $(STAMP)  ## Regenerate generated/ and the API reference (docs/api/) from protos/.
	$(PY) scripts/gen_protos.py
	$(PY) scripts/gen_api_docs.py

gen-check: $(STAMP)  ## Fail if generated/ or docs/api/ is stale.
	$(PY) scripts/gen_protos.py --check
	$(PY) scripts/gen_api_docs.py --check

breaking: tools  ## buf breaking against the main branch's merge base (skips without history).
	$(PY) scripts/check_breaking.py --buf $(BUF)

lua-check: $(STAMP)  ## Load every Lua script into a private redis-server (needs redis-server).
	$(PY) -m scripts.check_lua

lint: tools gen-check lua-check breaking  ## buf lint and breaking, ruff, mypy, drift, Lua.
	$(BUF) lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)  ## Format and autofix.
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: tools lint  ## Install what is missing, lint, run every test.
	$(BIN)/pytest

run: $(STAMP)  ## Serve on :50051 with embedded defaults (in-memory registry unless REDIS_URL is set).
	ORCH_EMBEDDED_REFERENCE=$${ORCH_EMBEDDED_REFERENCE:-true} $(BIN)/orchestrator serve

bench: tools  ## Run the benchmarks and print their tables.
	$(PY) -m bench

# `make soak SOAK_ARGS="--duration 300 --tracemalloc /tmp/memory.txt"` for a shorter run.
SOAK_ARGS ?= --streams 500 --rate 20 --duration 1800

soak: tools  ## Memory under steady load (not in CI): idle streams + steady chats, RSS per chat.
	$(PY) -m bench.soak $(SOAK_ARGS)

docker:  ## Build the container image.
	docker build -t agent-orchestrator:dev .

clean:  ## Remove the virtualenv and tool caches.
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache *.egg-info
