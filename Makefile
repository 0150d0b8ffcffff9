# Two entry points for a fresh machine: `make simulate` and `make test`.
# Each creates the virtualenv (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: simulate test bench bench-ci demo install reinstall clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q ".[test,redis,plot]"
	touch $@

install: $(VENV)/.installed

# Reinstall the package (not editable: an editable install adds an import hook
# to every interpreter start, which the wrapper would pay per connection).
reinstall: $(BIN)/python
	$(BIN)/python -m pip install -q --no-deps --force-reinstall .
	touch $(VENV)/.installed

simulate: install reinstall
	$(BIN)/simulate --rate 300k/day --duration 1d --seed 7

test: install reinstall
	$(BIN)/python -m pytest

bench: install reinstall
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info

# The short benchmark CI runs: fails only on a gross (2x) regression.
bench-ci: install reinstall
	$(BIN)/python benchmarks/run.py --quick

# A scripted SMTP session through the wrapper: greylisted, then let through.
demo: install reinstall
	sh examples/demo.sh
