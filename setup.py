"""Build script: the package, plus the C++/CUDA extension when it can be built (csrc/)."""
from setuptools import setup

setup()
