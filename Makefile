# Two entry points for a fresh machine: `make simulate` and `make test`.
# Each creates the virtualenv (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: simulate test bench bench-ci bench-postgrey demo install reinstall clean

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
	rm -rf $(VENV) $(SYSTEM_VENV) build *.egg-info

# The short benchmark CI runs: fails only on a gross (2x) regression.
bench-ci: install reinstall
	$(BIN)/python benchmarks/run.py --quick

# A scripted SMTP session through the wrapper: greylisted, then let through.
demo: install reinstall
	sh examples/demo.sh

# greylist postgrey against Debian's postgrey, ours as installed in .venv and as
# installed for the distribution's python3 (.venv-system), which is what
# `python3 -m venv /opt/greylist` takes on a Debian site: Debian's is linked
# statically and built with profile-guided optimisation, and took 11-23% less
# CPU a request than the 3.11.7 pyenv built here (libpython shared, no PGO).
SYSTEM_PYTHON ?= /usr/bin/python3
SYSTEM_VENV := .venv-system

$(SYSTEM_VENV)/bin/python:
	$(SYSTEM_PYTHON) -m venv $(SYSTEM_VENV)

bench-postgrey: install reinstall $(SYSTEM_VENV)/bin/python
	$(SYSTEM_VENV)/bin/python -m pip install -q .
	$(SYSTEM_VENV)/bin/python -m pip install -q --no-deps --force-reinstall .
	$(BIN)/python benchmarks/run.py --only policy_servers --system-python $(SYSTEM_VENV)/bin/python \
		--out bench-results/postgrey.json
