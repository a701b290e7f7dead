"""Plain report documents: headings, paragraphs, tables, images, plots -> Markdown and HTML.

A :class:`Doc` is a list of blocks. :func:`write_doc` writes it into one folder as
``report.md`` (images beside it, linked by relative path) and ``report.html``, that Markdown
rendered by markdown-it-py with every image base64-embedded, so the single file can be
mailed. Plots are drawn with matplotlib's object-oriented API (``Figure`` + Agg canvas): no
pyplot, no global backend change. A document with ``refresh_s`` set (a live report, re-rendered
while its run goes on) makes the page reload itself every that many seconds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from markdown_it import MarkdownIt

from dpfl.shared.errors import StateError
from dpfl.shared.io import atomic_write_bytes, atomic_write_text, read_jsonl

CSS = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;font-size:.92em}
th{background:#f2f2f2}td:first-child{white-space:nowrap}figure{margin:1em 0}
img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555}code{background:#f4f4f4;padding:0 .2em}
blockquote{background:#fff8e0;border-left:4px solid #e0b000;margin:1em 0;
padding:.4em .8em}"""


@dataclass(frozen=True)
class Series:
    """One drawn line: ``label``, points ``x``/``y``; ``style`` ``line``, ``dashed`` (budgets,
    limits), ``wide`` (a broad translucent line behind the others, e.g. a maximum) or
    ``points`` (markers only)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "line"
    color: str | None = None


@dataclass(frozen=True)
class Plot:
    """A plot to draw into ``name`` (a PNG file name inside the report folder)."""

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    bars: bool = False  # grouped bar chart (x: categories) instead of lines
    integer_x: bool = False  # rounds: whole-number ticks
    zero_y: bool = False  # start the y axis at 0 (epsilon)


@dataclass
class Doc:
    """A report: a title and blocks ``(kind, payload)`` in reading order."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    refresh_s: int = 0  # > 0: the HTML page reloads itself every refresh_s seconds

    def h(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str, note: bool = False) -> None:
        self.blocks.append(("note" if note else "p", text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.blocks.append(("table", ([str(h) for h in headers],
                                          [[cell(v) for v in r] for r in rows])))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (Path(path), caption)))

    def plot(self, plot: Plot, caption: str) -> None:
        self.plots.append(plot)
        self.blocks.append(("plot", (plot.name, caption)))


def cell(v: Any) -> str:
    """A table cell: floats with 4 significant digits, everything else as text."""
    if isinstance(v, bool) or v is None:
        return "none" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def draw(plot: Plot, path: Path) -> Path:
    """Draw ``plot`` as a PNG at ``path`` (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if plot.bars:
        width = 0.8 / max(len(plot.series), 1)
        for i, s in enumerate(plot.series):
            ax.bar([x + (i - (len(plot.series) - 1) / 2) * width for x in s.x], s.y, width,
                   label=s.label, color=s.color)
        ax.set_xticks(sorted({x for s in plot.series for x in s.x}))
    else:
        for s in plot.series:
            wide, dashed = s.style == "wide", s.style == "dashed"
            if s.style == "points":
                ax.plot(s.x, s.y, linestyle="none", marker="s", markersize=7, fillstyle="none",
                        markeredgewidth=1.5, zorder=3, label=s.label, color=s.color)
                continue
            ax.plot(s.x, s.y, linestyle="--" if dashed else "-",
                    marker=None if dashed or wide or len(s.x) > 40 else "o", markersize=4,
                    linewidth=7 if wide else 1 if dashed else 1.6, alpha=0.3 if wide else 1,
                    zorder=1 if wide else 2, label=s.label, color=s.color)
    if plot.integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if plot.zero_y:
        ax.set_ylim(bottom=0)
    ax.set_title(plot.title)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, alpha=0.3)
    if any(s.label for s in plot.series):
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _place(src: Path, out_dir: Path, used: dict[Path, str]) -> str:
    """Copy an image into ``out_dir`` (once) and return its file name there."""
    if src.parent.resolve() == out_dir.resolve():
        return src.name
    if src not in used:
        name, i = src.name, 1
        while name in used.values():  # two images of the same name from different folders
            name, i = f"{src.stem}-{i}{src.suffix}", i + 1
        shutil.copyfile(src, out_dir / name)
        used[src] = name
    return used[src]


def to_markdown(doc: Doc, out_dir: Path) -> str:
    """The document as Markdown; images are copied into ``out_dir`` and linked by name."""
    used: dict[Path, str] = {out_dir / p.name: p.name for p in doc.plots}
    out = [f"# {doc.title}", ""]
    for kind, payload in doc.blocks:
        if kind == "h2":
            out += [f"## {payload}", ""]
        elif kind in ("p", "note"):
            out += [("> " if kind == "note" else "") + payload, ""]
        elif kind == "ul":
            out += [f"- {item}" for item in payload] + [""]
        elif kind == "table":
            headers, rows = payload
            out.append("| " + " | ".join(map(_md_escape, headers)) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(map(_md_escape, r)) + " |" for r in rows]
            out.append("")
        elif kind in ("img", "plot"):
            src, caption = payload
            name = _place(src, out_dir, used) if kind == "img" else src
            out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(out)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(title: str, markdown: str, out_dir: Path, refresh_s: int = 0) -> str:
    """The Markdown as one self-contained HTML page: rendered by markdown-it-py (CommonMark
    plus tables, raw HTML off, so text from a run - site names included - is escaped), with
    every image embedded as a data URI so the single file can be mailed. ``refresh_s`` > 0:
    the page reloads itself that often (a live report)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                child.attrSet("src", _data_uri(out_dir / unquote(str(child.attrGet("src")))))
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s > 0 else ""
    return "\n".join([
        "<!DOCTYPE html>", f'<html lang="en"><head><meta charset="utf-8">{refresh}',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        md.renderer.render(tokens, md.options, {}), "</body></html>"])


def write_doc(doc: Doc, out_dir: Path) -> Path:
    """Draw the plots and write ``report.md`` and ``report.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for plot in doc.plots:
        draw(plot, out_dir / plot.name)
    markdown = to_markdown(doc, out_dir)
    atomic_write_text(out_dir / "report.md", markdown)
    return atomic_write_text(out_dir / "report.html",
                             to_html(doc.title, markdown, out_dir, doc.refresh_s))


# -- reading a run directory (every error names the file) -------------------------------
def read_json(path: Path, what: str) -> Any:
    """JSON from ``path``; :class:`StateError` naming the file if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateError(f"{what} {path} is unreadable or corrupt ({exc}); restore it "
                         "from a backup (the report is rendered from the files on disk)") from exc


def read_records(path: Path, what: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (a torn last line is ignored); [] if it is missing."""
    if not path.exists():
        return []
    try:
        records = read_jsonl(path)
    except (OSError, ValueError) as exc:
        raise StateError(f"{what} {path} is unreadable or corrupt ({exc})") from exc
    bad = [i + 1 for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise StateError(f"{what} {path}: record(s) {bad[:5]} are not JSON objects")
    return records


def flatten(obj: Any, prefix: str = "", depth: int = 4) -> list[tuple[str, Any]]:
    """``(dotted.key, value)`` for the scalars of nested dicts; lists as JSON text."""
    if isinstance(obj, dict) and depth > 0:
        out = []
        for k in sorted(obj, key=str):
            out += flatten(obj[k], f"{prefix}.{k}" if prefix else str(k), depth - 1)
        return out
    if isinstance(obj, (list, tuple, dict)):
        return [(prefix, json.dumps(obj, sort_keys=True, default=str))]
    return [(prefix, obj)]
