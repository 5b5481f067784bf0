"""CPython's own regression tests pass under `python -m terra_bc --scope all` as without it."""
import json
import re
import signal
import subprocess
import sys

import pytest

MODULES = ["test_grammar", "test_scope", "test_exceptions", "test_generators", "test_with",
           "test_contextlib", "test_class", "test_unpack", "test_listcomps", "test_genexps",
           "test_raise", "test_super", "test_keywordonlyarg", "test_positional_only_arg",
           "test_dataclasses", "test_functools", "test_coroutines", "test_patma"]


def _has_cpython_tests():
    try:
        import test.libregrtest  # noqa: F401
        import test.test_grammar  # noqa: F401
    except ImportError:
        return False
    return True


def regrtest(prefix):
    # One process, sequentially: worker processes (-j) would not run under the hook.
    # (SIGINT at its default in the child: a suite started in the background of a
    # non-interactive shell inherits it ignored, and CPython's test_generators then fails
    # its KeyboardInterrupt test in the plain run as in the hooked one)
    out = subprocess.run([sys.executable, *prefix, "-m", "test", "-r", "--randseed", "1", *MODULES],
                         capture_output=True, text=True, timeout=900,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return out.returncode, out.stdout + out.stderr


def summary(output):
    """What regrtest concluded: the result line, test counts and failing modules."""
    result = re.search(r"^Result: (\w+)", output, re.M)
    total = re.search(r"^Total tests: (.*)$", output, re.M)
    failed = re.findall(r"^test (test_\w+) failed", output, re.M)
    return result and result.group(1), total and total.group(1), sorted(failed)


@pytest.mark.skipif(not _has_cpython_tests(),
                    reason=f"this interpreter ({sys.executable}) lacks CPython's test package")
def test_cpython_regression_modules_pass_under_the_hook():
    plain_rc, plain = regrtest([])
    hooked_rc, hooked = regrtest(["-m", "terra_bc", "--scope", "all", "--stats"])
    assert summary(hooked) == summary(plain), hooked[-3000:]
    assert hooked_rc == plain_rc
    assert summary(plain)[0] == "SUCCESS", plain[-3000:]
    stats = json.loads(re.search(r"^terra_bc stats: (\{.*\})$", hooked, re.M).group(1))
    # The modules really ran rewritten: thousands of code objects, a million site calls.
    assert stats["code_objects_rewritten"] > 2000, stats
    assert stats["sites_executed"] > 500_000, stats
    assert stats["code_objects_refused"] <= stats["code_objects_rewritten"] // 100, stats
    assert "could not rewrite" not in hooked
