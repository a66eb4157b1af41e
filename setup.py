"""Declares fastdream's compiled pieces (pybind11, C++17, no torch): the replay core and small CPU ops."""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "fastdream._replay",
            ["csrc/bindings.cpp", "csrc/replay.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        ),
        # OpenMP: the ops run on the libgomp that torch loaded (see csrc/ops.cpp).
        Pybind11Extension("fastdream._ops", ["csrc/ops.cpp"], include_dirs=["csrc"], cxx_std=17,
                          extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]),
    ],
)
