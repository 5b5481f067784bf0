"""The timeline: when each iteration ran, when its segments were launched, when a segment
was compiled (on the calling thread or the worker), when it finished running on the device
(from its launch until its values were ready, seen by a watcher thread) and when Python
waited for a value.

Kept only while recording (``with terra_bc.timeline() as tl:``), in a bounded ring; when
not recording, each place that would record reads one module flag (``on``) and nothing
else.  ``tl.save("trace.json")`` writes Chrome trace events (Perfetto, chrome://tracing);
``tl.plot()`` draws it (matplotlib, imported only then).
"""
from __future__ import annotations

import collections
import base64
import bisect
import html
import io
import json
import math
import os
import queue
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


DEVICE = "device"     # the pseudo-thread of "device" spans: a segment from launch to ready
_launched = queue.Queue()
_watcher = None


def running(name, start, values):
    """A segment launched at ``start`` (call only while ``on``): a watcher thread waits for
    its ``values`` and records a "device" span from the launch until they are ready (JAX
    runs it asynchronously; the calling thread never waits for this)."""
    global _watcher
    if _watcher is None:
        _watcher = threading.Thread(target=_watch, name="terra_bc-timeline", daemon=True)
        _watcher.start()
    _launched.put((name, start, values))


def _watch():
    import jax
    while True:
        name, start, values = _launched.get()
        try:
            jax.block_until_ready(values)
            _ring.append(Span(name, "device", start, time.perf_counter() - start, DEVICE))
        except Exception:  # (a value deleted since: donated to a later segment)
            pass
        finally:
            del values
            _launched.task_done()


def _drain(seconds=10.0):
    """Wait (a bounded time) until the watcher has seen every launched segment finish."""
    deadline = time.perf_counter() + seconds
    while _launched.unfinished_tasks and time.perf_counter() < deadline:
        time.sleep(0.001)


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
        _drain()
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

    def _summary_html(self):
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{n}</td><td>{secs * 1e3:.1f} ms</td></tr>"
                       for k, (n, secs) in self.summary().items())
        return (f"<table><tr><th>what</th><th>spans</th><th>time</th></tr>{rows}</table>"
                "<small>tl.save('trace.json') and open it in Perfetto</small>")

    def _repr_html_(self):
        return self._summary_html()

    def _repr_mimebundle_(self, include=None, exclude=None):
        """In Jupyter: the drawing (PNG, also inside the HTML) above the summary table;
        the table alone where matplotlib is not installed.  Drawn once for both."""
        png = self.png() if self.spans else None
        if png is None:
            return {"text/plain": repr(self), "text/html": self._summary_html()}
        img = f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'
        return {"text/plain": repr(self), "image/png": png,
                "text/html": img + self._summary_html()}

    # **** drawing ****

    def iterations(self):
        """The outermost iterations, in order, each an ``IterationTime``: its span and
        the seconds of it its thread spent in each activity (``ACTIVITIES``)."""
        spans = [s for s in self.spans if s.thread != WORKER]
        pieces = sorted(_activities(spans), key=lambda p: p.start)
        starts = [p.start for p in pieces]
        out = []
        for it in _outermost(s for s in spans if s.category == "iteration"):
            end, parts = it.start + it.seconds, dict.fromkeys(ACTIVITIES[:4], 0.0)
            for p in pieces[bisect.bisect_left(starts, it.start):bisect.bisect_left(starts, end)]:
                if p.thread == it.thread:
                    parts[p.category] += min(p.seconds, end - p.start)
            out.append(IterationTime(it, parts))
        return out

    def plot(self, ax=None, iterations=None):
        """Draw the recording with matplotlib and return the Figure.  Lanes over time
        (ms since recording began): Python running in an iteration (colored by mode),
        segments launched (dispatch), compiling (on the calling thread; on the worker),
        Python waiting on a fetch, segments running on the device; each iteration's start
        marked and numbered.
        ``iterations``: a range of iteration numbers (from 1) to show in the lanes
        (``range(2, 31)``: leave out the first, traced one).  With ``ax=None``, a new
        figure also shows, per iteration, the share of its time in each activity and its
        length.  Given ``ax``, only the lanes are drawn, there.  The last lane shows each
        segment from its launch until its values were ready on the device (a watcher
        thread sees it; Python never waits for it): a fetch wait is where Python did."""
        if ax is None:
            from matplotlib.figure import Figure  # (no pyplot: no global state, no backend)
            fig = Figure(figsize=(10, 6), layout="constrained")
            ax, per_iteration = fig.subplots(2, 1, height_ratios=[3, 2])
            _draw_iteration_shares(per_iteration, self.iterations())
        _draw_lanes(ax, self, iterations)
        return ax.figure

    def png(self, dpi=90):
        """The drawing (``plot()``) as PNG bytes; None where matplotlib is not installed."""
        try:
            fig = self.plot()
        except ImportError:
            return None
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()


class IterationTime(NamedTuple):
    """One outermost iteration (its ``span``) and ``parts``: seconds per activity."""
    span: Span
    parts: dict


WORKER = "terra_bc-compile"  # the compile worker's thread (compiling.py names it)
# What the calling thread does, innermost first: a compile runs inside a launch, which may
# run inside a fetch (a traced iteration computing recorded values), inside an iteration.
ACTIVITIES = ("compile", "launch", "fetch", "python", "worker compile", "device")
COLORS = {"python": "#4c72b0", "tracing": "#8172b2", "launch": "#55a868", "compile": "#c44e52",
          "fetch": "#dd8452", "worker compile": "#937860", "device": "#64b5cd"}
LANES = (("python", "Python (iteration)"), ("launch", "launch (dispatch)"),
         ("compile", "compile (calling thread)"), ("fetch", "fetch wait"),
         ("worker compile", "compile (worker)"), ("device", "segment running (device)"))
