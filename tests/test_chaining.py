"""terra_bc's hook chains to an eval-frame hook installed before it, and never clobbers one
installed after it."""
import pytest

import terra_bc
from terra_bc import _hook
from support.build import build_other_hook


@pytest.fixture(scope="module")
def other_hook(tmp_path_factory):
    module = build_other_hook(str(tmp_path_factory.mktemp("hook")))
    if module is None:
        pytest.skip("no C compiler to build the second hook")
    return module


def work(x):
    return abs(x) + len(str(x))


def test_chains_to_a_hook_installed_before(other_hook):
    other_hook.install()
    try:
        with terra_bc.enabled():
            before = other_hook.count()
            assert work(-5) == 7
            assert other_hook.count() > before  # frames still reach the earlier hook
            assert _hook.cached_decision(work.__code__) is not Ellipsis  # and ours decided
        assert other_hook.is_current()  # disable() put the earlier hook back
    finally:
        other_hook.uninstall()
    assert not _hook.installed()


def test_does_not_clobber_a_hook_installed_after(other_hook):
    terra_bc.enable()
    other_hook.install()  # chains to ours
    try:
        terra_bc.disable()
        assert other_hook.is_current()
        before = other_hook.count()
        assert work(3) == 4 and other_hook.count() > before
    finally:
        other_hook.uninstall()  # restores ours, which passes frames through while disabled
    assert work(3) == 4
    if _hook.installed():  # ours is back in place: it must pass through and may be removed
        terra_bc.enable()
        terra_bc.disable()
    assert not _hook.installed()
