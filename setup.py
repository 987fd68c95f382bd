"""Builds the native runtime in csrc/ (pybind11, no link to torch's ABI: buffers cross as raw pointers).

Every folder csrc/<name>/ becomes one extension module ratel._<name> from its .cpp files, so parts of the
native runtime can be built, tested and replaced independently.
"""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    extensions = []
    for folder in sorted(glob.glob(os.path.join(HERE, "csrc", "*"))):
        sources = sorted(glob.glob(os.path.join(folder, "*.cpp")))
        if not os.path.isdir(folder) or not sources:
            continue
        name = os.path.basename(folder)
        extensions.append(Pybind11Extension(
            f"ratel._{name}",
            [os.path.relpath(s, HERE) for s in sources],
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lpthread"],
        ))
    return extensions


setup(ext_modules=native_extensions(), cmdclass={"build_ext": build_ext})
