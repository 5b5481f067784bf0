"""terra_bc: imperative-symbolic co-execution (Terra) for JAX at the CPython bytecode level.

The pipeline, one module per stage: ``frames`` (which frames; the C hook in ``_hook.c``)
-> ``rewrite`` (which call sites) -> ``runtime`` (what each site does) -> ``jaxpr_builder``
(the graph) -> XLA.  ``counters`` holds every counter.  See docs/architecture.md.
"""
from __future__ import annotations

import contextlib

from . import _hook, counters, frames, runtime
from .frames import disable, enabled as is_enabled, set_scope
from .runtime import config, diff, explain, reset, set_functions, set_loops
from .runtime.timeline import record as timeline

__all__ = ["enable", "disable", "enabled", "function", "stats", "reset_stats", "set_scope",
           "explain", "diff", "reset", "set_loops", "set_functions", "config", "timeline"]


def enable(loops: bool | None = None, functions: bool | None = None, threads: bool = False):
    """Enable the frame hook in this thread.  ``loops`` / ``functions`` switch on (True) or
    off (False) the units found without decoration, as ``python -m terra_bc`` does; None
    leaves them as they are.  ``threads=True``: every thread that has not called
    ``enable``/``disable`` itself runs with the hook too (threads started later included),
    as under ``python -m terra_bc``."""
    if loops is not None:
        set_loops(loops)
    if functions is not None:
        set_functions(functions)
    frames.enable(threads)


@contextlib.contextmanager
def enabled(scope: str | None = None):
    """``with terra_bc.enabled():`` runs its body (this thread) with the hook enabled."""
    was = _hook.thread_choice()  # (on, off, or following the default: put back as it was)
    if scope is not None:
        set_scope(scope)
    enable()
    try:
        yield
    finally:
        _hook.set_thread_choice(was)


def function(fn):
    """Per-function opt-in: each call of ``fn`` is an iteration of a co-executed unit.

    ``fn``'s own call sites are rewritten now; functions it calls are rewritten by the frame
    hook, which is enabled in this thread while an iteration runs."""
    return runtime.function(frames.rewrite_function(fn), plain=fn)


def stats() -> dict:
    """Counters since start (or the last reset_stats()), as a plain dict."""
    return counters.snapshot()


def reset_stats():
    counters.reset()


def load_ipython_extension(shell):
    """``%load_ext terra_bc``: the hook on for cells, loop and function units on, and the
    ``%%terra_bc`` cell magic.  IPython is imported here, never by ``import terra_bc``."""
    from . import ipython
    ipython.load_ipython_extension(shell)


def unload_ipython_extension(shell):
    from . import ipython
    ipython.unload_ipython_extension(shell)
