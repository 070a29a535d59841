"""Build only the Cython extensions; metadata lives in pyproject.toml."""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    exts = []
    for pyx in sorted(glob.glob(os.path.join("vmsgamp", "_core", "*.pyx"))):
        name = pyx[:-4].replace(os.sep, ".")
        exts.append(
            Extension(
                name,
                [pyx],
                include_dirs=["csrc"],
                extra_compile_args=["-O2", "-g0", "-std=gnu11", "-Wno-unused-function"],
            )
        )
    return exts


setup(
    ext_modules=cythonize(
        extensions(),
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    )
)
