"""Build the compiled code; everything else is in setup.cfg.

Each Cython source lies beside the Python it serves, in the package that owns it: the product's in
tango_dectris_live/receiver/ and tango_dectris_live/processing/, the simulator's in sim/ (which
imports nothing from the product). Cython writes its generated C beside each .pyx (git ignores it).
"""
import numpy
import zmq
from Cython.Build import cythonize
from setuptools import Extension, setup

compile_args = ["-O3"]

extensions = [
    Extension(
        "tango_dectris_live.receiver._receiver",
        ["tango_dectris_live/receiver/_receiver.pyx"],
        depends=["tango_dectris_live/receiver/_frame_index.pxd"],
        extra_compile_args=compile_args,
        define_macros=[("_GNU_SOURCE", None)],  # memmem()
    ),
    Extension(
        "tango_dectris_live.receiver._stack_decode",
        ["tango_dectris_live/receiver/_stack_decode.pyx"],
        depends=["tango_dectris_live/receiver/_frame_index.pxd", "tango_dectris_live/receiver/_stack_decode.pxd"],
        extra_compile_args=compile_args,
    ),
    Extension(
        "tango_dectris_live.processing._pixel_sums",
        ["tango_dectris_live/processing/_pixel_sums.pyx"],
        depends=["tango_dectris_live/processing/pixel_kernels.h", "tango_dectris_live/receiver/_stack_decode.pxd"],
        extra_compile_args=compile_args,
    ),
    Extension(
        "sim._fastsend",
        ["sim/_fastsend.pyx"],
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
