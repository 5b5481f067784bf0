#!/usr/bin/env bash
# Wider CPython conformance sweep than tests/test_conformance.py (too slow for CI):
# each module with and without `python -m terra_bc --scope all`, one line per module.
#   tests/support/broad_conformance.sh PYTHON [MODULE ...]
PY=${1:?usage: broad_conformance.sh PYTHON [MODULE ...]}; shift
MODS=${*:-"test_sys test_inspect test_traceback test_threading test_weakref test_gc test_descr
test_property test_decorators test_funcattrs test_dict test_list test_set test_iter test_itertools
test_collections test_enum test_typing test_abc test_json test_re test_string test_format
test_fstring test_copy test_pickle test_operator test_builtin test_compile test_exception_group
test_except_star test_sort test_bisect test_heapq test_math test_statistics test_fractions
test_decimal test_random test_unittest test_logging test_argparse test_textwrap test_context
test_asyncio.test_tasks test_frame test_sys_settrace test_call test_extcall test_opcodes
test_named_expressions test_types"}
summary() { grep -E "^Result:|^Total tests:" | tr '\n' ' '; }
for m in $MODS; do
    plain=$(timeout 600 "$PY" -m test "$m" 2>&1 | summary)
    hooked=$(timeout 900 "$PY" -m terra_bc --scope all -m test "$m" 2>&1 | summary)
    [ "$plain" = "$hooked" ] && verdict=same || verdict=DIFFERENT
    echo "$verdict  $m | plain: $plain | terra_bc: $hooked"
done
