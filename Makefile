# pyuffd: every target works on a fresh clone; `make help` lists them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all help demo test stress probe bench lint clean

all: $(STAMP) ## Create .venv, install pyuffd editable with test extras, build the extension

help: ## List the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml setup.py csrc/*.c csrc/*.h csrc/build_native.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,progress,dev,redis]'
	touch $(STAMP)

demo: $(STAMP) ## Lazy-restore a 256 MiB worker from a local page server and print the figures
	$(PY) examples/demo.py

test: $(STAMP) ## Run the test suite against the running kernel
	$(PY) -m pytest -q -m "not stress" || { rc=$$?; [ $$rc -ne 5 ] || \
		echo "make test: pytest collected no test (exit 5): nothing was tested" >&2; exit $$rc; }

stress: $(STAMP) ## Run the long load variants
	$(PY) -m pytest -q -m stress

probe: $(STAMP) ## Show what this host's kernel and permissions allow
	$(PY) -m uffd probe

bench: $(STAMP) ## Run the benchmark suite against the C reference
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m uffd bench

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check uffd tests examples csrc setup.py
	$(VENV)/bin/ruff format --check uffd tests examples csrc
	$(VENV)/bin/mypy uffd

clean: ## Remove the venv and build products
	rm -rf $(VENV) build *.egg-info uffd/_native*.so uffd/_native.c .pytest_cache
