# vlmguard — the two commands a user needs: `make demo` and `make test`.
# Both do all set-up themselves on a fresh machine (Python 3.11 venv, CPU torch, offline NLTK data).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlmguard-installed

.PHONY: setup test test-all demo serve dashboard clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(wildcard constraints.txt) scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

demo: setup
	$(BIN)/vlmguard demo

serve: setup
	$(BIN)/vlmguard serve

dashboard: setup
	$(BIN)/vlmguard dashboard

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
