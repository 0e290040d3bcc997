# tunnelscope developer targets.
#
#   make ext    build the C extensions in place (tunnelscope/nio/_fastpath*.so, ...), as
#               `pip install -e .` does: python setup.py build_ext --inplace
#   make asan   build the C fast path with AddressSanitizer + UndefinedBehaviorSanitizer
#               (-fsanitize=address,undefined -fno-omit-frame-pointer) and run the fast-path
#               and bridge tests under it. Nothing in the source tree changes: the package and
#               the tests are copied to build/asan/stage, the sanitized _fastpath replaces the
#               copy's, and pytest runs there (an ASan build cannot be imported without the
#               ASan runtime, so building in place would break everyone else's test runs).
#               The Python interpreter is not built with ASan, so libasan and libubsan are
#               LD_PRELOADed, and leak detection is off (ASAN_OPTIONS=detect_leaks=0: CPython
#               keeps memory until exit by design). Any sanitizer report aborts the run and
#               fails the target.
#   make fuzz   the fuzz harness (tests/fuzz.py): FUZZ_COUNT inputs (default 1,000,000) on
#               each target: decoders, capture readers, C-vs-Python decap scanners, control
#               lines. A failing input is kept in build/fuzz/.
#
# Variables: PYTHON (default .venv/bin/python when it exists, else python3), CC (default gcc),
# ASAN_TESTS (test files to run),
# ASAN_PYTEST_ARGS (default: skip the bridge tests' pure-Python backend, which runs no C and
# is too slow under the preloaded ASan allocator for its 20,000-frame bursts).

PYTHON ?= $(if $(wildcard .venv/bin/python),$(abspath .venv/bin/python),python3)
CC ?= gcc
ASAN_TESTS ?= tests/test_fastpath.py $(wildcard tests/test_bridge*.py)
ASAN_PYTEST_ARGS ?= -k "not python"
ASAN_DIR := build/asan

SANITIZE := -fsanitize=address,undefined -fno-omit-frame-pointer
ASAN_PRELOAD = $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libubsan.so)

FUZZ_COUNT ?= 1000000

.PHONY: ext asan fuzz

ext:
	$(PYTHON) setup.py build_ext --inplace

fuzz:
	$(PYTHON) tests/fuzz.py --count $(FUZZ_COUNT)

asan:
	rm -rf $(ASAN_DIR)
	mkdir -p $(ASAN_DIR)/stage
	CC=$(CC) CFLAGS="$(SANITIZE) -g" LDFLAGS="$(SANITIZE)" $(PYTHON) setup.py build_ext \
		--force --build-temp $(ASAN_DIR)/temp --build-lib $(ASAN_DIR)/lib
	cp -r tunnelscope tests pyproject.toml $(ASAN_DIR)/stage/
	cp $(ASAN_DIR)/lib/tunnelscope/nio/_fastpath*.so $(ASAN_DIR)/stage/tunnelscope/nio/
	cd $(ASAN_DIR)/stage && \
	export PYTHONPATH=. LD_PRELOAD="$(ASAN_PRELOAD)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 && \
	$(PYTHON) -c "import os, tunnelscope.nio._fastpath as f; \
		assert f.__file__.startswith(os.getcwd()), 'not the sanitized build: ' + f.__file__" && \
	$(PYTHON) -m pytest -q -p no:cacheprovider $(ASAN_PYTEST_ARGS) $(ASAN_TESTS)
