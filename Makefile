# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install samples demo test lint clean

# torch is installed first and pinned, so nothing pulls a CUDA build.
$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/installed

samples: install
	$(BIN)/medsr samples

demo: samples
	$(BIN)/medsr demo --out demo_output

lint: install
	$(BIN)/ruff format --check src tests
	$(BIN)/ruff check src tests

test: samples lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output .pytest_cache
