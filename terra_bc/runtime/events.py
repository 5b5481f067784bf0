"""Typed records of a recorded path: what each input and output of an event was, and the
events themselves, one class (one fixed shape) per kind.

Input specs, one per flattened argument of an op (in JAX's flattening of ``(args,
kwargs)``):

* ``PlaceholderIn(id)``   this iteration's placeholder for value ``id``;
* ``FeedIn(id, aval, type)``  a value from Python (an array, or a Python number fed rather
  than baked in) entering the graph as input ``id``;
* ``StaticIn(value)``     a Python value baked into the recorded equations;
* ``ComputedIn(aval)``    an input of a graph break: any computed value of that aval.

Output specs: ``PlaceholderOut(id, aval)`` or ``StaticOut(value)``.  Specs are matched by
their type (``guards.matches``), never compared with ``==`` (named tuples of different
kinds with equal fields would compare equal).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import NamedTuple


class PlaceholderIn(NamedTuple):
    id: int


class FeedIn(NamedTuple):
    id: int
    aval: object
    type: type


class StaticIn(NamedTuple):
    value: object


class ComputedIn(NamedTuple):
    aval: object


class PlaceholderOut(NamedTuple):
    id: int
    aval: object


class StaticOut(NamedTuple):
    value: object


class FastSpec(NamedTuple):
    """What the C fast path checks for a plain op event (``_fastop.c``): per-arg specs are
    plain tuples (0, id) / (1, value) / (2, id, aval, type) / (3, a tuple of static values,
    compared element by element with their types) for the positional then the keyword
    arguments in call order.  ``out_id`` None: the one output is a static value
    (``out_aval`` holds it: a placeholder's ``x.sharding`` with one device)."""
    callee: object
    nargs: int
    args: tuple
    out_id: int | None
    out_aval: object
    kwnames: tuple | None


def key_name(key):
    """A guard key's printable name (a callee's qualified name, a conversion's kind)."""
    obj = getattr(key, "obj", key)
    if isinstance(getattr(key, "op_name", None), str):  # (bodies.TracedBody)
        return key.op_name
    if isinstance(key, types.CodeType):
        return key.co_qualname
    if isinstance(key, tuple) and key and isinstance(key[0], types.CodeType):
        return key[0].co_qualname
    if isinstance(key, tuple) and key and isinstance(key[0], str):  # ("vjp-apply", ...)
        code = _first_code(key)
        return key[0] + (f" of {code.co_qualname}" if code is not None else "")
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)[:40]


def _first_code(key, depth=0):
    for x in key:
        if isinstance(x, types.CodeType):
            return x
        if isinstance(x, tuple) and depth < 4:
            found = _first_code(x, depth + 1)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------ events

@dataclass(slots=True, eq=False, repr=False)
class Event:
    """One step of an iteration as Python saw it.  Paths of a unit share the Event objects
    of their common prefix (``Path.fork``), so events compare by identity."""
    kind: str     # "enter", "op", "eager", "fetch", "<grad|vjp|jvp>-begin", "...-end"
    key: object   # the guard key: a callee's, a conversion's kind, a transform's
    mark: int     # recorded equations once the event happened
    nvals: int    # recorded values once it happened (the ids a path forked here shares)
    where: str    # the user's source line

    def __repr__(self):
        return f"{type(self).__name__}({self.kind}, {key_name(self.key)}, mark={self.mark}, at {self.where})"


@dataclass(slots=True, eq=False, repr=False)
class EnterEvent(Event):
    """The unit's arguments: ``shape`` (values.arrays_in) and a FeedIn per array; the
    configuration the path is recorded under (``guards.config_key``)."""
    shape: object
    args: tuple
    config: object = None


@dataclass(slots=True, eq=False, repr=False)
class OpEvent(Event):
    """A DL op: its inputs' tree and specs, its outputs' tree and specs, and the spec the C
    fast path checks (None when only the general path can match it).  ``launch``: a fetch
    followed it on a path (with no op between): co-execution launches the segment that
    fetch needs right after it (``coexecution.op``)."""
    tree: object
    args: tuple
    out_tree: object
    outs: tuple
    fast: FastSpec | None
    launch: bool = False


@dataclass(slots=True, eq=False, repr=False)
class BreakEvent(Event):
    """A graph break (kind "eager"): an op JAX would not record runs eagerly every
    iteration on its inputs' values; its results enter later ops as feeds."""
    tree: object
    args: tuple


@dataclass(slots=True, eq=False, repr=False)
class FetchEvent(Event):
    """Python needed value ``id`` (``key`` is the conversion: "bool", "float", ...);
    ``value``: what Python got when the path was traced, where it is a Python number or
    bool (the value a data-dependent branch decided on; reports show it)."""
    id: int
    value: object = None


@dataclass(slots=True, eq=False, repr=False)
class BeginEvent(Event):
    """grad/vjp/jvp of user code begins: its differentiated inputs (ids and avals)."""
    ids: tuple
    avals: tuple


@dataclass(slots=True, eq=False, repr=False)
class GradEndEvent(Event):
    """grad/value_and_grad's result: (value, gradients) as output specs."""
    out_tree: object
    outs: tuple


@dataclass(slots=True, eq=False, repr=False)
class ForwardEndEvent(Event):
    """vjp/jvp's forward returned values ``ids``."""
    ids: tuple
