"""The timeline: when each iteration ran, when its segments were launched, when a segment
was compiled (on the calling thread or the worker) and when Python waited for a value.

Kept only while recording (``with terra_bc.timeline() as tl:``), in a bounded ring; when
not recording, each place that would record reads one module flag (``on``) and nothing
else.  ``tl.save("trace.json")`` writes Chrome trace events (Perfetto, chrome://tracing).
"""
from __future__ import annotations

import collections
import html
import json
import os
import threading
import time
from typing import NamedTuple

RING_SIZE = 100_000   # spans kept while recording (the newest)
on = False            # recording now: read wherever a span would be recorded
_ring = collections.deque(maxlen=RING_SIZE)


class Span(NamedTuple):
    """Something that took time: ``category`` "iteration", "launch", "compile" or
    "fetch"; ``start`` (``time.perf_counter`` seconds) and ``seconds``; the thread it ran
    on; ``detail``: what else is known (a mode, a conversion)."""
    name: str
    category: str
    start: float
    seconds: float
    thread: str
    detail: str = ""


def add(name, category, start, detail=""):
    """Record a span from ``start`` to now (call only while ``on``)."""
    _ring.append(Span(name, category, start, time.perf_counter() - start,
                      threading.current_thread().name, detail))


class Timeline:
    """What ``terra_bc.timeline()`` returns: ``with`` it, what runs is recorded; after it,
    ``spans`` holds what was.  One records at a time."""

    def __init__(self):
        self.spans = []
        self.began = 0.0

    def __enter__(self):
        global on
        if on:
            raise RuntimeError("terra_bc.timeline: a timeline is recording already")
        _ring.clear()
        self.began, on = time.perf_counter(), True
        return self

    def __exit__(self, *exc):
        global on
        on = False
        self.spans = list(_ring)
        _ring.clear()

    def events(self):
        """The spans as Chrome trace events ("X": complete; times in microseconds since
        the recording began), each thread named by a metadata event."""
        pid, tids = os.getpid(), {}
        events = [{"name": s.name, "cat": s.category, "ph": "X", "pid": pid,
                   "tid": tids.setdefault(s.thread, len(tids) + 1),
                   "ts": round((s.start - self.began) * 1e6, 3), "dur": round(s.seconds * 1e6, 3),
                   "args": {"detail": s.detail} if s.detail else {}} for s in self.spans]
        return events + [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                          "args": {"name": name}} for name, tid in tids.items()]

    def save(self, path):
        """Write the events as JSON (a list of trace events): Perfetto loads it."""
        with open(path, "w") as f:
            json.dump(self.events(), f)

    def summary(self):
        """Seconds spent per category, and how many spans each."""
        total = collections.defaultdict(lambda: [0, 0.0])
        for s in self.spans:
            total[s.category][0] += 1
            total[s.category][1] += s.seconds
        return {k: (n, secs) for k, (n, secs) in total.items()}

    def __repr__(self):
        parts = ", ".join(f"{k}: {n} ({secs * 1e3:.1f} ms)"
                          for k, (n, secs) in self.summary().items())
        return f"<terra_bc timeline: {len(self.spans)} spans; {parts or 'nothing recorded'}>"

    def _repr_html_(self):
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{n}</td><td>{secs * 1e3:.1f} ms</td></tr>"
                       for k, (n, secs) in self.summary().items())
        return (f"<table><tr><th>what</th><th>spans</th><th>time</th></tr>{rows}</table>"
                "<small>tl.save('trace.json') and open it in Perfetto</small>")


def record():
    """``terra_bc.timeline()``: a Timeline to record with ``with``."""
    return Timeline()
