"""Which code is rewritten: the user's code and the libraries that compute with JAX.

One table-driven decision, per top-level package, cached (as TorchDynamo keeps
``trace_rules.py``).  A code object's file is

* **terra_bc's own**, JAX's (``jax``, ``jaxlib``) or the standard library's: never rewritten
  (``--scope all`` rewrites the standard library too, never JAX or terra_bc);
* **user code**: a file that no installed distribution owns (the script, its own modules, a
  project installed in editable mode, typed-in code) — rewritten, and its loops and
  functions may become units;
* **library code**: a package an installed distribution owns (under the site directories,
  or installed elsewhere with its metadata beside it: ``pip install --target``,
  ``PYTHONPATH``).  Rewritten when the package computes with JAX: its distribution requires
  ``jax`` (not only as an extra), or it is in ``JAX_LIBRARIES``, or the user included it;
  never when it is in ``NEVER`` or the user excluded it.  A library's call sites route DL
  ops like the user's, but its loops and functions never become units: they are part of the
  user's iteration that calls them.

Users widen or narrow the rule with ``--include PKG`` / ``--exclude PKG``,
``terra_bc.config(include=[...], exclude=[...])`` or ``TERRA_BC_INCLUDE`` /
``TERRA_BC_EXCLUDE`` (comma-separated top-level package names).
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import sysconfig

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
USER, LIBRARY, NEVER_REWRITTEN = "user", "library", "never"

# Never rewritten: JAX itself (rewriting its internals breaks its own tracing), terra_bc,
# array libraries whose Python is not JAX code, and the packaging tools whose import hooks
# run at any import (asking whether they require jax would read every distribution's
# metadata, ~10 ms, in the middle of a first step).
NEVER = frozenset({"jax", "jaxlib", "jax_plugins", "terra_bc", "numpy", "scipy", "ml_dtypes",
                   "opt_einsum", "_distutils_hack", "setuptools", "pkg_resources", "pip",
                   "_virtualenv"})
ALWAYS_OUT = frozenset({"jax", "jaxlib", "jax_plugins", "terra_bc"})  # even under --scope all
# Libraries that compute with JAX but do not list it as a plain requirement.
JAX_LIBRARIES = frozenset({"haiku", "chex", "distrax", "rlax", "jraph", "jmp", "optax", "flax",
                           "equinox"})
INTERACTIVE_FILES = ("<stdin>", "<ipython-input-")


def _names(value):
    return {name.strip() for name in (value or "").split(",") if name.strip()}


included = _names(os.environ.get("TERRA_BC_INCLUDE"))
excluded = _names(os.environ.get("TERRA_BC_EXCLUDE"))


def _stdlib_dirs():
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib") if k in paths)


def _site_dirs():
    import site
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("purelib", "platlib") if k in paths}
    dirs.update(getattr(site, "getsitepackages", lambda: [])())
    dirs.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


STDLIB_DIRS = _stdlib_dirs()
SITE_DIRS = _site_dirs()
_by_dir = {}          # directory -> (kind, top-level package)
_by_file = {}         # file name -> the same (classify runs at every routed Python call)
_wants_jax = {}       # top-level package -> does its distribution require jax?
_distributions = None  # top-level package -> distribution names (read once)


def set_lists(include=None, exclude=None):
    """Replace the user's include / exclude lists (top-level package names); decisions
    already cached on code objects stay as they were."""
    global included, excluded
    if include is not None:
        included = set(include)
    if exclude is not None:
        excluded = set(exclude)
    return sorted(included), sorted(excluded)


def classify(filename):
    """(kind, top-level package) of the file a code object comes from: kind is USER,
    LIBRARY or NEVER_REWRITTEN."""
    found = _by_file.get(filename)
    if found is not None:
        return found
    if filename.startswith("<"):
        # Typed-in code is the user's; other pseudo-files (<string> from exec, dataclass and
        # namedtuple methods, <frozen ...>) belong to libraries, which we cannot name.
        return (USER, None) if filename.startswith(INTERACTIVE_FILES) else (LIBRARY, None)
    directory = os.path.dirname(filename)
    found = _by_dir.get(directory)
    if found is None:
        found = _by_dir[directory] = _classify_dir(os.path.realpath(directory) + os.sep)
    _by_file[filename] = found
    return found


def _classify_dir(real):
    if real.startswith(PACKAGE_DIR):
        return NEVER_REWRITTEN, "terra_bc"
    under_site = real.startswith(SITE_DIRS)
    if real.startswith(STDLIB_DIRS) and not under_site:
        return NEVER_REWRITTEN, None
    entry, top = _top_level(real)
    if under_site or (top is not None and _installed_beside(entry, top)):
        return LIBRARY, top
    return USER, top


def _top_level(real):
    """(sys.path entry, top-level package name) of a directory, by the longest entry that
    holds it (None, None if none does)."""
    best = None
    for p in sys.path:
        entry = os.path.realpath(p or os.getcwd()) + os.sep
        if real.startswith(entry) and (best is None or len(entry) > len(best)):
            best = entry
    if best is None or real == best:
        return best, None
    return best, real[len(best):].split(os.sep, 1)[0]


def _installed_beside(entry, top):
    """Was ``top`` installed into ``entry`` with its metadata (pip --target, a venv's
    site directory on PYTHONPATH): a ``.dist-info`` of the distribution that owns it?  A
    user's project installed for development keeps a ``.egg-info`` (or nothing) there."""
    try:  # (listed first: a project's folder rarely holds any, and asking who owns
        # ``top`` can read every distribution's metadata, ~10 ms)
        infos = [name for name in os.listdir(entry) if name.endswith(".dist-info")]
    except OSError:
        return False
    if not infos:
        return False
    owners = {_normalized(d) for d in _owners(top)}
    return any(_normalized(name.split("-", 1)[0]) in owners for name in infos)


