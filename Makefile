# `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

# Debian packages tests need (chromium, postgresql), installed once, with sudo when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast check ui install browser postgres clean balanced readme

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import pipeline, torch, timm, dvc, great_expectations, mlflow, fairlearn, license_expression"
	@touch $@

install: $(STAMP)

browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo "installing Debian's chromium (the report test opens report.html in it)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

# Debian's PostgreSQL: a test starts a private cluster of it behind a real `mlflow server`; installed the same way.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing Debian's postgresql (a test runs MLflow on a PostgreSQL-backed tracking server)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql; }

## Run the whole pipeline on the embedded default data; ends with the release decision.
run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 dvc repro
	@$(BIN)/python -m pipeline release || true

## The balanced configuration (group_proportions 0.5 / 0.5, every other param as committed) in a worktree of HEAD.
BALANCED ?= build/balanced
balanced: $(STAMP)
	rm -rf $(BALANCED) && git worktree prune && git worktree add --detach --force $(BALANCED) HEAD
	$(BIN)/python -c "import yaml; p = yaml.safe_load(open('params.yaml')); \
		p['datasets']['synthetic']['group_proportions'] = {'group_a': 0.5, 'group_b': 0.5}; \
		yaml.safe_dump(p, open('$(BALANCED)/params.yaml', 'w'), sort_keys=False)"
	cd $(BALANCED) && PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 MLFLOW_TRACKING_URI= dvc repro

## README's result blocks from the runs that produced them: `make run` here and `make balanced`.
readme: $(STAMP)
	$(BIN)/python -m pipeline results --command "make run" --readme README.md --block default
	$(BIN)/python -m pipeline results --root $(BALANCED) --command "make balanced" --readme README.md --block balanced

## Lint the package and the tests (ruff; the rules are in pyproject.toml). CI runs it before the tests.
check: $(STAMP)
	$(BIN)/ruff check pipeline tests

## Run the test suite.
test: $(STAMP) browser postgres
	PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

## The unit tier alone (tests marked `fast`): cards, policy, params, stats, contracts, near-duplicates, render and the
## hostile-input units, in about a minute; `make test` runs everything.
test-fast: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m fast $(PYTEST_ARGS)

## The MLflow UI on the project's store at http://127.0.0.1:5000
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf build data models metrics mlflow.db mlruns mlartifacts reports/validation reports/eval reports/bias reports/shift reports/governance
