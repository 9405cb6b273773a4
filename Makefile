# Portico: `make demo` runs the whole path once; `make test` runs every test. Both install what is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# the CPU build of torch, for training, building models, federated learning and the tests (never the demo)
TORCH ?= 2.13.0

.PHONY: setup system venv venv-full ohif demo test test-quick lint model bench clean bundle install-offline

setup: system venv ohif

# the pinned OHIF v3 build the viewer tests serve (npm registry; those tests skip, saying so, when it is absent)
ohif:
	@./scripts/fetch-ohif.sh || echo "== OHIF not fetched (npm registry unreachable?): the viewer tests will skip"

system:
	@./scripts/install-system.sh

# `make demo` and `portico serve`: Portico and what it runs on (ONNX Runtime); no torch
venv: $(VENV)/.installed

# tests, training, `make model`, federated learning: the extras and the CPU build of torch
venv-full: $(VENV)/.installed-full

$(VENV)/.installed: pyproject.toml
	@echo "== venv: $(VENV) (pip lists each package it collects)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-full: $(VENV)/.installed
	@echo "== venv: torch $(TORCH) (CPU build) and the extras train, dev, fl"
	TORCH_VERSION=$(TORCH) ./scripts/install-torch.sh $(PY)
	$(PY) -m pip install -e '.[train,dev,fl]'
	touch $@

demo: setup
	$(PY) -m appliance demo

lint: venv-full
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: system venv-full ohif lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-quick: venv-full
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

model: venv-full
	$(PY) models/build_ct_body_composition.py --out models/ct-body-composition

bench: system venv-full
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/return_path.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/end_to_end.py
	$(PY) benchmarks/fl_round.py

# air-gapped sites: one archive with the wheels, the Debian packages and the model packages (scripts/bundle.sh),
# and its installation with no network (scripts/install-offline.sh)
BUNDLE ?= build/portico-bundle.tar.gz

bundle: venv
	./scripts/bundle.sh $(PY) $(BUNDLE)

install-offline:
	./scripts/install-offline.sh $(BUNDLE) --venv $(VENV)

clean:
	rm -rf .demo var
