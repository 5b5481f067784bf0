"""Stage 1 of the pipeline: which frames run rewritten code.

The C hook (``_hook.c``) asks ``transform(code)`` once per code object and caches the answer
on the code object; everything decided here is plain Python.  Errors never reach the user's
program: a code object we cannot rewrite runs as it is, and the reason is logged once.
"""
from __future__ import annotations

import logging
import threading
import weakref
from inspect import CO_OPTIMIZED

from . import _hook, scope
from .counters import counts
from .rewrite import UNTOUCHED_FLAGS, Unsupported, rewrite

log = logging.getLogger("terra_bc")

PACKAGE_DIR = scope.PACKAGE_DIR
SCOPES = ("user", "all")

_rewritten = weakref.WeakSet()  # code objects we made: never rewrite them again
_library_sites = weakref.WeakKeyDictionary()  # library code -> its rewritten code's sites
_state = threading.local()
_scope = "user"


def in_scope(code, scope_name):
    """Is ``code`` eligible for rewriting under ``scope_name`` (``scope.py`` decides)?  An
    installed library's module and class bodies are not: they run once, when the module is imported
    or the class made, and a library's code never becomes a unit, so routing their calls
    changes nothing; rewriting them was most of what importing optax, flax and equinox cost
    under terra_bc (~2.6 s of ~4 s extra, 231 module bodies)."""
    if code in _rewritten or (not code.co_flags & CO_OPTIMIZED and scope.in_package(code.co_filename)):
        return False
    return scope.in_scope(code.co_filename, scope_name)


def runs_rewritten(code):
    """Will ``code`` run rewritten (its DL-op calls routed) when called in a thread with the
    hook enabled?  True for code terra_bc made and for code in the current scope."""
    return code in _rewritten or (not code.co_flags & UNTOUCHED_FLAGS and in_scope(code, _scope))


def transform(code):
    """The rewritten code for ``code``, or None to leave it alone.  Never raises."""
    try:
        if code.co_flags & UNTOUCHED_FLAGS or not in_scope(code, _scope):
            counts["code_objects_left_alone"] += 1
            return None
        library = scope.is_library(code.co_filename)  # (no loop marks; maybe reverted later)
        result = rewrite(code, loops=not library)
    except Unsupported as e:
        counts["code_objects_refused"] += 1
        log.debug("terra_bc leaves %s (%s:%d) unmodified: %s",
                  code.co_qualname, code.co_filename, code.co_firstlineno, e)
        return None
    except Exception:  # a bug of ours must never break the user's program
        counts["code_objects_refused"] += 1
        log.warning("terra_bc could not rewrite %s (%s:%d); it runs unmodified",
                    code.co_qualname, code.co_filename, code.co_firstlineno, exc_info=True)
        return None
    if result is None:
        counts["code_objects_left_alone"] += 1
        return None
    _rewritten.add(result.code)
    if library:
        _library_sites[code] = result.sites
    counts["code_objects_rewritten"] += 1
    counts["call_sites_rewritten"] += len(result.sites)
    return result.code


_hook.set_callback(transform)


def revert_unrouted(min_runs):
    """Library code that has run ``min_runs`` times or more (its busiest site's count)
    without one of its sites calling a DL op runs its original code from now on: a library's
    pure-Python machinery (Flax NNX's graph split and merge, Equinox's filtering) paid the
    rewritten call's cost on every call (1.5-2x on call-heavy Python) for nothing.  The
    functions it calls keep their own rewritten code, so their DL ops are still routed.
    Code whose sites did call one is never checked again.  A DL op that reverted code calls
    later is JAX's own call: on a placeholder it fetches the value (correct, not skipped).
    Returns how many code objects were reverted.  Never raises: a failure here leaves the
    rest rewritten, logged once."""
    reverted = 0
    try:
        for code, sites in list(_library_sites.items()):
            if any(site.dl_count for site in sites):
                del _library_sites[code]
            elif max((site.count for site in sites), default=0) >= min_runs:
                _hook.revert(code)
                del _library_sites[code]
                reverted += 1
    except Exception:  # a bug of ours must never break the user's program
        log.warning("terra_bc could not revert library code; it stays rewritten", exc_info=True)
        _library_sites.clear()
    counts["code_objects_reverted"] += reverted
    return reverted


def set_scope(name):
    """Choose the scope for code objects not yet seen (decisions are cached per code)."""
    global _scope
    if name not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {name!r}")
    _scope = name


def enable(threads=False):
    """Run rewritten code in the calling thread's frames from now on.  ``threads``: in every
    thread that has not chosen itself (never called ``enable``/``disable``) too, running
    ones from their next frame on and threads started later (``python -m terra_bc``)."""
    _hook.enable_thread()
    if threads:
        _hook.set_default(True)


def disable(threads=False):
    """Stop rewriting in the calling thread; ``threads``: in the threads that follow the
    default too.  The hook is uninstalled once no thread uses it."""
    _hook.disable_thread()
    if threads:
        _hook.set_default(False)


def enabled():
    return _hook.thread_enabled()


def rewrite_function(fn):
    """A copy of ``fn`` whose own code is rewritten (``fn`` itself if that is not possible)."""
    new_code = transform(fn.__code__) if in_scope(fn.__code__, "all") else None
    if new_code is None:
        return fn
    new = type(fn)(new_code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__module__ = fn.__module__
    new.__annotations__ = fn.__annotations__
    new.__dict__.update(fn.__dict__)
    new.__wrapped__ = fn
    return new
