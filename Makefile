# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run the local demo
#   make test   - create .venv, install, lint (ruff, mypy, import-linter) and run the whole suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench bench-quick clean

$(STAMP): pyproject.toml requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e .
	@# xds-protos ships an old copy of the OpenTelemetry protos in the same files as
	@# opentelemetry-proto; whichever installs last wins. Put the pinned ones back on top.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --force-reinstall $$(grep -o 'opentelemetry-proto==[0-9.]*' pyproject.toml)
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/pillion demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m benchmarks.micro
	$(PY) -m benchmarks.macro

bench-quick: $(STAMP)
	$(PY) -m benchmarks.micro --quick
	$(PY) -m benchmarks.macro --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
