# tunnelscope developer targets.
#
#   make ext    build the C fast path in place (tunnelscope/nio/_fastpath*.so), as
#               `pip install -e .` does: python setup.py build_ext --inplace
#   make asan   build the fast path with AddressSanitizer + UndefinedBehaviorSanitizer
#               (-fsanitize=address,undefined -fno-omit-frame-pointer), run the fast-path and
#               bridge tests under it, then rebuild the normal extension (an ASan build cannot
#               be imported without the ASan runtime preloaded). The Python interpreter is not
#               built with ASan, so libasan (and libubsan) are LD_PRELOADed, and leak detection
#               is off (ASAN_OPTIONS=detect_leaks=0): CPython keeps memory until exit by design.
#               Any sanitizer report aborts the test run and fails the target.
#
# Variables: PYTHON (default python3), CC (default gcc), ASAN_TESTS (the test files).

PYTHON ?= python3
CC ?= gcc
ASAN_TESTS ?= tests/test_fastpath.py $(wildcard tests/test_bridge*.py)

SANITIZE := -fsanitize=address,undefined -fno-omit-frame-pointer
ASAN_PRELOAD = $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libubsan.so)

.PHONY: ext asan

ext:
	$(PYTHON) setup.py build_ext --inplace

asan:
	CC=$(CC) CFLAGS="$(SANITIZE) -g -O1" LDFLAGS="$(SANITIZE)" \
		$(PYTHON) setup.py build_ext --inplace --force --build-temp build/asan
	status=0; \
	LD_PRELOAD="$(ASAN_PRELOAD)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(PYTHON) -m pytest -q -p no:cacheprovider $(ASAN_TESTS) || status=$$?; \
	$(PYTHON) setup.py build_ext --inplace --force >/dev/null; \
	exit $$status
