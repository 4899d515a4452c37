# The single entry point. `make demo` runs the demo gateway; `make test` runs every test.
# Both work from a clean clone on Debian/Ubuntu with Python 3.11: they create .venv, install the
# package with its test extra, and install redis-server (apt) when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast serve install system-deps proto proto-check bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"' || { echo "need Python 3.11+ (set PYTHON=...)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { $(MAKE) --no-print-directory system-deps WANT_VENV=1 && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,bench]"
	@touch $(STAMP)

install: $(STAMP)

# redis-server for the tests and the demo; promtool (Debian package prometheus) to check the alert
# rules; python3-venv where Debian's Python lacks ensurepip.
system-deps:
	@need=""; \
	command -v redis-server >/dev/null 2>&1 || need="$$need redis-server"; \
	command -v promtool >/dev/null 2>&1 || need="$$need prometheus"; \
	[ -n "$(WANT_VENV)" ] && need="$$need python3-venv"; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	fi

demo: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || $(MAKE) --no-print-directory system-deps || echo "redis-server not installed: the demo runs without Redis"
	$(VENV)/bin/infergate demo

# CONFIG defaults to the commented starter; its models are written beside it on first use.
CONFIG ?= examples/infergate.yaml
serve: $(STAMP)
	@if [ "$(CONFIG)" = examples/infergate.yaml ] && [ ! -f examples/models/classifier_v1.onnx ]; then \
	  $(VENV)/bin/infergate demo --export examples; fi
	$(VENV)/bin/infergate serve --config $(CONFIG)

proto: $(STAMP)
	$(PY) scripts/gen_protos.py

proto-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

test: $(STAMP) system-deps proto-check
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The pure tier: no Redis, no Triton, no processes started (markers applied from the fixtures used).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not redis and not triton and not subprocess" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/infergate bench --scenario serving --concurrency 1,32 --duration-s 8 --out bench-out

clean:
	rm -rf $(VENV) .pytest_cache bench-out
