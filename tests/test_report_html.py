"""report.html (launch/report_html.py), as launch/collect.py writes it, on test_collect's hand-made run dirs.

The page is read back with the standard library's HTMLParser: its table cells must be those of results.md
(and of the other epoch's tables), its images the very bytes of the PNGs, its text escaped.
"""
import base64
import json
import os
import re
from collections import Counter
from html import unescape
from html.parser import HTMLParser

import pytest

import test_collect_paper
from launch import collect, report_html
from launch.report_html import Figure
from test_collect import add_run, manifest, root  # noqa: F401 (root: a fixture)

PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """A page's tags, the text of each <td>/<th>, its tables (rows of cell texts) by the <h2> they are under, and
    the src of each <img>."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.cells, self.imgs, self.captions = [], [], [], []
        self.tables: list[tuple[str, list[list[str]]]] = []
        self._text: list[str] | None = None
        self._h2 = ""
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("td", "th", "h2", "figcaption"):
            self._text = []
        elif tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables.append((self._h2, []))
        elif tag == "tr":
            self.tables[-1][1].append([])

    def handle_endtag(self, tag):
        if tag not in ("td", "th", "h2", "figcaption"):
            return
        text, self._text = "".join(self._text).strip(), None
        if tag == "h2":
            self._h2 = text
        elif tag == "figcaption":
            self.captions.append(text)
        else:
            self.cells.append(text)
            self.tables[-1][1][-1].append(text)

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def table(self, section: str, first_header: str) -> list[list[str]]:
        """The rows (header first) of the table under <h2>`section`</h2> whose header starts with `first_header`."""
        return next(rows for h2, rows in self.tables if h2 == section and rows[0][0] == first_header)


def markdown_cells(text: str) -> list[str]:
    """The cells of every pipe-table row of `text` (separator rows left out), as the page shows them: without
    the ** and ` of Markdown, an escaped \\| as |."""
    cells = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            continue
        for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1]):
            cells.append(re.sub(r"\*\*|`", "", cell.strip()).replace("\\|", "|"))
    return cells


def read_page(root) -> tuple[str, Page]:
    text = (root / report_html.NAME).read_text(encoding="utf-8")
    return text, Page(text)


def decoded(page: Page) -> list[bytes]:
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in page.imgs), page.imgs
    return [base64.b64decode(src[len(prefix):], validate=True) for src in page.imgs]


@pytest.fixture(autouse=True)
def without_paper_figures(monkeypatch):
    """No paper figure (launch.figures draws none for these hand-made runs without logits), so that these tests
    see only the figures they give."""
    monkeypatch.setattr(collect, "make_figures", lambda root, fmt, skipped: [])


@pytest.fixture
def fake_pngs(monkeypatch):
    """Reliability overlays as a few distinct bytes each instead of matplotlib's drawing: the page only embeds them."""
    monkeypatch.setattr(collect, "reliability_overlay", lambda curves, path, title: path.write_bytes(PNG + path.name
                                                                                                     .encode()))


def figures_module(monkeypatch, make_figures):
    """Install `make_figures` as the papers' figures collect draws; returns the calls it gets."""
    calls = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return make_figures(*args, **kwargs)

    monkeypatch.setattr(collect, "make_figures", recording)
    return calls


@pytest.fixture
def paper_root(tmp_path):
    """test_collect_paper's cskd2020 Table 1 grid: the paper's numbers beside ours, at both epochs."""
    t1 = tmp_path / "paper"
    test_collect_paper.grid(t1, "t1", test_collect_paper.table1_runs(t1), {"paper": "cskd2020", "table": "1"})
    return t1


@pytest.fixture
def ensembled_root(root, monkeypatch):
    """`root` with an ensembles section: each run keeps test logits (empty files here), and each group's ensemble
    scores 10 + its number of runs on every metric (test_collect's ensemble tests compute real ones, which takes
    torch a second to warm up)."""
    for path in root.rglob("summary.json"):
        (path.parent / "test_logits.pt").touch()
        (path.parent / "best_test_logits.pt").touch()
    monkeypatch.setattr(collect, "ensemble_runs", lambda dirs, epoch: dict.fromkeys(collect.ENSEMBLE_METRICS,
                                                                                     10.0 + len(dirs)))
    return root


