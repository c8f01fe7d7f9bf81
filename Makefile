# The README's commands. Each bootstraps .venv on a fresh machine (Python 3.11, Debian base).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test install build bench docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

# Reinstall when the packaging or the compiled sources change.
$(STAMP): $(PY) setup.cfg setup.py pyproject.toml $(wildcard cython/*.pyx cython/*.pxd cython/*.h)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Rebuild the Cython extensions in place (after editing cython/*.pyx without reinstalling).
build: $(STAMP)
	$(PY) setup.py build_ext --inplace --quiet

test: $(STAMP)
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
	find . -name '*.so' -path './tango_dectris_live/*' -delete
	find . -name '*.so' -path './sim/*' -delete
