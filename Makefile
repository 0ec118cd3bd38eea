# Two entry points do all set-up on a fresh machine (see README):
#   make demo   - create .venv, install, release the sample photos into releases/demo
#   make test   - create .venv, install with test extras, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Prefect's server telemetry tries to reach the internet; the machines have none.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/anonymousnet demo --output releases/demo

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) releases/demo samples
