"""The journal: why a unit did what it did, for people.  Each divergence (with what the
recorded event expected and what Python did instead), each segment compiled and each eager
fallback is a typed record kept on its unit (``Unit.journal``, the last ``JOURNAL_SIZE``),
shown by ``explain()`` and ``diff()``; the categories ``settings["log"]`` names are also
logged, one line each, by the standard ``logging`` logger ``"terra_bc"``.

Records are made only where a guard failed, a segment is compiled or a unit falls back to
eager: never on the path of an op that matched (the C fast path and ``guards.continues``
do not know this module).  A fetch is logged only while ``fetches`` is on (one flag read).
"""
from __future__ import annotations

import itertools
import logging
import re
import sys
from typing import NamedTuple

from .events import (BeginEvent, BreakEvent, EnterEvent, FeedIn, FetchEvent, ForwardEndEvent,
                     OpEvent, PlaceholderIn, PlaceholderOut, StaticIn, StaticOut, key_name)
from .placeholders import Placeholder
from .settings import LOG_CATEGORIES
from .values import aval_of, is_array, user_line

JOURNAL_SIZE = 50        # records kept per unit (the newest)
log = logging.getLogger("terra_bc")
logged = frozenset()     # the categories logged now (use_log)
fetches = False          # "fetches" in logged: read at every fetch, so a plain flag
_numbers = itertools.count(1)  # records in the order they were made, across units


# **** records ****

class Diverged(NamedTuple):
    """Python left path ``path`` at its event ``event``: the recorded event ``expected``
    did not match what Python did (``got``) at ``where``; ``then``: what the iteration did
    next (traced a new path, ran the rest eagerly, kept the prefix as a path).  Both texts
    are written when read: a unit that leaves its paths at every call (a growing cache)
    would otherwise format them at every call (7% of greedy decoding's samples).  ``events``
    is the path's event list (its first ``event`` ones never change), ``did`` what Python
    did in short (``did``), or None where it did another event."""
    number: int
    unit: str
    path: int
    event: int
    events: list
    did: tuple | None
    where: str
    then: str

    @property
    def expected(self):
        return expected(self.events, self.event)

    @property
    def got(self):
        return "another event" if self.did is None else got(*self.did)

    def __str__(self):
        return (f"divergence in unit {self.unit} at {self.where}: expected {self.expected}, "
                f"got {self.got} (path {self.path}, event {self.event}; {self.then})")

    def __repr__(self):
        return f"Diverged({self})"


class Compiled(NamedTuple):
    """A segment of path ``path`` (equations [start, stop)) compiled (``how``: now, on the
    calling thread, or handed to the worker) and why then."""
    number: int
    unit: str
    path: int
    start: int
    stop: int
    how: str
    why: str

    def __str__(self):
        return (f"compile in unit {self.unit}: path {self.path}, equations "
                f"[{self.start}, {self.stop}) {self.how}: {self.why}")


class Fallback(NamedTuple):
    """The unit ran (part of) an iteration eagerly, and why.  A unit that runs eagerly does
    so at every call: each reason is noted once per unit."""
    number: int
    unit: str
    where: str
    reason: str

    def __str__(self):
        return f"eager fallback in unit {self.unit} at {self.where}: {self.reason}"


_CATEGORY = {Diverged: "divergences", Compiled: "compiles", Fallback: "fallbacks"}


def note(unit, record_type, *fields):
    """Keep a record on ``unit`` (and log it if its category is on)."""
    record = record_type(next(_numbers), unit.name, *fields)
    unit.journal.append(record)
    if _CATEGORY[record_type] in logged:
        log.info("%s", shown_location(str(record)))
    return record


def fallback(unit, reason, where=None):
    """An eager fallback: noted the first time the unit falls back for ``reason`` (at
    ``where``, else the user's line that called into terra_bc)."""
    if reason not in unit.fallbacks_noted:
        unit.fallbacks_noted.add(reason)
        note(unit, Fallback, where or user_line(), reason)


def say(category, message, *args):
    """A log line of ``category`` (one not kept as a record: a fetch, an eager run)."""
    if category in logged:
        log.info("%s", shown_location(message % args))


_LOCATION = re.compile(r"([^\s()]+):(\d+)")


# **** source locations (IPython cells) ****

def _ipython_compiler():
    """IPython's compiler (which knows each cell's file name), if IPython runs here."""
    ipython = sys.modules.get("IPython")  # (never imported here: only if the user did)
    shell = ipython.get_ipython() if ipython is not None else None
    compiler = getattr(shell, "compile", None)
    return compiler if hasattr(compiler, "format_code_name") else None


def shown_location(where):
    """``file:line`` as IPython's tracebacks show it (``Cell In[2], line 21``) for cells."""
    compiler = _ipython_compiler()
    if compiler is None:
        return where

    def named(match):
        label = compiler.format_code_name(match.group(1))
        return f"{label[0]} {label[1]}, line {match.group(2)}" if label else match.group(0)
    return _LOCATION.sub(named, where)