@pytest.mark.parametrize("fixture", ["root", "paper_root", "ensembled_root"])
def test_every_table_cell_of_results_md_is_a_cell_of_the_page(fixture, request, fake_pngs):
    root = request.getfixturevalue(fixture)
    report = collect.make_report(root)
    assert root / report_html.NAME in report.written
    text, page = read_page(root)
    cells = markdown_cells((root / "results.md").read_text())
    assert len(cells) > 10 and set(cells) <= set(page.cells), set(cells) - set(page.cells)
    assert [tag for tag in page.tags if tag in ("h1", "h2")] == ["h1", "h2", "h2", "h2", "h2"]
    assert [h2 for h2, _ in page.tables][:1] == ["Tables"]
    # self-contained: no script, no other file or URL, the bytes plain ASCII (non-ASCII as character references)
    assert text.startswith("<!DOCTYPE html>\n") and '<meta charset="utf-8">' in text and "<style>" in text
    assert "script" not in page.tags and "link" not in page.tags and "href" not in text
    assert re.findall(r'src="(?!data:image/png;base64,)', text) == [] and "http" not in text
    assert (root / report_html.NAME).read_bytes().isascii()
    if fixture == "paper_root":  # ours vs the paper's, final and best, with the flag
        assert "36.50±0.50 n=3 vs 33.28±0.99 (+3.22) ⚠" in page.cells
        assert "35.50±0.50 n=3 vs 33.28±0.99 (+2.22) ⚠" in page.cells
    if fixture == "ensembled_root":  # mnist5k / small_cnn: ce of 2 runs (12), cskd of 3 (13, +8.3%)
        assert "13.00 (+8.3%) n=3" in page.cells and "Ensembles (average of the seeds' softmax)" in unescape(text)


def test_the_other_epochs_plain_tables_are_on_the_page(root, fake_pngs):
    best = "1.50±1.00 (-25.0%) n=3"  # cskd on mnist5k at the best epoch (test_collect.test_best_epoch)
    final = "2.00±1.00 (-20.0%) n=3"
    collect.report(root)
    md = (root / "results.md").read_text()
    text, page = read_page(root)
    assert best not in md and best in page.cells and final in page.cells
    assert "Plain tables at the best epoch" in text
    assert "small_cnn</strong> — top1_err (%), best epoch" in unescape(text)
    collect.report(root, epoch="best")
    text, page = read_page(root)
    assert final not in (root / "results.md").read_text() and final in page.cells and best in page.cells
    assert "Plain tables at the final epoch" in text


def test_every_figure_is_embedded_once_with_its_bytes(root, tmp_path, monkeypatch):
    pngs = {name: tmp_path / f"{name}.png" for name in ("fig2a", "fig2b", "fig1")}
    for name, path in pngs.items():
        path.write_bytes(PNG + name.encode() * 100)
    figures = [Figure("cskd_fig2", "<b>a</b>", pngs["fig2a"], "top1 & ECE"), Figure("pskd_fig1", "one", pngs["fig1"]),
               Figure("cskd_fig2", "b", pngs["fig2b"], "second")]
    calls = figures_module(monkeypatch, lambda root, fmt, skipped: figures)
    report = collect.make_report(root)  # the real reliability overlays, drawn by matplotlib
    assert calls == [((root,), {"fmt": "png", "skipped": []})]
    reliability = sorted(root.glob("reliability_*.png"))
    assert len(reliability) == 3 and set(reliability) <= set(report.written)
    text, page = read_page(root)
    expected = [p.read_bytes() for p in [*pngs.values(), *reliability]]
    assert Counter(decoded(page)) == Counter(expected) and len(set(expected)) == len(expected) == 6
    assert text.index("<h3>cskd_fig2</h3>") < text.index("<h3>pskd_fig1</h3>") < text.index("<h3>reliability</h3>")
    assert page.captions[:3] == ["<b>a</b> — top1 & ECE", "b — second", "one"]  # grouped by name, escaped
    assert "mnist5k_small_cnn — each method's final-epoch reliability bins" in page.captions[-1]


def test_a_figure_that_cannot_be_read_is_named_in_its_place(root, tmp_path, fake_pngs, monkeypatch):
    figures_module(monkeypatch, lambda root, fmt, skipped: [Figure("cskd_fig2", "gone", tmp_path / "gone.png")])
    assert collect.main([str(root)]) == 0
    _, page = read_page(root)
    assert len(page.imgs) == 3 and page.captions[0].startswith(f"gone (cannot read {tmp_path / 'gone.png'}: ")


@pytest.mark.parametrize("error", [OSError("disk full"), ValueError("bad bins"), collect.RunDirError("no logits")])
def test_figures_that_cannot_be_made_are_one_warning(root, fake_pngs, monkeypatch, capsys, error):
    def failing(root, fmt, skipped):
        raise error

    figures_module(monkeypatch, failing)
    assert collect.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert out == (root / "results.md").read_text()
    assert err.splitlines() == [f"warning: the papers' figures are left out of report.html: {error}"]
    assert len(read_page(root)[1].imgs) == 3  # the reliability overlays still are


