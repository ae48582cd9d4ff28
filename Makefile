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
.PHONY: help setup tools gen gen-check breaking lua-check lint fmt test run bench soak docker lock ts clean

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml sdk/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet -e './sdk/python[cli]'
	touch $@

setup: $(STAMP)  ## Create .venv with the service, its dev tools and the SDK + CLI (editable).

$(BUF):
	npm install --silent --no-save --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

# Debian packages the tests run: redis-server, and docker-compose (validates docker-compose.yml).
APT_TOOLS := redis-server:redis-server docker-compose:docker-compose

tools: $(STAMP) $(BUF)  ## Also install buf (npm), redis-server and docker-compose (apt) when missing.
	@missing=""; for pair in $(APT_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	[ -z "$$missing" ] || { \
	  echo "installing$$missing (Debian packages)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; }

gen: $(STAMP)  ## Regenerate generated/, the SDK's stubs and the API reference (docs/api/).
	$(PY) -m scripts.gen_protos
	$(PY) -m scripts.gen_api_docs

gen-check: $(STAMP)  ## Fail if generated/, the SDK's stubs or docs/api/ is stale.
	$(PY) -m scripts.gen_protos --check
	$(PY) -m scripts.gen_api_docs --check

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

# The TypeScript client (sdk/typescript): its npm packages come from its package-lock.json.
TS_DIR   := sdk/typescript
TS_DEPS  := $(TS_DIR)/node_modules/.installed-stamp
TS_BUILT := $(TS_DIR)/dist/.built-stamp

$(TS_DEPS): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix $(TS_DIR)
	touch $@

$(TS_BUILT): $(TS_DEPS) $(TS_DIR)/tsconfig.json $(wildcard $(TS_DIR)/src/*.ts $(TS_DIR)/src/*/*.ts)
	npm run --silent --prefix $(TS_DIR) build
	touch $@

ts: $(TS_BUILT)  ## Install the TypeScript client's npm packages (from its lock file) and build it.

test: tools lint ts  ## Install what is missing, lint, run every test.
	npm test --silent --prefix $(TS_DIR)
	$(BIN)/pytest

run: $(STAMP)  ## Serve on :50051 with embedded defaults (in-memory registry unless REDIS_URL is set).
	ORCH_EMBEDDED_REFERENCE=$${ORCH_EMBEDDED_REFERENCE:-true} $(BIN)/orchestrator serve

bench: tools  ## Run the benchmarks and print their tables.
	$(PY) -m bench

# `make soak SOAK_ARGS="--duration 300 --tracemalloc /tmp/memory.txt"` for a shorter run.
SOAK_ARGS ?= --streams 500 --rate 20 --duration 1800

soak: tools  ## Memory under steady load (not in CI): idle streams + steady chats, RSS per chat.
	$(PY) -m bench.soak $(SOAK_ARGS)

docker:  ## Build the container image (its dependencies come from the lock files).
	docker build -t agent-orchestrator:dev .

# The image's pinned dependencies, with hashes, resolved on PyPI alone (not this machine's
# pip configuration). Run after changing the dependencies in pyproject.toml.
PIP_COMPILE := env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null $(BIN)/pip-compile \
	--quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-find-links --no-emit-index-url

lock: $(STAMP)  ## Regenerate requirements.lock and requirements-build.lock from pyproject.toml.
	$(PY) -m pip install --quiet pip-tools==7.6.2
	$(PIP_COMPILE) --upgrade --output-file requirements.lock pyproject.toml
	$(PIP_COMPILE) --upgrade --build-deps-for wheel --only-build-deps \
	  --output-file requirements-build.lock pyproject.toml

clean:  ## Remove the virtualenv and tool caches.
	rm -rf $(VENV) .tools $(TS_DIR)/node_modules $(TS_DIR)/dist .pytest_cache .mypy_cache .ruff_cache *.egg-info
