"""Exists only to carry cffi_modules and the wheel's tag; metadata lives in pyproject.toml."""

import sysconfig

from setuptools import setup

# cffi compiles uffd._native against the limited API (it defines Py_LIMITED_API
# and names the module _native.abi3.so) on every CPython but a free-threaded
# one, which has no stable ABI yet. Tag the wheel to match: one cp310-abi3
# wheel then serves Python 3.10 and every later version.
LIMITED_API = not sysconfig.get_config_var("Py_GIL_DISABLED")

setup(
    cffi_modules=["csrc/build_native.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if LIMITED_API else {},
)
