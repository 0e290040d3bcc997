# tunnelscope developer targets.
#
#   make ext    build the C extensions in place (tunnelscope/nio/_fastpath*.so, ...), as
#               `pip install -e .` does: python setup.py build_ext --inplace
#   make asan   build both C extensions (the fast path and the decap scanner) with
#               AddressSanitizer + UndefinedBehaviorSanitizer (-fsanitize=address,undefined
#               -fno-omit-frame-pointer) and run under them the fast-path, bridge, decap,
#               sniff and reassembly tests, then ASAN_FUZZ_COUNT inputs of the C-vs-Python
#               scanner fuzz targets (decap, tpacket). Nothing in the source tree changes: the package and
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
# ASAN_TESTS (test files to run), ASAN_FUZZ_COUNT (default 20,000),
# ASAN_PYTEST_ARGS (default: skip the tests' pure-Python backend, which runs no C and is too
# slow under the preloaded ASan allocator for the bridge's 20,000-frame bursts, and decap's
# memory test, which measures RSS that ASan's shadow memory inflates).

PYTHON ?= $(if $(wildcard .venv/bin/python),$(abspath .venv/bin/python),python3)
CC ?= gcc
ASAN_TESTS ?= tests/test_fastpath.py $(wildcard tests/test_bridge*.py) tests/test_decap.py \
	tests/test_sniff.py tests/test_reassembly.py
ASAN_FUZZ_COUNT ?= 20000
ASAN_PYTEST_ARGS ?= -k "not python and not memory_does_not_grow"
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
	cp -r tunnelscope tests captures pyproject.toml $(ASAN_DIR)/stage/
	cp $(ASAN_DIR)/lib/tunnelscope/nio/_fastpath*.so $(ASAN_DIR)/stage/tunnelscope/nio/
	cp $(ASAN_DIR)/lib/tunnelscope/analysis/_scan*.so $(ASAN_DIR)/stage/tunnelscope/analysis/
	cd $(ASAN_DIR)/stage && \
	export PYTHONPATH=. LD_PRELOAD="$(ASAN_PRELOAD)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 && \
	$(PYTHON) -c "import os, tunnelscope.nio._fastpath as f, tunnelscope.analysis._scan as s; \
		assert all(m.__file__.startswith(os.getcwd()) for m in (f, s)), 'not the sanitized build'" && \
	$(PYTHON) -m pytest -q -p no:cacheprovider $(ASAN_PYTEST_ARGS) $(ASAN_TESTS) && \
	$(PYTHON) tests/fuzz.py --target decap --count $(ASAN_FUZZ_COUNT) && \
	$(PYTHON) tests/fuzz.py --target tpacket --count $(ASAN_FUZZ_COUNT)
