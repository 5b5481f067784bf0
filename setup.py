# The C extension: the PEP 523 hook (it includes CPython's internal frame headers) and the
# co-execution fast path of one op.
from setuptools import Extension, setup

setup(ext_modules=[Extension("terra_bc._hook", ["terra_bc/_hook.c", "terra_bc/_fastop.c"],
                                 depends=["terra_bc/_fastop.h"], extra_compile_args=["-std=gnu11"])])
