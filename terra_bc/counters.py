"""Every counter terra_bc keeps, in one registry: ``terra_bc.stats()`` reads it.

Python code counts into ``counts``; the C extension keeps the counters of its hot paths
(sites run, frames swapped, ops skipped and feeds bound on the fast path) in C and
``snapshot`` adds them in.  ``reset`` zeroes both.
"""
from __future__ import annotations

from collections import Counter

from . import _hook

counts = Counter()

# Keys always present in stats(), by the stage that counts them.
FRAME_KEYS = ("code_objects_rewritten", "code_objects_refused", "code_objects_left_alone",
              "call_sites_rewritten", "code_objects_reverted")
RUNTIME_KEYS = ("iterations_traced", "iterations_coexecuted", "divergences", "eager_fallbacks",
                "compiles", "segments_launched", "fetches", "feeds", "ops_skipped",
                "ops_traced", "ops_eager", "paths_recorded", "trace_launches",
                "compiles_background", "compiles_skipped", "segments_eager", "early_launches",
                "early_launches_dropped", "buffers_donated", "shapes_reused", "bodies_traced", "bodies_untraced",
                "vmaps_recorded", "calls_idle")
# Floats, rounded to ms: compile time (any thread), and time Python was blocked by compiles.
SECONDS_KEYS = ("compile_seconds", "compile_wait_seconds")


def snapshot() -> dict:
    """Every counter now, as a plain dict (C's included)."""
    out = {k: counts[k] for k in FRAME_KEYS}
    out.update(_hook.counters())  # sites_executed, frames_swapped
    out.update({k: counts[k] for k in RUNTIME_KEYS})
    skipped, feeds = _hook.fast_counters()  # ops skipped in C count as skipped ops
    out["ops_skipped"] += skipped
    out["feeds"] += feeds
    out.update({k: round(counts[k], 3) for k in SECONDS_KEYS})
    return out


def reset():
    counts.clear()
    # Every key present: ``counts[k] += 1`` on an existing key runs no Python code between
    # its read and its write, so threads counting at once lose no count (a missing key calls
    # Counter.__missing__, where another thread may run).
    counts.update(dict.fromkeys(FRAME_KEYS + RUNTIME_KEYS + SECONDS_KEYS, 0))
    _hook.reset_counters()


counts.update(dict.fromkeys(FRAME_KEYS + RUNTIME_KEYS + SECONDS_KEYS, 0))
