"""Stage 3 of the pipeline: units, iterations, tracing mode and co-execution mode.

One module per concern; each imports only those above it in this list:

  settings      limits and their environment variables
  context       the thread's open iteration (stored once, in C), modes
  trace_rules   which callees are DL ops; what JAX's wrappers hold
  placeholders  Placeholder and its operators; eager ops on concrete values
  values        array tests, avals, fed numbers, a unit's arguments and result
  events        typed records: input/output specs, one event class per kind
  guards        callee keys, matching, the C fast path's spec, changed numbers
  bodies        vmap / lax control-flow bodies traced by JAX again at a call, as eager does
  paths         Path: one recorded path (a unit's TraceGraph is its paths)
  journal       records of divergences, compiles, fallbacks; the "terra_bc" logger
  timeline      spans of iterations, launches, compiles, fetches while recording
  pacing        how many launches may be in flight where several devices run them
  compiling     whether a new segment compiles now, later on a worker, or runs eagerly
  launching     which recorded equations run when; settling placeholders
  coexecution   co-execution mode's general path; Divergence and ``retried``
  tracing       tracing mode: ops recorded as events of a new path
  iteration     Iteration: enter, ops (the mode switch), fetch, diverge, finish
  autodiff      jax.grad / value_and_grad / vjp / jvp of user code
  vmapping      jax.vmap of user code: its Python run on one example, the piece batched
  units         Unit, ``@terra_bc.function``
  discovery     loop units and function units found without decoration
  dispatch      on_site: where rewritten call sites send DL-op calls
  tools         debuggers, profilers, coverage, jax.config changes: what an iteration does then
  report        reports: snapshots of units and paths that print and render as HTML
  diff          how two reports differ (paths, units, whole reports)
  explain       explain(): a report of one unit or of every unit

``install`` connects the C extension to it, once, at import.
"""
from __future__ import annotations

import numpy as np

from .. import _hook, scope
from . import journal
from . import settings as _settings
from .context import COEXEC
from .discovery import set_functions, set_loops
from .diff import diff
from .dispatch import on_site
from .events import OpEvent
from .explain import explain
from .iteration import Iteration
from .paths import Path
from .placeholders import STAND_IN, Placeholder, route_array_operators
from .settings import settings
from .tools import on_watched, watch_config
from .trace_rules import is_dl_op
from .units import Unit, function, reset
from .values import MISS, ArrayImpl

__all__ = ["config", "diff", "explain", "function", "reset", "set_functions", "set_loops", "settings",
           "Iteration", "Placeholder", "Unit"]


def install():
    """Tell the C extension where routed DL-op calls go, what a DL op is, what an
    iteration does when a tool starts watching, and the classes and objects its fast path
    reads (again after a reload: the classes are new); route a jax.Array's operators
    inside an iteration (``placeholders.route_array_operators``)."""
    _hook.set_routing(on_site, is_dl_op)
    _hook.set_watch_handler(on_watched)
    watch_config()
    _hook.set_fast_path({"placeholder": Placeholder, "event": OpEvent, "iteration": Iteration,
                         "path": Path, "array": ArrayImpl, "numpy_scalar": np.generic, "stand_in": STAND_IN,
                         "coexec": COEXEC, "miss": MISS})
    route_array_operators(ArrayImpl)
    # Our frames are not the program's: JAX names the program's line, not ours, where it
    # says where a value was made (a leaked tracer's message, source info of equations),
    # and leaves ours out of the tracebacks it filters, as it does for Flax's.
    from jax._src import source_info_util, traceback_util
    if scope.PACKAGE_DIR not in source_info_util._exclude_paths:
        source_info_util.register_exclusion(scope.PACKAGE_DIR)
        traceback_util.register_exclusion(scope.PACKAGE_DIR)


install()
_settings.use_cache_dir(settings["cache_dir"])
_settings.update({"log": settings["log"]})  # (checks TERRA_BC_LOG's names)
journal.use_log(settings["log"])


def config(**changes):
    """``terra_bc.config(max_paths=16, max_compiles=32, warmup=0, inner_turns=16,
    dynamic_numbers=True, abstract_tracing=True, background_compile=True, donate=True, cache_dir="",
    op_by_op=False, log="", loops=None, functions=None,
    include=None, exclude=None)``: set
    limits (only those given); returns the settings now in force.  ``loops`` / ``functions``
    switch the units found without decoration (``set_loops`` / ``set_functions``);
    ``include`` / ``exclude`` replace the lists of library packages rewritten or never
    rewritten (``terra_bc/scope.py``; for code objects not seen yet).  ``log``: what the
    ``terra_bc`` logger says ("divergences,compiles,fallbacks,fetches", a list of them,
    "all" or "": ``runtime/journal.py``).  ``op_by_op``: segments run one eager dispatch an
    equation, never compiled, so values equal eager JAX's to the bit (a check, far slower:
    docs/reliability.md)."""
    if not isinstance(changes.get("log", ""), str):
        changes["log"] = ",".join(changes["log"])
    loops = changes.pop("loops", None)
    functions = changes.pop("functions", None)
    include, exclude = changes.pop("include", None), changes.pop("exclude", None)
    for name, names in (("include", include), ("exclude", exclude)):
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
            raise TypeError(f"terra_bc.config: {name} takes a list of package names, got {names!r}")
    _settings.update(changes)
    if "log" in changes:
        journal.use_log(settings["log"])
    if loops is not None:
        set_loops(bool(loops))
    if functions is not None:
        set_functions(bool(functions))
    include, exclude = scope.set_lists(include, exclude)
    return dict(settings, include=include, exclude=exclude)
