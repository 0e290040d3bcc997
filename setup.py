"""Build the optional C fast path; the package works without it (pure-Python backend)."""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "tunnelscope.nio._fastpath",
            sources=[  # one file per concern: tunnelscope/nio/fastpath/fastpath.h
                "tunnelscope/nio/fastpath/pool.c",
                "tunnelscope/nio/fastpath/bpf.c",
                "tunnelscope/nio/fastpath/impair.c",
                "tunnelscope/nio/fastpath/queue.c",
                "tunnelscope/nio/fastpath/capture.c",
                "tunnelscope/nio/fastpath/endpoint.c",
                "tunnelscope/nio/fastpath/loop.c",
                "tunnelscope/nio/fastpath/capture_type.c",
                "tunnelscope/nio/fastpath/loop_type.c",
                "tunnelscope/nio/fastpath/module.c",
            ],
            depends=["tunnelscope/nio/fastpath/fastpath.h"],  # rebuild when it changes
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