def _normalized(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def _owners(top):
    """Names of the installed distributions that own top-level package ``top``.  Most are
    named as they are imported (optax, flax, jax): asked directly, ~1 ms; the others
    (dm-haiku's haiku, absl-py's absl) from the full map, read once (~90 ms)."""
    try:
        return (importlib.metadata.distribution(top).metadata["Name"],)
    except Exception:
        pass
    global _distributions
    if _distributions is None:
        try:
            _distributions = _packages_distributions()
        except Exception:
            _distributions = {}
    return tuple(_distributions.get(top, ()))


def _packages_distributions():
    """Top-level package -> names of the distributions that install it, from each
    distribution's top_level.txt or else its RECORD's paths.  importlib.metadata's own
    packages_distributions() stats every file a RECORD lists (seconds in a large
    environment on a slow file system: 2.4 s measured on a GPU image); the paths' text is
    enough here."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = getattr(dist, "_normalized_name", None) or dist.metadata["Name"]
        text = dist.read_text("top_level.txt")
        if text:
            tops = set(text.split())
        else:
            tops = set()
            for line in (dist.read_text("RECORD") or "").splitlines():
                first = line.split(",", 1)[0].split("/", 1)[0]
                if first.endswith(".py"):
                    first = first[:-3]
                if first and not first.endswith((".dist-info", ".data", ".pth")) \
                        and first not in ("..", "__pycache__"):
                    tops.add(first)
        for top in tops:
            out.setdefault(top, []).append(name)
    return out


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def wants_jax(top):
    """Does the distribution owning package ``top`` require jax (not only as an extra)?"""
    answer = _wants_jax.get(top)
    if answer is None:
        answer = False
        for dist in _owners(top):
            try:
                requires = importlib.metadata.distribution(dist).requires or ()
            except Exception:
                continue
            for req in requires:
                name, marker = _REQUIREMENT.match(req), req.partition(";")[2]
                if name and name.group(1).lower() in ("jax", "jaxlib") and "extra" not in marker:
                    answer = True
        _wants_jax[top] = answer
    return answer


def library_in_scope(top):
    """Is library package ``top`` rewritten?"""
    if top is None or top in NEVER or top in excluded:
        return False
    return top in included or top in JAX_LIBRARIES or wants_jax(top)


def in_scope(filename, scope):
    """Is code from ``filename`` rewritten under ``scope`` ("user" or "all")?"""
    kind, top = classify(filename)
    if top in ALWAYS_OUT or top in excluded:
        return False
    if scope == "all" or kind == USER:
        return True
    return kind == LIBRARY and library_in_scope(top)


def in_package(filename):
    """Is ``filename`` a file of an installed library's package (not code from ``exec``)?"""
    kind, top = classify(filename)
    return kind == LIBRARY and top is not None


def is_library(filename):
    """Library code: rewritten, but its loops and functions never become units."""
    return classify(filename)[0] != USER