# **** what was expected, what Python did ****

def aval_text(aval):
    try:
        return aval.str_short(short_dtypes=True)
    except (AttributeError, TypeError):
        return str(aval)


def _made_avals(events, pos):
    """Value id -> aval of the values the first ``pos`` ``events`` made or fed."""
    avals = {}
    for ev in events[:pos]:
        for spec in getattr(ev, "args", ()) + getattr(ev, "outs", ()):
            if type(spec) in (FeedIn, PlaceholderOut):
                avals[spec.id] = spec.aval
        if type(ev) is BeginEvent:
            avals.update(zip(ev.ids, ev.avals))
    return avals


def _spec_text(spec, avals):
    t = type(spec)
    if t is PlaceholderIn:
        aval = avals.get(spec.id)
        return f"v{spec.id} " + (aval_text(aval) if aval is not None else "?")
    if t in (StaticIn, StaticOut):
        return repr(spec.value)[:40]
    return aval_text(spec.aval)  # a feed, a graph break's input


def expected(events, pos):
    """The recorded event at ``pos`` of a path's ``events``, in one line."""
    if pos >= len(events):
        return "the end of the path"
    ev = events[pos]
    avals = _made_avals(events, pos)
    t = type(ev)
    if t is FetchEvent:
        return f"fetch ({ev.key}) of {_spec_text(PlaceholderIn(ev.id), avals)}"
    if t is BeginEvent:
        ins = ", ".join(aval_text(a) for a in ev.avals)
        return f"{ev.kind}({ins})"
    if t in (OpEvent, BreakEvent, EnterEvent):
        ins = ", ".join(_spec_text(s, avals) for s in ev.args)
        return f"{'enter' if t is EnterEvent else key_name(ev.key)}({ins})"
    return ev.kind if t is ForwardEndEvent else f"{ev.kind} {key_name(ev.key)}"


LEAVES_SHOWN = 8  # (a stack of a 40-entry cache: its first arguments say enough)


def did(kind, key, leaves):
    """What Python did where a guard failed, in short (``got`` writes it): its first
    ``LEAVES_SHOWN`` arguments as they are now (a placeholder's value may come later)."""
    return kind, key, tuple(map(_leaf, leaves[:LEAVES_SHOWN])), len(leaves)


def _leaf(x):
    if type(x) is Placeholder and x._val is None:
        return PlaceholderOut(x._id, x.aval)
    if is_array(x):
        return aval_of(x)
    return repr(x)[:40]


def _leaf_text(leaf):
    if type(leaf) is PlaceholderOut:
        return f"v{leaf.id} {aval_text(leaf.aval)}"
    return leaf if type(leaf) is str else aval_text(leaf)


def got(kind, key, leaves, count):
    """What Python did where a guard failed, in one line (as ``expected`` writes events)."""
    ins = ", ".join(map(_leaf_text, leaves))
    if count > len(leaves):
        ins += f", ... ({count - len(leaves)} more)"
    if kind == "fetch":
        return f"fetch ({key}) of {ins}"
    if kind == "end":
        return "the end of the iteration"
    name = "enter" if kind == "enter" else key_name(key) if kind == "op" else kind
    return f"{name}({ins})"


# **** names and logging ****

def identifier(text, limit=60):
    """``text`` as a Python identifier's characters (executable names): paths cut to their
    file name, ``<locals>`` left out, anything else that is not a word character an
    underscore; its last ``limit`` characters (a qualified name ends with its own)."""
    text = re.sub(r"[^\s():]*/", "", text.replace(".<locals>.", "."))
    return re.sub(r"\W+", "_", text).strip("_")[-limit:].lstrip("_") or "unit"


def path_number(unit, path):
    """``path``'s number in ``unit`` (1 for its first; a path being traced: the next)."""
    paths = unit.paths
    return paths.index(path) + 1 if path in paths else len(paths) + 1


def segment_name(it, entry):
    """The name JAX gives a segment's executable (``jit_`` + this: its logs, profiles,
    the persistent cache's file names): unit, path and equation range.  Structurally equal
    segments share one executable, named after the segment compiled first."""
    return (f"terra_bc__{identifier(it.unit.name)}__p{path_number(it.unit, it.path)}"
            f"__{entry.start}_{entry.stop}")


def use_log(spec):
    """Log the categories ``spec`` names ("divergences,compiles", "all", ""): the
    ``terra_bc`` logger at INFO, with a handler on stderr where logging has none."""
    global logged, fetches
    names = {n.strip() for n in spec.split(",") if n.strip()}
    logged = frozenset(LOG_CATEGORIES if "all" in names else names)
    fetches = "fetches" in logged
    if logged:
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        if not log.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("terra_bc: %(message)s"))
            log.addHandler(handler)
