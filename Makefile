# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make demo   - create .venv if missing, install, run `dmdd demo` (built-in data, offline)
#   make test   - create .venv if missing, install, run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The exact tested versions (requirements/lock.txt) within pyproject.toml's ranges. Reinstalls only when either
# file changes; a second `make test` installs nothing.
$(STAMP): pyproject.toml requirements/lock.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c requirements/lock.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dmdd demo

test: $(STAMP)
	$(BIN)/python -m pytest
