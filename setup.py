"""Build script. All metadata lives in pyproject.toml; this file exists for the optional
CUDA C++ extension (csrc/), whose build switches are documented in the README."""

from setuptools import setup

setup()
