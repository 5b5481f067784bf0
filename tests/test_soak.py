"""Soak, CI-sized (issue 14 item 5; the long run is ``benchmarks/soak.py``, docs/reliability.md):
2,500 turns of the benchmark's multi-path loop unit under terra_bc, against the same program
run eagerly.  After warm-up no table of terra_bc's grows except up to its bound, the live
objects stay flat, and every checkpoint's values are eager's.  No timing is asserted."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import soak  # noqa: E402
from terra_bc.runtime import journal, timeline, values  # noqa: E402
from terra_bc.runtime.settings import DEVICE_NUMBERS, IN_FLIGHT  # noqa: E402

ITERATIONS, EVERY = 2500, 100
LATE = 1500        # by then the unit has recorded all of the program's paths (below)
PATHS = 5          # A, B, C; and B, C on a checkpoint turn (its fetches are events too)
# Tables with a bound of their own (they may grow and shrink after warm-up, up to it).
BOUNDS = {"device_numbers": DEVICE_NUMBERS, "params_memo": 20_001,
          "timeline": timeline.RING_SIZE, "journal": journal.JOURNAL_SIZE,
          "in_flight": IN_FLIGHT}
# Between the checkpoints at LATE and ITERATIONS (1,000 turns): how much the number of live
# objects the collector tracks, and the allocated memory blocks, may grow.  Measured: +1
# object, +17 to +22 blocks (CPython 3.11, 3.12, 3.13).  A leak of one per turn is 1,000.
OBJECTS_SLACK, BLOCKS_SLACK = 100, 300


def settled_checkpoints():
    """Checkpoints that first empty the one cache made to fill up to its bound while the
    program runs (``values._device_numbers``: the Python float fed every turn is a new
    number each turn, ~3 blocks an entry, cleared at DEVICE_NUMBERS), so that the blocks
    counted are what is left.  Its bound is checked on its own (``caches``, recorded before
    the clear: the checkpoint's own record is made first)."""
    checkpoints = soak.Checkpoints(under_terra_bc=True)

    def checkpoint(step, values_now, state):
        sizes = len(values._device_numbers)
        values._device_numbers.clear()
        checkpoints(step, values_now, state)
        record = json.loads(checkpoints.records[-1])
        record["caches"]["device_numbers"] = sizes
        checkpoints.records[-1] = json.dumps(record)
    return checkpoints, checkpoint


def run_soak():
    import terra_bc
    checkpoints, checkpoint = settled_checkpoints()
    terra_bc.enable(loops=True)
    try:
        soak.multipath(ITERATIONS, checkpoint, EVERY)
    finally:
        terra_bc.disable()
        terra_bc.set_loops(False)
    return checkpoints.results()


def test_multipath_soak_is_flat_bounded_and_eager():
    eager = soak.run("multipath", ITERATIONS, EVERY, under_terra_bc=False)
    import terra_bc
    terra_bc.reset_stats()
    got = run_soak()
    by_step = {r["step"]: r for r in got}
    late, last = by_step[LATE], by_step[ITERATIONS]

    # the same numbers as eager at every checkpoint (branch counts exactly)
    worst, bad = soak.compare(got, eager)
    assert not bad, bad
    assert len(got) == len(eager) == ITERATIONS // EVERY

    # it co-executed (and did not fall back): otherwise nothing here tests terra_bc
    stats = last["stats"]
    assert stats["iterations_coexecuted"] >= ITERATIONS - 10, stats
    assert stats["eager_fallbacks"] == 0, stats

    # after warm-up the unit knows every path: no table grows, bounded ones stay in bounds
    assert late["caches"]["units"] == 1 and late["caches"]["paths"] == PATHS, late["caches"]
    for record in got:
        for name, bound in BOUNDS.items():
            assert record["caches"][name] <= bound, (record["step"], name, record["caches"][name])
    grown = {k: (v, last["caches"][k]) for k, v in late["caches"].items()
             if k not in BOUNDS and last["caches"][k] > v}
    assert not grown, grown

    # live objects and memory blocks flat between two late checkpoints
    assert last["objects"] - late["objects"] <= OBJECTS_SLACK, (late["objects"], last["objects"])
    assert last["blocks"] - late["blocks"] <= BLOCKS_SLACK, (late["blocks"], last["blocks"])


def test_compare_flags_a_checkpoint_that_is_not_eagers():
    """The check above can fail: a float off by 1e-3 relative, a branch count off by one, a
    missing checkpoint are each reported."""
    want = [{"step": 100, "values": {"loss": 1.0, "taken": [20, 30, 50]}},
            {"step": 200, "values": {"loss": 2.0, "taken": [40, 60, 100]}}]
    assert soak.compare(want, want) == (0.0, [])
    off = [{"step": 100, "values": {"loss": 1.001, "taken": [20, 30, 50]}},
           {"step": 200, "values": {"loss": 2.0, "taken": [40, 61, 99]}}]
    _, bad = soak.compare(off, want)
    assert len(bad) == 3, bad
    _, bad = soak.compare(want[:1], want)
    assert bad == ["no checkpoint at step 200"]


def test_slope_is_per_ten_thousand_iterations_after_warmup():
    records = [{"step": s, "rss_mib": 100.0 + (s if s > 1000 else 50) * 1e-3} for s in
               range(500, 5001, 500)]
    assert soak.slope_per_10k(records, "rss_mib", warmup=1000) == 10.0
    assert soak.slope_per_10k(records[:3], "rss_mib", warmup=1000) is None
