"""Builds the Cython data plane (fastproxy._core); the rest is pyproject.toml.

Environment switches (also through `pip install .`):
  FASTPROXY_FORCE_PORTABLE=1  build as a platform without Linux's extras
                              would (poll engine only, no splice, accept4,
                              TCP_NOTSENT_LOWAT...): tests macOS's code on Linux.
  FASTPROXY_DEBUG_BUILD=1     -O0 -g, line tracing, bounds and wraparound checks.
  FASTPROXY_ANNOTATE=1        writes the HTML that shows where C calls Python.
  FASTPROXY_SANITIZE=LIST     builds with -fsanitize=LIST (e.g. address,undefined),
                              -O1 -g, frame pointers kept; .ci/sanitize runs the
                              suite on such a build (docs/building.md).
  FASTPROXY_FAULTS=1          allocations made without the GIL fail on demand
                              (_core._fail_allocs): a test build (docs/building.md).
"""
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDES = os.path.join("src", "fastproxy", "includes")


def env_flag(name):
    return os.environ.get(name, "") not in ("", "0")


PORTABLE = env_flag("FASTPROXY_FORCE_PORTABLE")
DEBUG = env_flag("FASTPROXY_DEBUG_BUILD")
FAULTS = env_flag("FASTPROXY_FAULTS")
SANITIZE = os.environ.get("FASTPROXY_SANITIZE", "").strip()
if SANITIZE and not all(s in ("address", "undefined", "leak") for s in SANITIZE.split(",")):
    sys.exit("FASTPROXY_SANITIZE: %r is not a list of address, undefined, leak" % SANITIZE)

macros = []
# Not in _core.pyx's directive comment, which would win over these.
directives = {"language_level": "3", "boundscheck": False, "wraparound": False}
compile_args = ["-O2"]
# Debug information is most of the extension's size (2.8 MB against 0.5):
# wheels ship without it; a debug build keeps it.
link_args = ["-Wl,--strip-debug"] if sys.platform.startswith("linux") else []
if PORTABLE:
    macros.append(("FASTPROXY_FORCE_PORTABLE", "1"))
if FAULTS:
    # Allocations without the GIL fail on demand (_core._fail_allocs): a
    # test build, never shipped.
    macros.append(("FASTPROXY_FAULTS", "1"))
if DEBUG:
    compile_args = ["-O0", "-g"]
    link_args = []
    # Not CYTHON_TRACE_NOGIL: its hooks take the GIL in every nogil function,
    # tracer or not. Even without it, Cython before Python 3.13 takes the GIL
    # at each nogil function's exit (docs/building.md): test_gil fails there.
    macros += [("CYTHON_TRACE", "1")]
    directives.update(linetrace=True, boundscheck=True, wraparound=True)
if SANITIZE:
    # -O1 keeps the reports' stacks readable at a bearable speed; no
    # recovery from UBSan, so a finding stops the process (and the run).
    flags = ["-fsanitize=" + SANITIZE, "-fno-omit-frame-pointer", "-g"]
    if "undefined" in SANITIZE:
        flags.append("-fno-sanitize-recover=undefined")
    compile_args = [a for a in compile_args if not a.startswith("-O")] + ["-O1"] + flags
    # Kept debug information (no --strip-debug): the reports name lines.
    link_args = flags

# Neither cythonize nor build_ext sees a switch change (the sources are not
# newer than their outputs), so a build of another flavour than the last one
# here starts over; the stamp is written once a build succeeded.
FLAVOUR = "portable=%d debug=%d sanitize=%s faults=%d" % (PORTABLE, DEBUG, SANITIZE, FAULTS)
STAMP = os.path.join(HERE, "build", "fastproxy-flavour")
try:
    with open(STAMP) as f:
        REBUILD = f.read() != FLAVOUR
except OSError:
    REBUILD = True


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        self.force = self.force or REBUILD


extensions = [
    Extension(
        "fastproxy._core",
        [os.path.join("src", "fastproxy", "_core.pyx")],
        include_dirs=[INCLUDES],
        depends=[os.path.join(INCLUDES, "compat.h")],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=env_flag("FASTPROXY_ANNOTATE"),
        force=REBUILD,
    ),
)
os.makedirs(os.path.dirname(STAMP), exist_ok=True)
with open(STAMP, "w") as f:
    f.write(FLAVOUR)