def test_figures_not_drawn_are_listed_with_their_reasons(root, fake_pngs, monkeypatch, capsys):
    def partly(root, fmt, skipped):
        skipped.append("cskd_fig3 mnist5k/small_cnn: needs runs of at least two of ce, vsoftmax, adacos, cskd <x>")
        return []

    figures_module(monkeypatch, partly)
    assert collect.main([str(root)]) == 0 and capsys.readouterr().err == ""
    text, page = read_page(root)
    assert "<h3>Not drawn</h3>" in text and "adacos, cskd &lt;x&gt;</li>" in text and len(page.imgs) == 3


def test_runs_table_counts_per_state(root, fake_pngs):
    collect.report(root)
    # as test_collect.test_status_counts: seed3 of mnist5k cskd missing, one cifar100 cskd failed, one running
    assert read_page(root)[1].table("Runs", "grid (path)") == [
        ["grid (path)", "done", "pending", "running", "failed", "cancelled", "missing", "total"],
        ["t (.)", "9", "0", "1", "1", "0", "1", "12"],
        ["u (u)", "2", "0", "0", "0", "0", "0", "2"]]


def with_raw(run_dir, **fields):
    """Add (or, with None, remove) fields of a run's summary.json."""
    path = run_dir / "summary.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


def test_machines_table(tmp_path, fake_pngs):
    root = tmp_path / "runs"
    for seed in range(3):
        with_raw(add_run(root, "cifar100", "resnet18", "cskd", seed, final=30.0, best=29.0, device="H200 x2"),
                 world_size=2, wall_s=1800.0)
    with_raw(add_run(root, "mnist5k", "small_cnn", "ce", 0, final=2.0, best=1.0, device="cpu x1"), world_size=1,
             wall_s=900.0)
    with_raw(add_run(root, "d", "m", "ce", 0, final=2.0, best=1.0, device="cpu x1"), world_size=1)
    add_run(root, "d", "m", "ce", 1, final=2.0, best=1.0, device="cpu x1")  # no world_size, no wall_s
    # a grid of two of the runs: the table is of every finished run, in a grid or not
    manifest(root, "g", ["cifar100/resnet18/cskd/seed0", "cifar100/resnet18/cskd/seed1"])
    collect.report(root)
    assert read_page(root)[1].table("Machines", "device") == [
        ["device", "world size", "runs", "datasets / models", "wall hours"],
        ["H200 x2", "2", "3", "cifar100 / resnet18", "1.50"],
        ["cpu x1", "1", "2", "d / m, mnist5k / small_cnn", "0.25 + ? (1 run(s) without wall_s)"],
        ["cpu x1", "?", "1", "d / m", "?"]]


def test_text_from_runs_is_escaped(tmp_path, fake_pngs):
    root = tmp_path / "<i>root&"
    label, device = '<script>alert("label")</script>', "<script>alert('device')</script>"
    with_raw(add_run(root, "d", "m", "ce", 0, final=2.0, best=1.0, device=device), label=label)
    with_raw(add_run(root, "d", "m", "ce", 1, final=3.0, best=1.0), label=label)
    add_run(root, "d", "<img src=x>", "ce", 2)  # a started run: its path is in the not-done list
    collect.report(root)
    text, page = read_page(root)
    assert "script" not in page.tags and "i" not in page.tags and "<script" not in text.lower() and "<i>" not in text
    assert text.count("<img") == len(page.imgs) == 1  # the reliability overlay's, none from a name
    assert label in page.cells and device == page.table("Machines", "device")[1][0]
    assert "<title>&lt;i&gt;root&amp;</title>" in text
    assert "d/&lt;img src=x&gt;/ce/seed2" in text


def test_a_report_html_that_cannot_be_written_is_one_warning(root, fake_pngs, capsys):
    """report.html cannot be replaced (a directory stands where it goes: the OSError of a read-only dir, which
    root would not get): the report is printed and results.md written, one warning names report.html."""
    (root / report_html.NAME).mkdir()
    assert collect.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert out == (root / "results.md").read_text() and "2.00±1.00 (-20.0%) n=3" in out
    assert err.splitlines() == [f"warning: could not write {root / report_html.NAME} (Is a directory); the report "
                                f"is printed only"]
    report = collect.make_report(root)
    assert root / "results.md" in report.written and root / report_html.NAME not in report.written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_read_only_root_prints_the_report_and_exits_0(root, fake_pngs, capsys):
    collect.main([str(root)])
    capsys.readouterr()
    os.chmod(root, 0o555)
    try:
        assert collect.main([str(root)]) == 0
        out, err = capsys.readouterr()
    finally:
        os.chmod(root, 0o755)
    assert "2.00±1.00 (-20.0%) n=3" in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: could not write {root / 'results.md'}, "), err
    assert str(root / report_html.NAME) in lines[0] and "(Permission denied)" in lines[0]
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
