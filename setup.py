"""Build the compiled core (Cython sources in cython/); everything else is in setup.cfg."""
import numpy
import zmq
from Cython.Build import cythonize
from setuptools import Extension, setup

compile_args = ["-O3"]

extensions = [
    Extension(
        "tango_dectris_live.receiver._receiver",
        ["cython/receiver.pyx"],
        extra_compile_args=compile_args,
        define_macros=[("_GNU_SOURCE", None)],  # memmem()
    ),
    Extension(
        "sim._fastsend",
        ["cython/sim_fastsend.pyx"],
        extra_compile_args=compile_args,
    ),
    Extension(
        "tango_dectris_live.receiver._stack_decode",
        ["cython/stack_decode.pyx"],
        extra_compile_args=compile_args,
    ),
    Extension(
        "tango_dectris_live.processing._pixel_sums",
        ["cython/pixel_sums.pyx"],
        depends=["cython/pixel_kernels.h"],
        include_dirs=["cython"],
        extra_compile_args=compile_args,
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        include_path=zmq.get_includes(),
    ),
    include_dirs=[numpy.get_include()] + zmq.get_includes(),
)
