import pytest

import terra_bc
from terra_bc import _hook


@pytest.fixture(autouse=True)
def hook_off_after_test():
    """Each test starts and ends with the hook disabled in this thread."""
    terra_bc.disable()
    terra_bc.set_scope("user")
    yield
    terra_bc.disable()
    terra_bc.set_scope("user")
    assert not _hook.installed(), "a test left the frame hook installed"


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
