# pyuffd: every target works on a fresh clone; `make help` lists them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all help demo test stress probe bench lint sanitize clean

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

# The sanitizer build lives in build/san: a package of symlinks to uffd/ plus its own
# _native, so the normal build in uffd/ is never touched. The interpreter is not
# instrumented, so ASan's runtime is preloaded (it must come first; UBSan's is loaded
# by the extension itself); detect_leaks=0 because CPython itself leaks by design at
# exit (interned objects, static types), which is not ours; intercept_tls_get_addr=0
# (for both runtimes) works around their own crash in DTLS_on_tls_get_addr on this
# glibc, seen with the unchanged extension too.
SAN := build/san
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g
SAN_TESTS := tests/test_lifecycle.py tests/test_handler.py tests/test_handler_api.py \
	tests/test_handler_events.py tests/test_never_hang.py tests/test_events.py \
	tests/test_prefetch.py tests/test_fault_injection.py tests/test_modules.py \
	tests/test_memtype.py tests/test_dirty.py tests/test_bulk_install.py tests/test_native_remote.py \
	tests/test_native_file.py \
	tests/test_fault_channel.py

sanitize: $(STAMP) ## Build the extension with ASan+UBSan and run the lifecycle and concurrency tests under it
	rm -rf $(SAN) && mkdir -p $(SAN)/obj $(SAN)/pkg/uffd
	CFLAGS="$(SAN_FLAGS)" LDFLAGS="$(SAN_FLAGS)" $(PY) csrc/build_native.py $(SAN)/obj > $(SAN)/build.log
	for f in uffd/*; do case $$f in uffd/_native*) ;; *) ln -s $(CURDIR)/$$f $(SAN)/pkg/$$f ;; esac; done
	cp $(SAN)/obj/uffd/_native.*.so $(SAN)/pkg/uffd/
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" \
	ASAN_OPTIONS=detect_leaks=0:intercept_tls_get_addr=0:abort_on_error=1:allow_user_segv_handler=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:intercept_tls_get_addr=0 \
	PYTHONPATH=$(CURDIR)/$(SAN)/pkg \
	$(PY) -P -m pytest -q -p no:cacheprovider -p no:faulthandler -m "not stress" $(SAN_TESTS)

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check uffd tests examples csrc setup.py
	$(VENV)/bin/ruff format --check uffd tests examples csrc
	$(VENV)/bin/mypy uffd

clean: ## Remove the venv and build products
	rm -rf $(VENV) build *.egg-info uffd/_native*.so uffd/_native.c .pytest_cache
