# The C extension is the PEP 523 hook; it includes CPython's internal frame headers.
from setuptools import Extension, setup

setup(ext_modules=[Extension("terra_bc._hook", ["terra_bc/_hook.c"], extra_compile_args=["-std=gnu11"])])
