import pytest

import terra_bc
from terra_bc import _hook, jaxpr_builder
from terra_bc.runtime import compiling, context

EVAL_TRACE = jaxpr_builder.current_trace()  # (JAX's eager trace: none other is current between tests)


@pytest.fixture(autouse=True)
def hook_off_after_test():
    """Each test starts and ends with the hook disabled in this thread, and decides what to
    compile as a fresh process would (JAX's executables of earlier tests' operations stay,
    but their counts, and so each test's, would depend on the order tests run in)."""
    terra_bc.disable()
    terra_bc.set_scope("user")
    compiling.forget()
    yield
    terra_bc.disable()
    terra_bc.set_scope("user")
    assert not _hook.installed(), "a test left the frame hook installed"
    left = left_open()
    if left:  # (put right, so that one test's failure is not every later test's)
        _hook.set_iteration(None)
        _hook.set_thread_routing(False)
        context.thread.loop, context.thread.opaque = None, 0
        jaxpr_builder.set_trace(EVAL_TRACE)
    assert not left, f"a test left this thread inside an iteration: {left}"


def left_open():
    """What of an iteration is still open in this thread (none outside the tests' own)."""
    return [what for what, is_open in (
        ("an open iteration", _hook.current_iteration() is not None),
        ("DL-op calls routed", _hook.thread_routing()),
        ("a loop unit's turn", context.thread.loop is not None),
        ("an eager op outside iterations", context.thread.opaque != 0),
        ("a JAX trace other than the eager one", jaxpr_builder.current_trace() is not EVAL_TRACE))
        if is_open]


@pytest.fixture
def loop_units_on():
    """Loop units on and counters zeroed for the test; loop units off after it."""
    terra_bc.set_loops(True)
    terra_bc.reset_stats()
    yield
    terra_bc.set_loops(False)


def swapped(fn):
    """The code terra_bc runs in place of fn.__code__ (None if left alone, ... if undecided)."""
    return _hook.cached_decision(fn.__code__)


def on_and_off(fn, *args, **kwargs):
    """fn's result without and with the hook; asserts fn really ran rewritten code."""
    plain = fn(*args, **kwargs)
    before = terra_bc.stats()["sites_executed"]
    with terra_bc.enabled():
        hooked = fn(*args, **kwargs)
    assert terra_bc.stats()["sites_executed"] > before, "no rewritten call site ran"
    return plain, hooked
