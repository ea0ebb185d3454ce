"""The report of `launch/collect.py` as one self-contained page, DIR/report.html.

The page holds what results.md holds (its Markdown rendered as HTML tables), the plain tables at the other
epoch, each grid's run counts per state, the machines the finished runs came from, and every figure, each
PNG embedded as a data: URL. Its only style is an inline <style>; it has no script and names no other file
or URL, so it opens from the file, copied anywhere, in any current browser. Every text that comes from a
run (labels, paths, devices, captions) is HTML-escaped, by markdown-it (raw HTML off) or by `html.escape`.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from markdown_it import MarkdownIt

from cskd.fileio import write_text
from cskd.rundir import Summary

NAME = "report.html"
RELIABILITY = "reliability"
RELIABILITY_CAPTION = ("each method's final-epoch reliability bins pooled over its seeds (accuracy vs. confidence); "
                       "the legend gives each method's mean ECE and number of seeds")
# CommonMark with GFM pipe tables. Raw HTML off: a label such as `<script>` is shown, never run. Links, images
# and autolinks off: results.md has none, and a label must not make the page fetch or point anywhere.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "image", "autolink"])
_STYLE = """
body { font-family: system-ui, sans-serif; line-height: 1.4; max-width: 90em; margin: 1em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #999; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
td { font-family: ui-monospace, Menlo, Consolas, monospace; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; }
figure { display: inline-block; vertical-align: top; max-width: 100%; margin: 0 1.5em 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; max-width: 40em; }
"""


@dataclass(frozen=True)
class Figure:
    """A PNG for the page: `name` groups figures under one heading ("cskd_fig2", "reliability")."""
    name: str
    title: str
    path: Path
    caption: str = ""


@dataclass(frozen=True)
class Machine:
    """The finished runs of one (device, world size): how many, what they trained and their wall time."""
    device: str
    world_size: int | None
    runs: int
    trained: tuple[str, ...]  # "dataset / model", sorted
    wall_s: float  # summed over the runs that record wall_s
    no_wall: int  # runs whose summary.json has no wall_s


def machines(results: list[Summary]) -> list[Machine]:
    """One `Machine` per (summary `device`, summary `world_size`) of `results`, by device then world size."""
    groups: dict[tuple[str, int | None], list[Summary]] = {}
    for r in results:
        size = r.raw.get("world_size")
        groups.setdefault((r.device, size if isinstance(size, int) and not isinstance(size, bool) else None),
                          []).append(r)
    rows = []
    for (device, size), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0)):
        walls = [r.raw["wall_s"] for r in group if _is_number(r.raw.get("wall_s"))]
        rows.append(Machine(device, size, len(group), tuple(sorted({f"{r.dataset} / {r.model}" for r in group})),
                            float(sum(walls)), len(group) - len(walls)))
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def reliability_figures(paths: list[Path]) -> list[Figure]:
    """launch.collect's reliability overlays (`write_reliability`'s paths) as figures."""
    return [Figure(RELIABILITY, path.stem.removeprefix("reliability_"), path, RELIABILITY_CAPTION) for path in paths]


def _wall_hours(machine: Machine) -> str:
    """Total wall hours; "?" when no run records it, and a "+ ?" when only some do (a lower bound)."""
    if machine.no_wall == machine.runs:
        return "?"
    hours = f"{machine.wall_s / 3600:.2f}"
    return f"{hours} + ? ({machine.no_wall} run(s) without wall_s)" if machine.no_wall else hours


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of plain-text cells (escaped here)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def runs_html(grids: list[tuple[str, dict[str, int]]]) -> str:
    """Per grid ("name (path)", {state: runs}, as launch.collect's `grid_counts`) its runs per state and in all."""
    if not grids:
        return "<p>No grid.json and no run dirs.</p>\n"
    states = list(dict.fromkeys(s for _, counts in grids for s in counts))  # 'unknown' only where it occurs
    rows = [[grid, *(str(counts.get(s, 0)) for s in states), str(sum(counts.values()))] for grid, counts in grids]
    return _table(["grid (path)", *states, "total"], rows)


def machines_html(rows: list[Machine]) -> str:
    """The table of `machines`."""
    if not rows:
        return "<p>No finished runs.</p>\n"
    return _table(["device", "world size", "runs", "datasets / models", "wall hours"],
                  [[m.device, "?" if m.world_size is None else str(m.world_size), str(m.runs), ", ".join(m.trained),
                    _wall_hours(m)] for m in rows])


def figure_html(figure: Figure) -> str:
    """One <figure>, its PNG inline as a data: URL; a PNG that cannot be read is named in its place, so that one
    missing file does not cost the page."""
    caption = escape(figure.title) + (f" — {escape(figure.caption)}" if figure.caption else "")
    try:
        data = base64.b64encode(Path(figure.path).read_bytes()).decode("ascii")
    except OSError as e:
        return (f"<figure><figcaption>{caption} (cannot read {escape(str(figure.path))}: {escape(str(e))})"
                f"</figcaption></figure>\n")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(figure.title)}">'
            f"<figcaption>{caption}</figcaption></figure>\n")


def figures_html(figures: list[Figure], not_drawn: list[str]) -> str:
    """`figures` under a heading per name, the names in the order they first come, then why the figures the runs
    allow only in part were not drawn (`not_drawn`: launch.figures' reason lines)."""
    names = list(dict.fromkeys(f.name for f in figures))
    html = "".join(f"<h3>{escape(name)}</h3>\n" + "".join(figure_html(f) for f in figures if f.name == name)
                   for name in names) or "<p>No figures.</p>\n"
    if not_drawn:
        html += "<h3>Not drawn</h3>\n<ul>\n" + "".join(f"<li>{escape(line)}</li>\n" for line in not_drawn) + "</ul>\n"
    return html


def render_html(root: Path, results: list[Summary], text: str, *, other_epoch: str, other_tables: str,
                grids: list[tuple[str, dict[str, int]]], figures: list[Figure], not_drawn: list[str],
                generated: datetime | None = None) -> str:
    """The page: title, what results.md holds (`text`), the plain tables at `other_epoch` (`other_tables`, Markdown;
    none if empty), the runs per state of `grids`, the machines of `results`, `figures` and the `not_drawn` reasons."""
    title = escape(Path(root).resolve().name or str(root))
    when = (generated or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    other = (f"<h3>Plain tables at the {escape(other_epoch)} epoch</h3>\n{_MARKDOWN.render(other_tables)}"
             if other_tables else "")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
            f"<p>generated {when} from {len(results)} finished runs under {escape(str(root))}</p>\n"
            f"<h2>Tables</h2>\n{_MARKDOWN.render(text)}{other}"
            f"<h2>Runs</h2>\n{runs_html(grids)}"
            f"<h2>Machines</h2>\n{machines_html(machines(results))}"
            f"<h2>Figures</h2>\n{figures_html(figures, not_drawn)}</body>\n</html>\n")


def write_report_html(root: Path, results: list[Summary], text: str, *, other_epoch: str, other_tables: str,
                      grids: list[tuple[str, dict[str, int]]], figures: list[Figure], not_drawn: list[str]) -> Path:
    """Write `render_html`'s page to root/report.html (atomically: a reader sees the old page or the new one)."""
    page = render_html(root, results, text, other_epoch=other_epoch, other_tables=other_tables, grids=grids,
                       figures=figures, not_drawn=not_drawn)
    path = Path(root) / NAME
    # ASCII with character references (± as &#177;): the bytes are the same whatever the locale's encoding
    # write_text uses, and match the page's <meta charset="utf-8">
    write_text(path, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return path
