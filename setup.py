"""Declares fastdream's compiled pieces (pybind11, C++17, no torch): the replay core and the CPU ops."""

from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup

# One compiler per core for the op files (NPY_NUM_BUILD_JOBS overrides the count).
ParallelCompile("NPY_NUM_BUILD_JOBS").install()

setup(
    ext_modules=[
        Pybind11Extension("fastdream.data._replay", sorted(glob("csrc/replay/*.cpp")), include_dirs=["csrc"],
                          cxx_std=17, extra_compile_args=["-O3"]),
        # One file per op (csrc/ops/); OpenMP: the ops run on the libgomp that torch loaded (csrc/ops/common.hpp).
        Pybind11Extension("fastdream.fast._ops", sorted(glob("csrc/ops/*.cpp")), include_dirs=["csrc"], cxx_std=17,
                          extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]),
    ],
)
