"""Regenerate the pictures in docs/images/ that docs/debugging.md shows:

    .venv/bin/python docs/make_screenshots.py

It executes docs/notebooks/debugging.ipynb in a fresh kernel (as tests/test_notebook.py
does, in a temporary folder) and takes from its outputs:

- ``timeline.png``: the PNG of the ``tl.plot(...)`` cell, drawn by ``Timeline.plot``.
- ``report.png``, ``diff.png``, ``diff_edit.png``: the HTML of ``terra_bc.explain(step)``,
  of ``terra_bc.diff(rep.paths[0], rep.paths[2])`` and of the diff of the reports taken
  before and after the edit, as headless Chromium shows it (a screenshot, cropped to the
  content; Debian's ``chromium`` package).  Where no Chromium is installed the script reads
  the HTML (tables with their spans and colors, titles, lists) and *re-draws* the same
  contents with matplotlib in a monospace font instead: what the HTML holds and how it is
  colored, not how a browser lays it out.

Needs the test extras (nbclient, nbformat, ipykernel, matplotlib).
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
from html.parser import HTMLParser

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "notebooks", "debugging.ipynb")
IMAGES = os.path.join(HERE, "images")
FONT = 8.0                      # points
CHAR, LINE = 0.6 * FONT, 1.35 * FONT  # a monospace character's width, a line's height
CELL_CHARS = 46                 # a table column's width at most, in characters


# **** reading the HTML ****

class Cell:
    """A table cell: its lines (each a list of (text, small) runs), span and colors."""

    def __init__(self, header, attrs):
        style = dict(attrs).get("style") or ""
        self.header, self.span = header, int(dict(attrs).get("colspan") or 1)
        self.background = _style(style, "background") or ("#f0f0f0" if header else "white")
        self.color = _style(style, "color") or "black"
        self.red_top = "border-top:3px solid #c00" in style
        self.lines = [[]]


def _style(style, name):
    found = re.search(rf"(?:^|;)\s*{name}\s*:\s*([^;]+)", style)
    return found.group(1).strip() if found else None


class Blocks(HTMLParser):
    """The HTML as blocks to draw: ("text", runs, color, bold) and ("table", rows)."""

    def __init__(self):
        super().__init__()
        self.blocks, self.text, self.color, self.bold, self.small = [], [], "black", False, False
        self.table = self.row = self.cell = None

    def flush(self):
        if "".join(self.text).strip():
            self.blocks.append(("text", "".join(self.text).strip(), self.color, self.bold))
        self.text, self.color, self.bold = [], "black", False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.flush()
            self.table = []
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = Cell(tag == "th", attrs)
        elif tag == "br" and self.cell is not None:
            self.cell.lines.append([])
        elif tag == "small":
            self.small = True
        elif tag in ("div", "ul", "li", "b", "p"):
            self.flush()
            self.bold = tag == "b"
            if tag == "li":
                self.text, self.color = ["• "], _style(dict(attrs).get("style") or "", "color") or "black"

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr":
            self.table.append(self.row)
        elif tag == "table":
            self.blocks.append(("table", self.table))
            self.table = None
        elif tag == "small":
            self.small = False
        elif tag in ("div", "ul", "li", "b", "p"):
            self.flush()

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.lines[-1].append((data, self.small))
        elif self.table is None:
            self.text.append(data)


def blocks_of(page):
    parser = Blocks()
    parser.feed(page)
    parser.close()
    parser.flush()
    return parser.blocks


# **** drawing ****

def _wrapped(cell, chars):
    """A cell's lines wrapped to ``chars``: (text, small) per line."""
    out = []
    for runs in cell.lines:
        for text, small in runs or [("", False)]:
            out += [(piece, small) for piece in textwrap.wrap(text, chars) or [""]]
    return [line for line in out if line[0]] or [("", False)]


