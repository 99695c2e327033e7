# Fresh clone: `make repro` (the original recipe, needs the hub), `make repro-offline DATA=<folder>`,
# `make test`. Everything installs into .venv from pinned requirements.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro repro-offline test lint bench serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

repro: setup
	$(BIN)/dvc repro

repro-offline: setup
	@test -n "$(DATA)" || { echo "usage: make repro-offline DATA=<image folder with train/ [val/] test/>"; exit 2; }
	$(BIN)/siamese-params apply profiles/offline.yaml --set data.source=$(DATA)
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src stages tests benchmarks

# the web page and HTTP API on http://127.0.0.1:8000 (docs/serving.md); ARGS="--port 9000 ..."
serve: setup
	$(BIN)/siamese-serve $(ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV)
