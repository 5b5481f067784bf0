"""The frame hook and the rewritten call sites keep Python's semantics exactly."""
import gc
import inspect
import sys
import threading
import traceback
import types
import weakref

import pytest

import terra_bc
from terra_bc import _hook
from conftest import on_and_off, swapped


def helper(x, y=2):
    return x * y


def test_rewritten_code_runs_in_place_of_the_original():
    def f(x):
        return helper(x), sys._getframe().f_code
    plain, hooked = on_and_off(f, 3)
    assert plain[0] == hooked[0] == 6
    assert plain[1] is f.__code__
    assert hooked[1] is swapped(f) and hooked[1] is not f.__code__
    assert hooked[1].co_name == "f" and hooked[1].co_filename == f.__code__.co_filename


def test_closures_cells_and_nonlocal():
    def outer(n):
        total = 0
        def add(k):
            nonlocal total
            total += helper(k, 1)
            return total
        for i in range(n):
            add(i)
        return total, add(100), [c.cell_contents for c in add.__closure__]
    plain, hooked = on_and_off(outer, 5)
    assert plain == hooked == (10, 110, [110])


class Base:
    def greet(self, who):
        return f"base {who}"


class Child(Base):
    def greet(self, who):
        return "child+" + super().greet(who.upper())

    @classmethod
    def make(cls):
        return cls()

    @staticmethod
    def twice(x):
        return helper(x)


def test_zero_argument_super_classmethod_staticmethod():
    def f():
        c = Child.make()
        return c.greet("ann"), Child.twice(4), super(Child, c).greet("x")
    plain, hooked = on_and_off(f)
    assert plain == hooked == ("child+base ANN", 8, "base x")


def test_arguments_of_every_kind():
    def g(a, b=1, /, c=2, *args, d, e=5, **kw):
        return (a, b, c, args, d, e, sorted(kw.items()))
    def f():
        return [g(1, d=4), g(1, 2, 3, 4, 5, d=6, z=7), g(*[1, 2], **{"d": 3, "y": 0}),
                g(1, *(2, 3), d=1, **{"q": 2}), helper(*[3]), helper(**{"x": 2, "y": 5})]
    plain, hooked = on_and_off(f)
    assert plain == hooked


def test_argument_errors_are_the_same():
    def f(call):
        try:
            call()
        except TypeError as e:
            return str(e)
    cases = [lambda: helper(), lambda: helper(1, 2, 3), lambda: helper(1, z=2),
             lambda: helper(*1), lambda: helper(**1), lambda: len(1, 2)]
    for case in cases:
        plain, hooked = on_and_off(f, case)
        assert plain == hooked and plain


def test_nested_functions_lambdas_comprehensions_generators():
    def f(xs):
        sq = lambda v: helper(v, v)
        def inner(v):
            return [sq(w) for w in range(v)]
        gen = (helper(x) for x in xs)
        return ([inner(x) for x in xs], {x: sq(x) for x in xs}, {sq(x) for x in xs},
                list(gen), sum(helper(x) for x in xs))
    plain, hooked = on_and_off(f, [1, 2, 3])
    assert plain == hooked


def test_generators_are_rewritten_and_coroutines_left_alone():
    def gen(n):
        for i in range(n):
            yield helper(i)
    async def coro():
        return helper(2)
    def f():
        g = gen(3)
        out = [g.gi_code is gen.__code__ or g.gi_code.co_name == "gen"] + list(g)
        c = coro()
        try:
            c.send(None)
        except StopIteration as e:
            out.append(e.value)
        return out
    plain, hooked = on_and_off(f)
    assert plain == hooked == [True, 0, 2, 4, 4]
    assert swapped(gen) not in (None, Ellipsis)   # its call sites are rewritten
    assert swapped(coro) is Ellipsis  # never even asked


def test_generator_throw_and_close():
    def gen():
        try:
            yield 1
        except KeyError:
            yield helper(2)
        finally:
            log.append("closed")
    log = []
    def f():
        g = gen()
        a = next(g)
        b = g.throw(KeyError())
        g.close()
        return a, b
    plain, hooked = on_and_off(f)
    assert plain == hooked == (1, 4) and log == ["closed", "closed"]


