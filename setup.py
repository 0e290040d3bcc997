"""Build the optional C fast path; the package works without it (pure-Python backend)."""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "tunnelscope.nio._fastpath",
            sources=["tunnelscope/nio/_fastpath.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,  # no compiler -> the pure-Python backend is used
        )
    )
    ext_modules.append(
        Extension(
            "tunnelscope.analysis._scan",
            sources=["tunnelscope/analysis/_scan.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
            optional=True,  # no compiler -> decap uses tunnelscope.analysis.decap.PyScanner
        )
    )

setup(ext_modules=ext_modules)
