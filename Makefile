# The README's commands. Each bootstraps .venv on a fresh machine (Python 3.11, Debian base).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The compiled code's sources, each in the package it builds (setup.py lists them).
COMPILED_SOURCES := $(wildcard tango_dectris_live/*/*.pyx tango_dectris_live/*/*.pxd tango_dectris_live/*/*.h \
                               sim/*.pyx sim/*.pxd sim/*.h)

.PHONY: demo test install build bench docs clean system-packages

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

# Reinstall when the packaging or the compiled sources change.
$(STAMP): $(PY) setup.cfg setup.py pyproject.toml $(COMPILED_SOURCES)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Rebuild the Cython extensions in place after editing a .pyx, .pxd or .h (the STAMP rule reinstalls first).
build: $(STAMP)
	$(PY) setup.py build_ext --inplace --quiet

# Debian packages of the integration tests (Xvfb, ...): installed when missing and run as root.
system-packages:
	bash tools/system_packages.sh

test: $(STAMP) system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) demo/run_demo.py

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

docs: $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	$(VENV)/bin/sphinx-build -b html docs docs/_build/html

clean:
	rm -rf build docs/_build demo-output .pytest_cache
	find tango_dectris_live sim -name '*.so' -delete
	find tango_dectris_live sim -name '_*.c' -delete  # Cython's output, beside each .pyx