def test_class_bodies_and_decorators():
    def deco(tag):
        def wrap(fn):
            def inner(*a, **k):
                return (tag, fn(*a, **k))
            return inner
        return wrap
    def f():
        class K:
            scale = helper(3)
            @deco("m")
            def m(self, x):
                return helper(x, self.scale)
            @property
            def p(self):
                return helper(self.scale)
        k = K()
        return K.scale, k.m(2), k.p, K.__qualname__
    plain, hooked = on_and_off(f)
    assert plain == hooked == (6, ("m", 12), 12, "test_class_bodies_and_decorators.<locals>.f.<locals>.K")


def test_try_except_finally_and_with():
    events = []
    class Ctx:
        def __enter__(self):
            events.append("enter")
            return self
        def __exit__(self, *exc):
            events.append(("exit", exc[0].__name__ if exc[0] else None))
            return exc[0] is KeyError
    def f():
        out = []
        try:
            helper(1) / 0
        except ZeroDivisionError as e:
            out.append(type(e).__name__)
            try:
                raise ValueError("inner")
            except ValueError:
                out.append(helper(1))
            finally:
                out.append("finally")
        with Ctx():
            out.append(helper(5))
        with Ctx():
            raise KeyError("swallowed")
        try:
            with Ctx():
                raise IndexError
        except IndexError:
            out.append("escaped")
        return out
    events.clear()
    plain = f()
    ev_plain = list(events)
    events.clear()
    with terra_bc.enabled():
        hooked = f()
    assert plain == hooked and events == ev_plain


def test_match_statement():
    def f(v):
        match v:
            case {"k": [x, *rest]} if helper(x) > 2:
                return ("dict", x, rest)
            case (a, b):
                return ("pair", helper(a, b))
            case Child():
                return "child"
            case str() as s:
                return s.upper()
            case _:
                return None
    values = [{"k": [2, 3]}, {"k": [1]}, (3, 4), Child(), "ab", 7]
    plain, hooked = on_and_off(lambda: [f(v) for v in values])
    assert plain == hooked


def test_recursion_and_recursion_limit():
    def fact(n):
        return 1 if n <= 1 else n * fact(n - 1)
    def depth(d=0):
        try:
            return depth(d + 1)
        except RecursionError:
            return d
    plain, hooked = on_and_off(fact, 30)
    assert plain == hooked
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(200)
    try:
        plain, hooked = on_and_off(depth)
    finally:
        sys.setrecursionlimit(old)
    assert plain == hooked  # no extra frame per call: the same depth is reached


def test_traceback_points_at_user_lines():
    def inner():
        return helper(None)  # TypeError inside helper
    def outer():
        return inner()
    def capture():
        try:
            outer()
        except TypeError as e:
            return [(fr.filename, fr.lineno, fr.name, fr.line) for fr in traceback.extract_tb(e.__traceback__)]
    plain, hooked = on_and_off(capture)
    assert plain == hooked
    assert [fr[2] for fr in hooked] == ["capture", "outer", "inner", "helper"]
    assert hooked[-2][3] == "return helper(None)  # TypeError inside helper"


def test_no_extra_frames_visible():
    def callee():
        return [(f.function, f.lineno) for f in inspect.stack()[:2]], sys._getframe(1).f_code.co_name
    def caller():
        return callee()
    plain, hooked = on_and_off(caller)
    assert plain == hooked


def test_frame_introspecting_builtins_see_the_caller():
    def f(a):
        b = a + 1
        return sorted(locals()), "f" in dir() or "a" in dir(), eval("a + b"), vars()["b"]
    plain, hooked = on_and_off(f, 1)
    assert plain == hooked


