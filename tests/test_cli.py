"""`python -m terra_bc` behaves exactly like `python` for scripts and modules."""
import json
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import sys, os
    def work(n):
        return sum(abs(i - 2) for i in range(n)) + len(str(n))
    print("argv", sys.argv[1:], "name", __name__, "path0", sys.path[0] == os.path.dirname(os.path.realpath(__file__)))
    print("result", work(10))
    if __name__ == "__main__":
        mode = sys.argv[1] if len(sys.argv) > 1 else ""
        if mode == "exit":
            sys.exit(3)
        if mode == "exitmsg":
            sys.exit("bye")
        if mode == "raise":
            def inner():
                return {}["missing"]
            inner()
        if mode == "interrupt":
            raise KeyboardInterrupt
        if mode == "file":
            print("file", __file__, os.path.isabs(__file__), type(__loader__).__name__,
                  type(__builtins__).__name__)
''')


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "prog.py"
    path.write_text(SCRIPT)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(SCRIPT)
    return path


def stats_of(stderr):
    lines = [l for l in stderr.splitlines() if l.startswith("terra_bc stats: ")]
    assert len(lines) == 1, stderr
    return json.loads(lines[0][len("terra_bc stats: "):])


def without_stats(stderr):
    return "\n".join(l for l in stderr.splitlines() if not l.startswith("terra_bc stats: "))


@pytest.mark.parametrize("mode", ["", "exit", "exitmsg", "raise", "interrupt"])
def test_script_behaves_like_python(script, mode):
    plain = run([str(script), mode, "x y"], cwd=script.parent)
    hooked = run(["-m", "terra_bc", "--stats", str(script), mode, "x y"], cwd=script.parent)
    assert hooked.returncode == plain.returncode
    assert hooked.stdout == plain.stdout
    assert without_stats(hooked.stderr) == plain.stderr.rstrip("\n")
    stats = stats_of(hooked.stderr)
    assert stats["code_objects_rewritten"] >= 2 and stats["sites_executed"] >= 5


@pytest.mark.parametrize("mode", ["file", "raise"])
def test_a_script_named_by_a_relative_path_behaves_like_python(script, mode):
    # __file__ and traceback file names absolute, as CPython makes them (since 3.9).
    plain = run([script.name, mode], cwd=script.parent)
    hooked = run(["-m", "terra_bc", script.name, mode], cwd=script.parent)
    assert hooked.returncode == plain.returncode
    assert hooked.stdout == plain.stdout
    assert hooked.stderr == plain.stderr


def test_a_syntax_error_is_reported_as_python_reports_it(tmp_path):
    (tmp_path / "bad.py").write_text("x = 1\ny = (1,\n")
    plain = run(["bad.py"], cwd=tmp_path)
    hooked = run(["-m", "terra_bc", "bad.py"], cwd=tmp_path)
    assert plain.returncode == hooked.returncode == 1
    assert hooked.stderr == plain.stderr
    assert "Traceback" not in hooked.stderr


@pytest.mark.parametrize("archive", [False, True])
def test_a_folder_or_zip_with_a_main_runs_as_python_runs_it(tmp_path, archive):
    app = tmp_path / "app"
    app.mkdir()
    (app / "__main__.py").write_text(SCRIPT)
    target = "app"
    if archive:
        import zipfile
        with zipfile.ZipFile(tmp_path / "app.zip", "w") as z:
            z.write(app / "__main__.py", "__main__.py")
        target = "app.zip"
    plain = run([target, "x"], cwd=tmp_path)
    hooked = run(["-m", "terra_bc", target, "x"], cwd=tmp_path)
    assert plain.returncode == hooked.returncode == 0, hooked.stderr
    assert hooked.stdout == plain.stdout and "result 33" in plain.stdout


def test_import_auto_gives_the_script_the_builtins_module(tmp_path):
    (tmp_path / "prog.py").write_text("import terra_bc.auto\n"
                                      "print(type(__builtins__).__name__, __builtins__.len([1, 2]))\n")
    out = run(["prog.py"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "module 2\n"


def test_expected_exit_codes(script):
    assert run([str(script), "exit"], script.parent).returncode == 3
    assert run([str(script), "raise"], script.parent).returncode == 1
    assert run([str(script), "interrupt"], script.parent).returncode == -signal.SIGINT


@pytest.mark.parametrize("mode", ["", "raise"])
def test_module_behaves_like_python_m(script, mode):
    env_cwd = script.parent
    plain = run(["-m", "pkg.mod", mode], cwd=env_cwd)
    hooked = run(["-m", "terra_bc", "--stats", "-m", "pkg.mod", mode], cwd=env_cwd)
    assert (hooked.returncode, hooked.stdout) == (plain.returncode, plain.stdout)
    assert without_stats(hooked.stderr) == plain.stderr.rstrip("\n")
    assert stats_of(hooked.stderr)["sites_executed"] > 0


def test_off_runs_without_rewriting(script):
    out = run(["-m", "terra_bc", "--off", "--stats", str(script)], cwd=script.parent)
    assert out.returncode == 0 and "result 33" in out.stdout
    assert stats_of(out.stderr)["code_objects_rewritten"] == 0


def test_scope_all_rewrites_library_code(script):
    user = stats_of(run(["-m", "terra_bc", "--stats", str(script)], script.parent).stderr)
    every = stats_of(run(["-m", "terra_bc", "--stats", "--scope", "all", str(script)], script.parent).stderr)
    assert every["code_objects_rewritten"] > user["code_objects_rewritten"]


def test_usage_errors(script):
    for args in (["--scope", "some"], ["--bogus", str(script)], [], ["-m"]):
        out = run(["-m", "terra_bc", *args], script.parent)
        assert out.returncode == 2 and "usage:" in out.stderr
    missing = run(["-m", "terra_bc", "nope.py"], script.parent)
    plain = run(["nope.py"], script.parent)
    assert missing.returncode == plain.returncode == 2 and "can't open file" in missing.stderr


def test_include_and_exclude_reach_the_scope_rules(tmp_path):
    """--include/--exclude (repeatable, comma-separated) decide for code not seen yet."""
    prog = tmp_path / "scoped.py"
    prog.write_text(textwrap.dedent('''
        import optax, pytest, terra_bc
        from terra_bc import scope
        print(sorted(terra_bc.config()["include"]), sorted(terra_bc.config()["exclude"]))
        print(scope.in_scope(optax.adam.__code__.co_filename, "user"),
              scope.in_scope(pytest.main.__code__.co_filename, "user"))
    '''))
    out = run(["-m", "terra_bc", "--exclude", "optax", "--include=pytest,_pytest", str(prog)],
              tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['_pytest', 'pytest'] ['optax']", "False True"]
    bad = run(["-m", "terra_bc", "--include", "--stats", str(prog)], tmp_path)
    assert bad.returncode == 2 and "--include needs a package name" in bad.stderr


def test_cache_dir_keeps_the_runs_executables(tmp_path):
    prog = tmp_path / "train.py"
    prog.write_text(
        "import jax.numpy as jnp\n"
        "w = jnp.ones((3, 3))\n"
        "for i in range(4):\n"
        "    w = jnp.tanh(w @ w) * 0.5 + 0.1\n"
        "print(float(jnp.sum(w)))\n")
    cache = tmp_path / "cache"
    first = run(["-m", "terra_bc", "--cache-dir", str(cache), str(prog)], tmp_path)
    assert first.returncode == 0, first.stderr
    kept = sorted(p.name for p in cache.iterdir())
    # (named after the loop unit, its path and range: the same each run)
    assert any("terra_bc__loop_at_train_py_3__p1__" in name for name in kept), kept
    again = run(["-m", "terra_bc", f"--cache-dir={cache}", str(prog)], tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == kept
    missing = run(["-m", "terra_bc", "--cache-dir"], tmp_path)  # no folder given
    assert missing.returncode == 2 and "--cache-dir needs a folder" in missing.stderr


def test_a_threads_uncaught_error_shows_the_programs_frames_not_ours(tmp_path):
    # (found by a hunt of entry points, 2026-12-01: threading.excepthook printed nine
    # terra_bc frames between the program's line and JAX's)
    (tmp_path / "prog.py").write_text(textwrap.dedent('''
        import threading
        import jax.numpy as jnp
        def work():
            w = jnp.ones(3)
            for i in range(5):
                w = w * 1.1
                if i == 3:
                    w = w @ jnp.ones((4, 4))
        t = threading.Thread(target=work)
        t.start()
        t.join()
        print("joined")
    '''))
    plain = run(["prog.py"], cwd=tmp_path)
    hooked = run(["-m", "terra_bc", "prog.py"], cwd=tmp_path)
    assert plain.returncode == hooked.returncode == 0
    assert hooked.stdout == plain.stdout == "joined\n"
    assert "terra_bc" not in hooked.stderr
    assert hooked.stderr == plain.stderr
