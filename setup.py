"""Exists only to carry cffi_modules; metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
