"""Builds the Cython data plane (fastproxy._core); the rest is pyproject.toml."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDES = os.path.join("src", "fastproxy", "includes")

extensions = [
    Extension(
        "fastproxy._core",
        [os.path.join("src", "fastproxy", "_core.pyx")],
        include_dirs=[INCLUDES],
        depends=[os.path.join(INCLUDES, "compat.h")],
        extra_compile_args=["-O2"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3"},
        # FASTPROXY_ANNOTATE=1 writes the HTML that shows where C calls Python.
        annotate=bool(os.environ.get("FASTPROXY_ANNOTATE")),
    )
)
