"""Build the compiled kernels in ext/ into the broker package.

The extensions are required: if Cython or the C compiler fails, the install
fails with the compiler's message. There is no pure-Python fallback, because a
silent fallback would turn a 1 ms kernel into a 100 ms loop without telling anyone.
"""
import platform
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
#: SSSE3 byte shuffles for ext/bgr_gray.h (every x86-64 CPU since 2006); elsewhere the
#: kernels are plain C
SIMD_FLAGS = ["-mssse3"] if platform.machine().lower() in ("x86_64", "amd64") else []


def extensions() -> list[Extension]:
    """One extension module ``broker._<name>`` per ``ext/<name>.pyx``."""
    return [
        Extension(
            f"broker._{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            include_dirs=[np.get_include(), str(HERE / "ext")],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=["-O3", *SIMD_FLAGS],
        )
        for pyx in sorted((HERE / "ext").glob("*.pyx"))
    ]


setup(
    ext_modules=cythonize(
        extensions(),
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
