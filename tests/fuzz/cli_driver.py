"""``python -m terra_bc tests/fuzz/cli_driver.py PROGRAM OUT``: the harness's ``cli`` mode.

Runs a generated program's ``main()`` in a process started by terra_bc's own command line
(loop and function units on, as a user gets them) and pickles its comparable result (or the
exception it raised) and terra_bc's counters to OUT."""
import pickle
import runpy
import sys

from harness import plain  # (the script's folder is sys.path[0], as for any script)

import terra_bc

program, out = sys.argv[1], sys.argv[2]
try:
    result = (plain(runpy.run_path(program, run_name="fuzzprog")["main"]()), None)
except Exception as e:
    result = (None, (type(e).__name__, str(e)[:500]))
with open(out, "wb") as f:
    pickle.dump((result, terra_bc.stats()), f)