_RANK = {"compile": 0, "launch": 1, "fetch": 2, "iteration": 3, "device": 4}


def _outermost(spans):
    """The spans not inside another of the same thread (nested units' iterations)."""
    out, ends = [], {}
    for s in sorted(spans, key=lambda s: (s.start, -s.seconds)):
        if s.start >= ends.get(s.thread, float("-inf")):
            out.append(s)
            ends[s.thread] = s.start + s.seconds
    return out


def _activities(spans):
    """Each thread's time cut into what it was doing, the innermost span winning: spans
    (category ``ACTIVITIES``; "python" where only an iteration is open, ``detail`` its mode)
    that do not overlap."""
    out = []
    for thread in {s.thread for s in spans}:
        marks = sorted((t, i, rise) for i, s in enumerate(spans) if s.thread == thread
                       for t, rise in ((s.start, 1), (s.start + s.seconds, -1)))
        open_ = set()
        for (t, i, rise), (t_next, _, _) in zip(marks, marks[1:] + [(marks[-1][0], 0, 0)]):
            (open_.add if rise > 0 else open_.discard)(i)
            if t_next > t and open_:
                top = spans[min(open_, key=lambda j: _RANK[spans[j].category])]
                kind = "python" if top.category == "iteration" else top.category
                _extend(out, Span("", kind, t, t_next - t, thread, top.detail))
    return out


def _extend(out, piece):
    """Append ``piece``, merged into the last one when it continues it."""
    last = out[-1] if out else None
    if (last and (last.category, last.thread, last.detail) == (piece.category, piece.thread, piece.detail)
            and abs(last.start + last.seconds - piece.start) < 1e-12):
        out[-1] = last._replace(seconds=last.seconds + piece.seconds)
    else:
        out.append(piece)


def _draw_lanes(ax, tl, shown=None):
    """One lane per activity over time (ms since the recording began)."""
    ms = lambda t: (t - tl.began) * 1e3
    pieces = _activities([s for s in tl.spans if s.thread != WORKER])
    pieces += [s._replace(category="worker compile") for s in tl.spans
               if s.thread == WORKER and s.category == "compile"]
    for y, (kind, label) in enumerate(LANES):
        for mode, color in _lane_colors(kind):
            bars = [(ms(p.start), p.seconds * 1e3) for p in pieces
                    if p.category == kind and (mode is None or p.detail == mode)]
            if bars:  # (an edge of its own color: a µs launch still shows as a line)
                ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=color, edgecolors=color,
                               linewidth=0.6, label=label if mode is None else f"{label}, {mode}")
    iterations = _outermost(s for s in tl.spans if s.category == "iteration")
    numbered = list(enumerate(iterations, 1))
    if shown is not None and numbered:
        numbered = [(n, it) for n, it in numbered if n in shown] or numbered
        first, last = numbered[0][1], numbered[-1][1]
        ax.set_xlim(ms(first.start), ms(last.start + last.seconds))
    _mark_iterations(ax, [(n, ms(it.start)) for n, it in numbered])
    ax.set_yticks(range(len(LANES)), [label for _, label in LANES])
    ax.set_ylim(len(LANES) - 0.5, -0.7)
    ax.set_xlabel("ms since the recording began")
    what = (f"iterations {numbered[0][0]}-{numbered[-1][0]} of {len(iterations)}"
            if shown is not None and numbered else f"{len(iterations)} iterations")
    ax.set_title(f"terra_bc timeline: {what} (numbered at their start)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)


def _mark_iterations(ax, starts):
    """A line at each iteration's start; its number where it does not crowd the last."""
    left, right = ax.get_xlim()
    room, last = (right - left) / 40, float("-inf")
    for n, x in starts:
        ax.axvline(x, color="0.8", linewidth=0.5, zorder=0)
        if x - last >= room:
            ax.annotate(f"{n}", (x, -0.5), xytext=(2, 0), textcoords="offset points",
                        va="bottom", fontsize=7, color="0.4", annotation_clip=True)
            last = x


def _lane_colors(kind):
    """Python's lane is colored by the iteration's mode (tracing costs more)."""
    if kind == "python":
        return [("tracing", COLORS["tracing"]), ("co-execution", COLORS["python"]),
                ("eager", "#8c8c8c")]
    return [(None, COLORS[kind])]


def _draw_iteration_shares(ax, iterations):
    """Per iteration: the share of its time in each activity (bars) and its length (dots,
    on a log scale: a traced iteration can last 1000 times a co-executed one)."""
    numbers = range(1, len(iterations) + 1)
    bottom = [0.0] * len(iterations)
    for kind in ("python", "launch", "compile", "fetch"):
        share = [100 * it.parts[kind] / it.span.seconds if it.span.seconds else 0 for it in iterations]
        ax.bar(numbers, share, bottom=bottom, color=COLORS[kind], width=0.8, label=kind)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set_ylim(0, 100)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("% of the iteration")
    ax.set_xlabel("iteration")
    length = ax.twinx()
    length.plot(numbers, [it.span.seconds * 1e3 for it in iterations], "k.", label="length (ms)")
    length.set_yscale("log")
    from matplotlib.ticker import FuncFormatter  # (plain numbers, not 2 x 10^0)
    length.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    length.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    length.set_ylabel("length (ms, dots)")
    if iterations:
        handles = ax.get_legend_handles_labels()[0] + length.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncols=5,
                  fontsize=7)


def _minor_label(v, _):
    """A log axis's minor tick labelled only at 2 and 5 times a power of ten."""
    return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 5) else ""


def record():
    """``terra_bc.timeline()``: a Timeline to record with ``with``."""
    return Timeline()
