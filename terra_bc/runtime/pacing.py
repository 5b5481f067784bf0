"""Pacing: how many launched segments may be in flight at once where several devices run
them (simulated CPU devices, several processes).

XLA's CPU client deadlocks when more than 32 computations over several devices are queued
and not finished (jax 0.10.2, 2-core machine, 2, 4 and 8 simulated devices: 32 in flight
run, the 33rd hangs every device in an all-reduce's rendezvous; docs/distributed.md).  Eager
JAX rarely gets there: XLA runs small computations inline, on the dispatching thread.  A
co-executed loop that fetches nothing launches one compiled step per turn faster than the
devices run it, so it would.  After each launch, the launches before the last
``IN_FLIGHT`` are waited for: the devices still have the next step queued when one ends,
and Python still runs ahead of them by that much.  In a process with one device nothing is kept or waited for.
"""
from __future__ import annotations

import collections
import functools

import jax

from ..jaxpr_builder import several_devices
from .settings import IN_FLIGHT

_in_flight = collections.deque()  # an output of each of the last launches


def needed():
    """Do launches need pacing in this process (more than one device in its computations)?"""
    return several_devices()


@functools.cache
def several_processes():
    """Is this one of several processes (jax.distributed)?  Their collectives pair up by
    order alone (XLA's gloo communicator has no tags), so every process must run the same
    executables in the same order: no decision may depend on timing (compiling.py)."""
    return jax.process_count() > 1


def launched(values):
    """A segment was launched and returned ``values``: wait for the launches before the last
    ``IN_FLIGHT`` (blocking on one output of a launch waits for its execution)."""
    for v in values:
        if isinstance(v, jax.Array):
            _in_flight.append(v)
            break
    while len(_in_flight) > IN_FLIGHT:
        v = _in_flight.popleft()
        if not v.is_deleted():  # (donated to a later launch, which is waited for in its turn)
            v.block_until_ready()


def holds(v):
    """References pacing keeps to ``v`` (launching.donatable discounts them: the output of
    one step is the next step's donated parameter)."""
    return sum(1 for x in _in_flight if x is v)