def test_two_threads_enable_is_per_thread():
    def f():
        return helper(2), sys._getframe().f_code is f.__code__
    results = {}
    def worker(name, enable):
        if enable:
            terra_bc.enable()
        try:
            results[name] = [f() for _ in range(50)]
        finally:
            terra_bc.disable()
    threads = [threading.Thread(target=worker, args=("on", True)),
               threading.Thread(target=worker, args=("off", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["on"] == [(4, False)] * 50  # ran the rewritten code
    assert results["off"] == [(4, True)] * 50   # the same function, original code
    assert not terra_bc.is_enabled()


def test_enable_disable_reenable_and_uninstall():
    def f():
        return sys._getframe().f_code is f.__code__
    assert not _hook.installed()
    terra_bc.enable()
    assert _hook.installed() and f() is False
    terra_bc.disable()
    assert not _hook.installed() and f() is True
    terra_bc.enable()
    terra_bc.enable()  # idempotent
    assert f() is False
    terra_bc.disable()
    assert not _hook.installed()
    with terra_bc.enabled():
        assert f() is False
        with terra_bc.enabled():
            pass
        assert _hook.installed()  # the inner block does not disable the outer one
    assert not _hook.installed()


def test_active_tracing_runs_original_code():
    def f():
        return sys._getframe().f_code is f.__code__
    seen = []
    def tracer(frame, event, arg):
        seen.append(event)
        return None
    with terra_bc.enabled():
        assert f() is False
        sys.settrace(tracer)
        try:
            traced = f()
        finally:
            sys.settrace(None)
        assert f() is False
    assert traced is True and seen


def test_intercepted_frames_leak_nothing():
    class Obj:
        pass
    def f(o, *args, **kw):
        local = [o, args, kw]
        return helper(len(local))
    def run(n, o):
        for _ in range(n):
            f(o, 1, 2, k=3)
    o = Obj()
    with terra_bc.enabled():
        run(10, o)  # warm up: decide and cache
        new_code = swapped(f)
        counts = (sys.getrefcount(o), sys.getrefcount(f.__code__), sys.getrefcount(new_code))
        run(1000, o)
        gc.collect()
        assert (sys.getrefcount(o), sys.getrefcount(f.__code__), sys.getrefcount(new_code)) == counts
        ref = weakref.ref(o)
    del o
    gc.collect()
    assert ref() is None


def test_rewritten_code_is_freed_with_its_original():
    ns = {}
    exec(compile("def temp(x):\n    return abs(x)\n", __file__, "exec"), ns)
    temp = ns.pop("temp")
    with terra_bc.enabled():
        assert temp(-2) == 2
    new_code = swapped(temp)
    assert isinstance(new_code, types.CodeType)
    ref = weakref.ref(new_code)
    del new_code, temp, ns
    gc.collect()
    assert ref() is None


def test_callback_is_never_reentered():
    depth = [0]
    maximum = [0]
    asked = []
    def inner_work():
        return helper(1)
    def callback(code):
        depth[0] += 1
        maximum[0] = max(maximum[0], depth[0])
        asked.append(code.co_name)
        inner_work()  # Python code run by the callback must not ask the callback again
        depth[0] -= 1
        return None
    def f():
        return helper(3)
    _hook.set_callback(callback)
    try:
        with terra_bc.enabled():
            f()
    finally:
        from terra_bc import frames
        _hook.set_callback(frames.transform)
    assert maximum[0] == 1 and "f" in asked and "inner_work" not in asked


def test_callback_errors_never_escape(monkeypatch, caplog):
    from terra_bc import frames
    def broken(code):
        raise RuntimeError("rewriter bug")
    monkeypatch.setattr(frames, "rewrite", broken)
    ns = {}
    exec(compile("def g(x):\n    return helper(x) + 1\n", __file__, "exec"), {"helper": helper}, ns)
    with caplog.at_level("WARNING", logger="terra_bc"):
        with terra_bc.enabled():
            assert ns["g"](1) == 3 and ns["g"](2) == 5
    assert swapped(ns["g"]) is None  # decided once: runs unmodified
    messages = [r.getMessage() for r in caplog.records if "could not rewrite g" in r.getMessage()]
    assert len(messages) == 1  # logged once


def test_function_decorator_rewrites_without_enable():
    @terra_bc.function
    def f(x, *, k=3):
        """doc"""
        return helper(x, k), sys._getframe().f_code is f.__wrapped__.__code__
    before = terra_bc.stats()["sites_executed"]
    assert f(2) == (6, False) and f(2, k=1) == (2, False)
    assert terra_bc.stats()["sites_executed"] >= before + 2
    assert f.__name__ == "f" and f.__doc__ == "doc"
    assert str(inspect.signature(f)) == "(x, *, k=3)"
    with terra_bc.enabled():
        assert f(1) == (3, False)
    assert swapped(f) is Ellipsis or swapped(f) is None  # never rewritten twice


def test_scopes():
    import json as stdlib_module
    from terra_bc import frames
    assert frames.in_scope(helper.__code__, "user")
    assert not frames.in_scope(stdlib_module.dumps.__code__, "user")
    assert frames.in_scope(stdlib_module.dumps.__code__, "all")
    assert not frames.in_scope(frames.transform.__code__, "all")
    assert not frames.in_scope(pytest.main.__code__, "user")  # site-packages
    assert frames.in_scope(compile("f()", "<stdin>", "exec"), "user")
    assert not frames.in_scope(compile("f()", "<string>", "exec"), "user")
    assert frames.in_scope(compile("f()", "<string>", "exec"), "all")
    with pytest.raises(ValueError):
        terra_bc.set_scope("everything")


def test_an_installed_librarys_module_and_class_bodies_are_left_alone():
    """They run once, at import or class creation, never inside a unit; its functions are
    rewritten.  Code from exec and the user's module bodies are as before."""
    import optax  # (a library in scope: its distribution requires jax)
    from terra_bc import frames
    assert not frames.in_scope(compile("x = 1", optax.__file__, "exec"), "user")
    assert not frames.in_scope(compile("x = 1", optax.__file__, "exec"), "all")
    assert frames.in_scope(optax.adam.__code__, "user")
    assert frames.in_scope(compile("f()", "<stdin>", "exec"), "user")
    assert frames.in_scope(compile("f()", "<string>", "exec"), "all")


def test_stats_keys():
    s = terra_bc.stats()
    for key in ("code_objects_rewritten", "sites_executed", "code_objects_refused",
                "code_objects_left_alone", "call_sites_rewritten", "frames_swapped"):
        assert isinstance(s[key], int)


def test_a_trace_function_never_sees_terra_bc_frames():
    """Debuggers and coverage (sys.settrace) see the user's frames only: under a trace
    function sites are plain calls and the runtime's own Python is not traced."""
    def traced_call():
        return helper(2, 3)

    def run():
        events = []

        def tracer(frame, event, arg):
            events.append((frame.f_code.co_filename, frame.f_code.co_name, event))
            return tracer
        sys.settrace(tracer)
        try:
            traced_call()
            len([1])
        finally:
            sys.settrace(None)
        return events
    plain = run()
    terra_bc.config(loops=True, functions=True)  # sites classify callees when these are on
    try:
        with terra_bc.enabled():
            hooked = run()
    finally:
        terra_bc.config(loops=False, functions=False)
    assert hooked == plain and plain
    assert not [e for e in hooked if "terra_bc" in e[0]]


def test_a_failure_while_reverting_library_code_stays_out_of_the_program(monkeypatch, caplog):
    """frames.revert_unrouted runs at the end of a user's iteration: whatever goes wrong
    in it is logged, and the library code stays rewritten (as transform's errors are)."""
    from terra_bc import _hook, frames

    def library_like(x):
        return len(x)

    def broken(code):
        raise RuntimeError("revert failed")

    saved = dict(frames._library_sites)  # (the library code this process rewrote so far)
    frames._library_sites.clear()
    try:
        frames._library_sites[library_like.__code__] = [_hook.Site(("lib.py", "f", 1, 0))]
        monkeypatch.setattr(frames._hook, "revert", broken)
        with caplog.at_level("WARNING", logger="terra_bc"):
            assert frames.revert_unrouted(0) == 0
        assert "could not revert library code" in caplog.text
        assert library_like.__code__ not in frames._library_sites
    finally:
        frames._library_sites.update(saved)
