# Portico: `make demo` runs the whole path once; `make test` runs every test. Both install what is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup system venv demo test test-quick lint model bench clean

setup: system venv

system:
	@./scripts/install-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, or a dependency pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,dev,fl]'
	touch $@

demo: setup
	$(PY) -m appliance demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quick: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

model: venv
	$(PY) models/build_ct_body_composition.py --out models/ct-body-composition

bench: setup
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/return_path.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/end_to_end.py
	$(PY) benchmarks/fl_round.py

clean:
	rm -rf .demo var
