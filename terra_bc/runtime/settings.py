"""The runtime's settings and limits, in one place.

Each setting has an environment variable read at import and can be changed at run time with
``terra_bc.config(...)`` (docs/control-flow.md).  The constants below them are limits that
measurements chose; they are not meant to be tuned per program.
"""
from __future__ import annotations

import os


def env_int(name, default):
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ValueError(f"terra_bc: {name}={value!r} is not an integer") from None


settings = {
    "max_paths": env_int("TERRA_BC_MAX_PATHS", 16),     # recorded paths (variants) per unit
    "max_compiles": env_int("TERRA_BC_MAX_COMPILES", 32),  # segments compiled per unit
    "warmup": env_int("TERRA_BC_WARMUP", 0),            # first calls of a unit run plainly
    "inner_turns": env_int("TERRA_BC_INNER_TURNS", 16),  # see discovery.on_loop
    "dynamic_numbers": os.environ.get("TERRA_BC_DYNAMIC_NUMBERS", "1") != "0",
    # A traced iteration records ops abstractly and computes a value only when Python
    # reads it, by the segment co-execution will reuse (docs/whole-run.md).
    "abstract_tracing": os.environ.get("TERRA_BC_ABSTRACT_TRACING", "1") != "0",
    # A unit that traces eagerly-valued compiles a new segment on a worker thread once
    # running it eagerly has cost its expected compile time (runtime/compiling.py).
    "background_compile": os.environ.get("TERRA_BC_BACKGROUND_COMPILE", "1") != "0",
    # The segment a fetch needs is launched at the last op before it, so XLA runs it while
    # the Python between them does (coexecution.op).
    "early_launch": os.environ.get("TERRA_BC_EARLY_LAUNCH", "1") != "0",
    # A co-executed segment may reuse the buffers of inputs nothing reads afterwards (the
    # old parameters of `params = update(params, grads)`): launching.donatable.
    "donate": os.environ.get("TERRA_BC_DONATE", "1") != "0",
    # Library code whose calls never reached a DL op in its first runs runs its original
    # code from then on (frames.revert_unrouted).
    "revert_library_code": os.environ.get("TERRA_BC_REVERT_LIBRARY_CODE", "1") != "0",
    # Segments run op by op, one eager JAX dispatch an equation, never compiled: their
    # values are then eager JAX's to the bit wherever the recorded equations are the ones
    # eager JAX runs (a check of results, docs/reliability.md; far slower).
    "op_by_op": os.environ.get("TERRA_BC_OP_BY_OP", "0") == "1",
    # Compiled segments persist in JAX's compilation cache there ("": not kept).
    "cache_dir": os.environ.get("TERRA_BC_CACHE_DIR", ""),
    # What the "terra_bc" logger says, one line each (journal.py): a comma-separated list
    # of LOG_CATEGORIES, or "all"; "" logs nothing.
    "log": os.environ.get("TERRA_BC_LOG", ""),
}
LOG_CATEGORIES = ("divergences", "compiles", "fallbacks", "fetches")

RETRACE_WINDOW = 8     # a unit that traced a new path in each of its last 8 calls is frozen
MIN_UNIT_OPS = 4       # a function unit recording fewer DL ops costs more than it saves
# A unit none of whose paths records an equation (each DL op runs eagerly: a step the
# program jits itself) idles after this many such iterations: its calls run plainly for a
# span of calls (doubling from the first to the last), then one is an iteration again.
IDLE_AFTER = 3
IDLE_SPANS = (16, 4096)
# Library code is checked for reverting (frames.revert_unrouted) when the iterations ended
# in this process reach REVERT_FIRST, then each time they double; it needs this many runs.
REVERT_FIRST, REVERT_MIN_RUNS = 8, 8
LAZY_LAUNCHES = 6      # a traced iteration reading recorded values this often records eagerly
COMPILE_SECONDS_PER_EQUATION = 0.005  # expected compile time per equation until measured
COMPILE_SECONDS_MIN = 0.05   # ... and at least this (a 26-equation MLP step: 0.19 s, 2-core CPU)
EAGER_FIRST_RUN_SECONDS = 0.03  # an equation run eagerly a first time: its compile (measured)
BACKGROUND_SHARE = 0.5       # Python ran ~45% slower while a compile ran on the worker
DONATE_MIN_BYTES = 1 << 20  # a launch donates buffers only this large in all (one more compile)
IN_FLIGHT = 2  # unfinished launches where several devices run them (pacing.py; XLA:CPU hangs at 33)
MEMO_IDLE_TURNS = 4  # iterations eval_shape's shapes stay remembered unasked (Iteration.remember)
EARLY_LAUNCH_GAP_SECONDS = 0.0005  # Python work between an op and a read worth overlapping
DEVICE_NUMBERS = 4096  # fed Python numbers kept as device arrays (values.device_number)
NUMPY_COPY_MAX_BYTES = 1 << 16  # a fed NumPy array this small is copied, a larger one transferred
NUMPY_AVALS = 1024  # NumPy values' avals remembered (values.aval_of)


def update(changes):
    """Check and apply ``changes`` (setting name -> value); raise on a bad one."""
    unknown = set(changes) - set(settings)
    if unknown:
        raise TypeError(f"terra_bc.config: unknown setting(s) {sorted(unknown)}; "
                        f"known: {sorted(settings) + ['exclude', 'functions', 'include', 'loops']}")
    for name, value in changes.items():
        want = type(settings[name])
        if type(value) is not want or want is int and value < 0:
            kind = {int: "non-negative int", bool: "bool", str: "str (a folder, or '')"}[want]
            raise ValueError(f"terra_bc.config: {name} must be a {kind}, got {value!r}")
        if name == "log":
            unknown = {n.strip() for n in value.split(",") if n.strip()} - {*LOG_CATEGORIES, "all"}
            if unknown:
                raise ValueError(f"terra_bc.config: log takes {', '.join(LOG_CATEGORIES)} or all, "
                                 f"not {sorted(unknown)}")
        if name == "max_paths" and value < 1:
            raise ValueError("terra_bc.config: max_paths must be at least 1")
    settings.update(changes)
    if "cache_dir" in changes:
        use_cache_dir(settings["cache_dir"])


def use_cache_dir(path):
    """Keep compiled executables in JAX's persistent compilation cache at ``path`` (every
    size, every compile time): a later run of the same program loads its segments, which
    JAX keys by their HLO, the compile options and the jax/jaxlib versions.  It is JAX's
    cache, so the program's own jitted functions are kept there too."""
    if not path:
        return
    import jax  # (here: the settings module is read before JAX is needed)
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        try:  # JAX opens its cache once, at the first compile: open it again at `path`
            from jax._src import compilation_cache
            compilation_cache.reset_cache()
        except (ImportError, AttributeError):
            pass
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
