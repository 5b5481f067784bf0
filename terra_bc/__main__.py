"""``python -m terra_bc [--scope user|all] [--include PKG] [--exclude PKG] [--stats] [--off] [--cache-dir DIR] (script.py | -m module) [args]``

Behaves as ``python script.py`` / ``python -m module`` would: same ``sys.argv``,
``sys.path[0]``, ``__main__`` module, exit codes and tracebacks (which start at the user's
code, not here), with the frame hook enabled unless ``--off`` (for A/B comparisons).
"""
from __future__ import annotations

import atexit
import builtins
import importlib.machinery
import io
import json
import os
import runpy
import signal
import sys
import threading
import types
import zipfile

USAGE = ("usage: python -m terra_bc [--scope user|all] [--include PKG] [--exclude PKG] [--stats] "
         "[--off] [--no-loops] [--no-functions] [--cache-dir DIR] (script.py | -m module) [args ...]")


def unit_switches():
    """(loops, functions): loop and function units are on unless TERRA_BC_LOOPS /
    TERRA_BC_FUNCTIONS is 0 (the command line's and ``terra_bc.auto``'s default)."""
    return (os.environ.get("TERRA_BC_LOOPS", "1") != "0",
            os.environ.get("TERRA_BC_FUNCTIONS", "1") != "0")


def parse(argv):
    loops, functions = unit_switches()
    opts = {"scope": "user", "stats": False, "off": False, "include": [], "exclude": [],
            "loops": loops, "functions": functions}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if arg == "--stats":
            opts["stats"] = True
        elif arg == "--off":
            opts["off"] = True
        elif arg in ("--loops", "--no-loops"):
            opts["loops"] = arg == "--loops"
        elif arg in ("--functions", "--no-functions"):
            opts["functions"] = arg == "--functions"
        elif arg.partition("=")[0] == "--cache-dir":
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += "=" not in arg
            if not value or value.startswith("-"):
                _usage_error("--cache-dir needs a folder")
            opts["cache_dir"] = value
        elif arg.partition("=")[0] in ("--scope", "--include", "--exclude"):
            name = arg.partition("=")[0][2:]
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += "=" not in arg
            if name == "scope":
                if value not in ("user", "all"):
                    _usage_error(f"--scope must be 'user' or 'all', not {value!r}")
                opts["scope"] = value
            elif not value or value.startswith("-"):
                _usage_error(f"--{name} needs a package name (a top-level import name)")
            else:
                opts[name].extend(v for v in value.split(",") if v)
        elif arg == "-m":
            if i + 1 >= len(argv):
                _usage_error("-m needs a module name")
            return opts, ("module", argv[i + 1]), argv[i + 2:]
        elif arg.startswith("-"):
            _usage_error(f"unknown option {arg!r}")
        else:
            return opts, ("script", arg), argv[i + 1:]
        i += 1
    _usage_error("no script or -m module given")


def _usage_error(message):
    print(f"{USAGE}\nterra_bc: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_script(path, args):
    """Run ``path`` as ``__main__`` the way the interpreter runs a script file."""
    try:
        with io.open_code(path) as f:
            source = f.read()
    except OSError as e:
        print(f"{sys.executable}: can't open file {os.path.abspath(path)!r}: [Errno {e.errno}] {e.strerror}",
              file=sys.stderr)
        sys.exit(2)
    sys.argv[:] = [path, *args]
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    # (CPython makes the script's __file__, and so its tracebacks' file names, absolute)
    path = os.path.abspath(path)
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __cached__=None, __builtins__=builtins,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    sys.modules["__main__"] = main
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as e:  # (reported as the interpreter reports it: no frames of ours)
        e.__traceback__ = None
        sys.excepthook(type(e), e, None)
        sys.exit(1)
    return code, main.__dict__


def print_stats():
    import terra_bc
    print("terra_bc stats: " + json.dumps(terra_bc.stats(), sort_keys=True), file=sys.stderr, flush=True)


def _user_traceback(tb):
    """The traceback as if the user's code ran without terra_bc: its frames before the
    user's code are dropped, and so are the rest of its frames, except where terra_bc raised
    the exception itself (a bug report needs them: then only the frames marked
    ``__tracebackhide__``, the wrappers pytest and IPython hide, are dropped)."""
    from terra_bc.frames import PACKAGE_DIR
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    ours = [e.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR) for e in entries]
    first = ours.index(False) if False in ours else len(entries)
    raised_by_us = ours[-1] if ours else False
    kept = [e for e, mine in list(zip(entries, ours))[first:]
            if not mine or raised_by_us and not e.tb_frame.f_locals.get("__tracebackhide__")]
    for e, after in zip(kept, kept[1:] + [None]):
        e.tb_next = after
    return kept[0] if kept else None


def _thread_excepthook(hook):
    """``threading.excepthook`` showing a thread's uncaught exception as the main thread's
    is shown (``_user_traceback``: the program's frames, not terra_bc's)."""
    def excepthook(args):
        tb = args.exc_traceback
        if tb is not None and args.exc_value is not None:
            tb = _user_traceback(tb) or tb
            args.exc_value.__traceback__ = tb
            args = threading.ExceptHookArgs((args.exc_type, args.exc_value, tb, args.thread))
        return hook(args)
    return excepthook


def main(argv):
    opts, (kind, target), args = parse(argv)
    import terra_bc

    if opts["stats"]:
        atexit.register(print_stats)  # registered first, so it runs after the user's handlers
    terra_bc.set_scope(opts["scope"])
    if opts.get("cache_dir"):
        terra_bc.config(cache_dir=opts["cache_dir"])
    if opts["include"] or opts["exclude"]:
        terra_bc.config(include=sorted(terra_bc.config()["include"] + opts["include"]),
                        exclude=sorted(terra_bc.config()["exclude"] + opts["exclude"]))
    if kind == "script" and (os.path.isdir(target) or zipfile.is_zipfile(target)):
        # (a folder or zip archive with a __main__.py: the interpreter runs its __main__)
        kind, sys.argv[:] = "archive", [target, *args]
        sys.path[0] = os.path.abspath(target)
    elif kind == "script":
        code, namespace = run_script(target, args)
    else:
        sys.argv[:] = [target, *args]  # runpy puts the module's path in argv[0]
        sys.path[0] = os.getcwd()
    if not opts["off"]:
        terra_bc.set_loops(opts["loops"])
        terra_bc.set_functions(opts["functions"])
        terra_bc.enable(threads=True)  # (threads the program starts run with it too)
        threading.excepthook = _thread_excepthook(threading.excepthook)
    try:
        if kind == "script":
            exec(code, namespace)
        elif kind == "archive":
            runpy._run_module_as_main("__main__", alter_argv=False)
        else:
            runpy._run_module_as_main(target, alter_argv=True)
    except SystemExit:
        raise
    except BaseException as e:
        terra_bc.disable(threads=True)
        e.__traceback__ = _user_traceback(e.__traceback__) or e.__traceback__
        sys.excepthook(type(e), e, e.__traceback__)
        if isinstance(e, KeyboardInterrupt):
            # As the interpreter does: finish, then die of SIGINT so the parent sees it.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
