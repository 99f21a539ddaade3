# `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: run test ui install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import pipeline, torch, timm, dvc, great_expectations, mlflow, fairlearn, license_expression"
	@touch $@

install: $(STAMP)

## Run the whole pipeline on the embedded default data.
run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 dvc repro

## Run the test suite.
test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

## The MLflow UI on the project's store at http://127.0.0.1:5000
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf data models metrics mlflow.db mlruns mlartifacts reports/validation reports/eval reports/bias reports/shift reports/governance
