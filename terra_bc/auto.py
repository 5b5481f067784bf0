"""``import terra_bc.auto`` (the first line of a script), or ``TERRA_BC=1 python train.py``
(the startup .pth file imports this module when TERRA_BC is set): terra_bc as
``python -m terra_bc`` runs it, with loop and function units on (``TERRA_BC_LOOPS=0`` /
``TERRA_BC_FUNCTIONS=0`` turn them off, as for the command line).

The hook only reaches frames that start after it is enabled.  Imported from the main
script's own top-level code, this module cannot reach that code (its frame already runs),
so it runs the script afresh as ``python -m terra_bc`` would, and exits with its status
when it ends: the lines above the import run twice.
"""
from __future__ import annotations

import os
import sys

import terra_bc
from terra_bc.__main__ import main, unit_switches


def _main_script_importing():
    """The main script's top-level frame, when it is what imports this module."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith("<frozen importlib")):
        frame = frame.f_back
    main_module = sys.modules.get("__main__")
    if (frame is None or main_module is None or frame.f_code.co_name != "<module>"
            or frame.f_globals is not vars(main_module)):
        return None
    return frame if os.path.isfile(getattr(main_module, "__file__", None) or "") else None


def _start():
    if terra_bc.is_enabled():  # (python -m terra_bc, or TERRA_BC=1, got there first)
        return
    if _main_script_importing() is None:
        loops, functions = unit_switches()
        terra_bc.enable(loops=loops, functions=functions, threads=True)
        return
    spec = sys.modules["__main__"].__spec__
    target = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    main(target + sys.argv[1:])
    sys.exit(0)


_start()
