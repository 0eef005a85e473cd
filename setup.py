"""Build flightquant's Cython extensions: the kernels (``flightquant._kernels`` from
``ext/_kernels.pyx``), the row bookkeeping (``flightquant._rows``), the widening of model files' values
(``flightquant._widen``) and the one-step
RecordBatch assembly through the Arrow C data interface (``flightquant._arrow``).

OpenMP is used when a tiny test program compiles and links with ``-fopenmp`` (the
compiler setuptools would use); otherwise the kernels build serial and a warning says so.

Environment switches:

* ``FLIGHTQUANT_NO_OPENMP=1``: force the serial build.
* ``FLIGHTQUANT_BOUNDSCHECK=1``: turn Cython's boundscheck/wraparound back on (debugging).
* ``FLIGHTQUANT_EXTENSIONS=_ggml,_kernels``: build only these extensions (a quicker
  ``build_ext --inplace`` while working on one kernel file; the others stay as built).

``-ffp-contract=off`` is mandatory: contracting ``a*b+c`` into an FMA changes rounding
and breaks bit parity with the NumPy reference. No ``-march=native``: wheels must run on
any x86-64 (baseline SSE2) or aarch64 machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n > 0 && omp_get_max_threads() > 0);
        return 0;
    }
    """
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _openmp_flags(compiler) -> list[str] | None:
    """Return the OpenMP compile/link flags if a probe program builds and links."""
    if compiler.compiler_type == "msvc":
        candidates = [["/openmp"]]
    else:
        candidates = [["-fopenmp"]]
    for flags in candidates:
        tmp = tempfile.mkdtemp(prefix="fq_omp_")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(_OPENMP_PROBE)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=flags)
            return flags
        except Exception:  # CompileError, LinkError, missing tools: no OpenMP
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return None


class BuildExt(build_ext):
    """build_ext that adds OpenMP flags when (and only when) the probe succeeds."""

    def build_extensions(self):
        if _env_flag("FLIGHTQUANT_NO_OPENMP"):
            flags = None
            print("flightquant: FLIGHTQUANT_NO_OPENMP set, building the serial kernels")
        else:
            flags = _openmp_flags(self.compiler)
            if flags is None:
                print(
                    "WARNING flightquant: the compiler cannot build OpenMP programs; "
                    "building the serial kernels (threads > 1 will run on one core)",
                    file=sys.stderr,
                )
        is_msvc = self.compiler.compiler_type == "msvc"
        for ext in self.extensions:
            if is_msvc:
                ext.extra_compile_args = ["/O2", "/fp:precise"]
            else:
                ext.extra_compile_args = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
            if flags:
                ext.extra_compile_args += flags
                ext.extra_link_args = list(flags)
        super().build_extensions()


_checks = _env_flag("FLIGHTQUANT_BOUNDSCHECK")
extensions = [
    Extension(
        "flightquant._kernels",
        ["ext/_kernels.pyx"],
        include_dirs=["ext"],
    ),
    Extension(
        "flightquant._rows",
        ["ext/_rows.pyx"],
        include_dirs=["ext"],
    ),
    Extension(
        "flightquant._widen",
        ["ext/_widen.pyx"],
        include_dirs=["ext"],
    ),
    Extension(
        "flightquant._arrow",
        ["ext/_arrow.pyx"],
        include_dirs=["ext"],
    ),
    Extension(
        "flightquant._ggml",
        ["ext/_ggml.pyx"],
        include_dirs=["ext"],
    ),
    Extension(
        "flightquant._engine",
        ["ext/_engine.pyx"],
        include_dirs=["ext"],
    ),
]

_only = {n.strip() for n in os.environ.get("FLIGHTQUANT_EXTENSIONS", "").split(",") if n.strip()}
if _only:
    extensions = [e for e in extensions if e.name.rsplit(".", 1)[-1] in _only]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        # the directives depend on the environment: never reuse a stale generated .c
        force=True,
        compiler_directives={
            "language_level": 3,
            "boundscheck": _checks,
            "wraparound": _checks,
            "cdivision": True,
            "initializedcheck": _checks,
        },
    ),
    cmdclass={"build_ext": BuildExt},
)
