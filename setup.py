"""Build the native core: every ext/<name>.pyx becomes the module engine.<name>.

Compiler directives live here and only here. ENGINE_DEBUG_BUILD=1 gives a bounds-checked,
assertion-enabled build with -O0 -g (and ASan with ENGINE_SANITIZE=1).
"""

import glob
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("ENGINE_DEBUG_BUILD") == "1"
SANITIZE = os.environ.get("ENGINE_SANITIZE") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "freethreading_compatible": False,
}
cflags = ["-O0", "-g"] if DEBUG else ["-O3"]
ldflags = []
if SANITIZE:
    cflags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address"]

extensions = [
    Extension(
        "engine." + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=[np.get_include(), "ext"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    for path in sorted(glob.glob("ext/*.pyx"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, quiet=True))