def _table_layout(rows):
    """Per base column its width in characters: its widest text, at most CELL_CHARS."""
    columns = max(sum(c.span for c in row) for row in rows)
    widths = [0] * columns
    for row in rows:
        x = 0
        for c in row:
            longest = max((len("".join(t for t, _ in runs)) for runs in c.lines), default=0)
            share = min(CELL_CHARS, -(-longest // c.span))
            for k in range(x, x + c.span):
                widths[k] = max(widths[k], share)
            x += c.span
    return [max(w, 3) + 2 for w in widths]


def _draw_table(ax, rows, top):
    """Draw ``rows`` below ``top`` (points from the top); returns the new top."""
    from matplotlib.patches import Rectangle
    widths = _table_layout(rows)
    for row in rows:
        x, cells = 0, []
        for c in row:
            chars = sum(widths[x:x + c.span])
            cells.append((x, chars, c, _wrapped(c, chars - 2)))
            x += c.span
        height = max(len(lines) for *_, lines in cells) * LINE + 4
        for x, chars, c, lines in cells:
            left = sum(widths[:x]) * CHAR
            ax.add_patch(Rectangle((left, -top - height), chars * CHAR, height,
                                   facecolor=c.background, edgecolor="#cccccc", linewidth=0.5))
            if c.red_top:
                ax.plot([left, left + chars * CHAR], [-top, -top], color="#cc0000", linewidth=2.5)
            for n, (text, small) in enumerate(lines):
                ax.text(left + CHAR, -top - 2 - n * LINE, text, va="top", family="monospace",
                        fontsize=FONT * (0.85 if small else 1), weight="bold" if c.header else None,
                        color="#666666" if small else c.color)
        top += height
    return top + LINE / 2, sum(widths) * CHAR


def draw(page, path):
    """Draw the HTML ``page`` as a PNG at ``path``."""
    from matplotlib.figure import Figure
    fig = Figure()
    ax = fig.add_axes((0, 0, 1, 1))
    top, right = LINE / 2, 100 * CHAR
    for block in blocks_of(page):
        if block[0] == "table":
            top, width = _draw_table(ax, block[1], top)
            right = max(right, width)
            continue
        _, text, color, bold = block
        for line in textwrap.wrap(text, 160, subsequent_indent="  ") or [""]:
            ax.text(0, -top, line, va="top", family="monospace", fontsize=FONT, color=color,
                    weight="bold" if bold else None)
            right = max(right, len(line) * CHAR)
            top += LINE
    ax.set_xlim(-4, right + 4)
    ax.set_ylim(-top - 4, 4)
    ax.axis("off")
    fig.set_size_inches((right + 8) / 72, (top + 8) / 72)
    fig.savefig(path, dpi=110, facecolor="white")


# **** or a browser's screenshot ****

def browser_shot(html, path, width=1200):
    """``html`` as headless Chromium renders it, cropped to the content; False without one."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return False
    from PIL import Image, ImageChops
    with tempfile.TemporaryDirectory() as folder:
        page = os.path.join(folder, "page.html")
        with open(page, "w") as f:
            f.write(f'<html><body style="margin:8px;background:white">{html}</body></html>')
        shot = os.path.join(folder, "shot.png")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--screenshot={shot}",
                        f"--window-size={width},4000", "file://" + page],
                       check=True, capture_output=True, timeout=120)
        image = Image.open(shot).convert("RGB")
        box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
        if box:
            image = image.crop((0, 0, min(width, box[2] + 8), box[3] + 8))
        image.save(path)
    return True


# **** the notebook ****

def executed_notebook():
    import nbclient
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory() as folder:  # (the notebook writes trace.json)
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": folder}}).execute()
    return nb


def output(nb, start, mime):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(start)]
    return next(o["data"][mime] for o in cell.outputs if mime in o.get("data", {}))


def main():
    os.makedirs(IMAGES, exist_ok=True)
    nb = executed_notebook()
    with open(os.path.join(IMAGES, "timeline.png"), "wb") as f:
        f.write(base64.b64decode(output(nb, "tl.plot(", "image/png")))
    for name, start in (("report", "rep = terra_bc.explain(step)"),
                        ("diff", "terra_bc.diff(rep.paths[0], rep.paths[2])"),
                        ("diff_edit", "terra_bc.diff(before, terra_bc.explain(step))")):
        html, path = output(nb, start, "text/html"), os.path.join(IMAGES, f"{name}.png")
        if not browser_shot(html, path):
            draw(html, path)
    print("wrote", ", ".join(sorted(os.listdir(IMAGES))), "in", IMAGES)


if __name__ == "__main__":
    main()
