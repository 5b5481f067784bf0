# The C extension: the PEP 523 hook (it includes CPython's internal frame headers) and the
# co-execution fast path of one op.
import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

# ``TERRA_BC=1 python train.py``: the interpreter runs this .pth file's import line at start
# (site.py, for every .pth in site-packages); it imports terra_bc only when TERRA_BC is set.
STARTUP_PTH = "terra_bc-startup.pth"


class build_py_and_startup(build_py):
    """build_py, plus the startup .pth at the top of what is installed (site-packages)."""

    def run(self):
        super().run()
        self.copy_file(STARTUP_PTH, os.path.join(self._top(), STARTUP_PTH))

    def _top(self):
        # An editable wheel holds no build_lib files (its .pth points at the sources), but
        # setuptools (>= 64) sets ``install_lib`` to the folder it zips into that wheel.
        install_lib = getattr(self.distribution.get_command_obj("install"), "install_lib", None)
        return install_lib if getattr(self, "editable_mode", False) and install_lib else self.build_lib

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self._top(), STARTUP_PTH)]


setup(cmdclass={"build_py": build_py_and_startup},
      ext_modules=[Extension("terra_bc._hook", ["terra_bc/_hook.c", "terra_bc/_fastop.c"],
                             depends=["terra_bc/_fastop.h"], extra_compile_args=["-std=gnu11"])])
