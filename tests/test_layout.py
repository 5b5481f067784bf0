"""The runtime package's structure: one-way imports between its modules, short functions.

The order is the one ``terra_bc/runtime/__init__.py`` documents: each module may import
only modules listed before it, so there are no cycles and a module can be read knowing only
what comes before it."""
import ast
import pathlib

import terra_bc.runtime

RUNTIME = pathlib.Path(terra_bc.runtime.__file__).parent
ORDER = ["settings", "context", "trace_rules", "placeholders", "values", "events", "guards", "bodies",
         "paths", "journal", "timeline", "pacing", "compiling", "launching", "coexecution", "tracing",
         "iteration", "autodiff", "vmapping", "units",
         "discovery", "dispatch", "tools", "report", "diff", "explain"]
MAX_FUNCTION_LINES = 60


def _runtime_imports(tree):
    """Names of the runtime's own modules a module imports (``from . import x``,
    ``from .x import y``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_every_module_is_in_the_documented_order():
    modules = {p.stem for p in RUNTIME.glob("*.py")} - {"__init__"}
    assert modules == set(ORDER)
    listed = [line.split()[0] for line in terra_bc.runtime.__doc__.splitlines()
              if line.startswith("  ") and line.split()[0] in modules]
    assert listed == ORDER


def test_imports_go_one_way():
    for i, name in enumerate(ORDER):
        tree = ast.parse((RUNTIME / f"{name}.py").read_text())
        later = _runtime_imports(tree) - set(ORDER[:i])
        assert not later, f"runtime/{name}.py imports {sorted(later)}, listed after it"


def test_functions_are_short():
    long = []
    for path in RUNTIME.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, long
