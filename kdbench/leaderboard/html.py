"""index.html: the leaderboard as one self-contained page (inline CSS and JavaScript, SVG plots,
nothing fetched; it works from ``file://``).

Everything it shows comes from what :func:`kdbench.leaderboard.tables.build_tables` computed:
the cell texts, the notes under each table and the teachers' diagnostics are the markdown's own
text (parsed back out of it, so the page and ``leaderboard.md`` cannot disagree), and the numbers
the page sorts and plots by (mean, interval, paper and published numbers, best and tied rows)
are the long-form CSV rows. No statistic is computed here. The runs behind every cell (the
frames of :func:`kdbench.leaderboard.records.collect`) are listed with their status, their
per-epoch curves (read from each ``record.json``), a relative link to the record and the
command that trains them again. ``assets/page.html`` is the page around them, its script
(``page.js``) sorts the tables and draws a run's curves when its cell is opened.
"""
from __future__ import annotations

import html
import json
import math
import numbers
import os
import re
from importlib import resources
from pathlib import Path

import pandas as pd

from kdbench.leaderboard.common import MARK_DOWN, MARK_TIED, MARK_UP
from kdbench.store import atomic_write_bytes

# Per-epoch series the curves show: (record key, chart, split).
CURVES = (("train_top1", "top1", "train"), ("val_top1", "top1", "val"), ("test_top1", "top1", "test"),
          ("train_loss", "loss", "train"), ("val_loss", "loss", "val"), ("test_loss", "loss", "test"))
STATUS_TEXT = {"done": "done", "failed": "failed", "diverged": "diverged", "interrupted": "interrupted"}


def write_html(path: Path, runs_dir: Path, tables: list, df: pd.DataFrame, tdf: pd.DataFrame,
               metric: str, unreadable: list[tuple[str, str]] | None = None) -> Path:
    """Writes the page for ``tables`` (build_tables' output at ``metric``) to ``path``;
    ``unreadable`` (path, why) are the records left out, listed above the tables as in the
    markdown, so that a row never vanishes from the page without a word either."""
    path, runs_dir = Path(path), Path(runs_dir)
    runs: dict[str, dict] = {}
    sections = [_section(i, title, md, rows, df, tdf, metric, runs_dir, path.parent, runs)
                for i, (title, md, rows) in enumerate(tables)]
    assets = resources.files("kdbench.leaderboard").joinpath("assets")
    fill = {
        "css": assets.joinpath("page.css").read_text(encoding="utf-8"),
        "js": assets.joinpath("page.js").read_text(encoding="utf-8"),
        "runs_dir": _e(str(runs_dir)), "metric": _e(metric),
        "toc": "".join(f'<li><a href="#t{i}">{_e(t)}</a></li>' for i, (t, _, _) in enumerate(tables)),
        "unreadable": _unreadable_html(unreadable or []),
        "sections": "\n".join(sections),
        # "</" cannot end the script element early inside a JSON string.
        "data": json.dumps(runs, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")}
    # Placeholders filled in one pass (the CSS and the script are full of braces).
    template = assets.joinpath("page.html").read_text(encoding="utf-8")
    page = re.sub(r"@@(\w+)@@", lambda m: fill[m.group(1)], template)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _unreadable_html(bad: list[tuple[str, str]]) -> str:
    if not bad:
        return ""
    items = "".join(f"<li><code>{_e(p)}</code>: {_e(why)}</li>" for p, why in bad)
    return (f'<section class="unreadable"><p class="bad">{len(bad)} record(s) cannot be used and '
            "are left out (<code>kdbench run</code> trains those runs again, keeping the bad file "
            f"beside as <code>record.json.corrupt-&lt;time&gt;</code>):</p><ul>{items}</ul></section>")


# ------------------------------------------------------------------ the markdown, read back
def _parse_md(md: str) -> dict:
    """The parts of one table's markdown (tables.build_tables' layout): the intro, the pair
    columns, each row's cell texts, the paragraphs under the table, the diagnostics table."""
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| Method |"))
    out = {"intro": " ".join(ln for ln in lines[1:head] if ln.strip()),
           "pairs": _md_cells(lines[head])[1:], "rows": {}, "notes": [], "diag": None}
    i = head + 2
    while i < len(lines) and lines[i].startswith("|"):
        cells = _md_cells(lines[i])
        out["rows"][cells[0]] = cells[1:]
        i += 1
    rest = lines[i:]
    for j, ln in enumerate(rest):
        if ln.startswith("|"):  # the diagnostics table (its caption is the paragraph before it)
            block = [r for r in rest[j:] if r.startswith("|")]
            caption = out["notes"].pop() if out["notes"] else ""
            out["diag"] = (caption, _md_cells(block[0]), [_md_cells(r) for r in block[2:]])
            break
        if ln.strip():
            out["notes"].append(ln)
    return out


def _md_cells(line: str) -> list[str]:
    """A table line's cells; ``\\|`` is a ``|`` inside a cell (tables.py escapes them)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def _inline(text: str) -> str:
    """The markdown's inline marks (**bold**, `code`) as HTML, the rest escaped."""
    text = _e(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


# ------------------------------------------------------------------ one table
def _section(i: int, title: str, md: str, rows: list, df, tdf, metric: str, runs_dir: Path,
             out_dir: Path, runs: dict) -> str:
    parsed = _parse_md(md)
    pairs = parsed["pairs"]
    long = {(r["row"], r["pair"]): r for r in rows if r["metric"] == metric}
    group, dataset = rows[0]["group"], rows[0]["dataset"]
    sdf = df[(df["group"] == group) & (df["dataset"] == dataset)]
    stdf = tdf[(tdf["group"] == group) & (tdf["dataset"] == dataset)] if len(tdf) else tdf
    lit_keys = [k[4:] for k in rows[0] if k.startswith("lit_") and not k.endswith(("_spread", "_delta"))]

    head = "".join(f'<th class="num" data-sort="num" title="sort by the mean of {_e(p)}">{_e(p)}</th>'
                   for p in pairs)
    teachers, students = [], []
    for label, cells in parsed["rows"].items():
        tds = []
        for j, (pair, text) in enumerate(zip(pairs, cells)):
            lr = long.get((label, pair), {})
            classes = ["num"] + [c for c, on in (("best", lr.get("is_best") is True),
                                                 ("tied", lr.get("tied_with_best") is True
                                                  and lr.get("is_best") is not True)) if on]
            value = _num(lr.get("mean"))
            tds.append(f'<td class="{" ".join(classes)}" data-v="{"" if value is None else value}">'
                       f'<a class="cell" href="#c{i}-{_slug(label)}-{j}" '
                       f'title="{_e(_comparison(lr) or "no paired comparison")}; click for the runs">'
                       f'{_cell_html(text)}</a></td>')
        tr = f'<tr><th scope="row">{_e(label)}</th>{"".join(tds)}</tr>'
        (teachers if label.startswith("Teacher (") else students).append(tr)
    table = (f'<table class="lb sortable" id="lb{i}"><thead><tr><th data-sort="text" '
             f'title="sort by name">Method</th>{head}</tr></thead>'
             f'<tbody class="pinned">{"".join(teachers)}</tbody>'
             f'<tbody class="sorted">{"".join(students)}</tbody></table>')

    plots = "".join(_ci_plot(pair, [long.get((label, pair), {}) for label in parsed["rows"]],
                             list(parsed["rows"]), lit_keys) for pair in pairs)
    notes = "".join(f"<p>{_inline(n)}</p>" for n in parsed["notes"])
    diag = _diag_html(parsed["diag"], i) if parsed["diag"] else "<p>No teacher diagnostics recorded.</p>"
    cells_html, counts = [], {}
    for label in parsed["rows"]:
        frame = stdf if label.startswith("Teacher (") else sdf
        for j, pair in enumerate(pairs):
            recs = frame[(frame["row"] == label) & (frame["pair"] == pair)] if len(frame) else frame
            cells_html.append(_cell_runs(f"c{i}-{_slug(label)}-{j}", label, pair, recs, runs_dir,
                                         out_dir, runs, counts, _comparison(long.get((label, pair), {}))))
    bad = [f'<a href="#{a}">{_e(what)}</a>' for a, what in counts.pop("_bad", [])]
    rank = list(STATUS_TEXT)  # done first, then the ones that did not finish
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: (
        rank.index(kv[0]) if kv[0] in rank else len(rank), kv[0])))
    return f"""<section id="t{i}">
<h2>{_e(title)}</h2>
<p class="intro">{_inline(parsed["intro"])}</p>
{_MARKS_LEGEND}
{table}
<p class="hint">Click a column header to sort the method rows (teacher rows stay on top); click
a cell for its runs.</p>
<details class="notes" open><summary>Legend, baseline and detectable difference (as in leaderboard.md)</summary>{notes}</details>
<h3>Means and 95% intervals per pair</h3>
{_PLOT_LEGEND}
<div class="plots">{plots}</div>
<h3>Teacher diagnostics</h3>
{diag}
<h3>Runs</h3>
<p>Runs of this table: {summary or "none"}.{(" Not finished: " + ", ".join(bad) + ".") if bad else ""}
Each run's curves are top-1 and loss per epoch on the training batches (train: the run's whole
objective, every term weighted), the validation split (val) and the test set (test; cross-entropy).
Before the last epoch the test numbers may come from a subset of the test set (the record's
<code>evaluation</code>). The reproduce command trains the run again (a student with its teacher)
into a fresh folder; run it where the recipe path resolves.</p>
{_CURVE_LEGEND}
<div class="cells" style="grid-template-columns: repeat({len(pairs)}, minmax(0, 1fr))">{"".join(cells_html)}</div>
</section>"""


def _comparison(lr: dict) -> str:
    """The CSV row's paired comparisons, in words: with the baseline and with the best row."""
    out = []
    if lr.get("baseline_row") and _num(lr.get("diff")) is not None:
        lo, hi, p = _num(lr.get("diff_ci_low")), _num(lr.get("diff_ci_high")), _num(lr.get("p_holm"))
        out.append(f"vs baseline {lr['baseline_row']}: Δ {lr['diff']:+.2f}"
                   + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else "")
                   + f" over {lr.get('n_paired')} shared seeds"
                   + (f", p = {p:.3g} (Holm; {lr.get('p_test')})" if p is not None else ", not tested"))
    if lr.get("best_row") and _num(lr.get("diff_best")) is not None:
        p = _num(lr.get("p_best_holm"))
        out.append(f"vs the best row {lr['best_row']}: Δ {lr['diff_best']:+.2f} over "
                   f"{lr.get('n_paired_best')} shared seeds"
                   + (f", p = {p:.3g} (Holm)" if p is not None else ", not tested"))
    return "; ".join(out)


def _cell_html(text: str) -> str:
    """One markdown cell as HTML, character for character the same text: the mean, then the
    spread, interval and n on a second line, the marks, each reference on its own line."""
    text = text[2:-2] if text.startswith("**") and text.endswith("**") else text
    main, *refs = text.split(" · ")
    m = re.match(r"^(—|-?\d+\.\d+)( ± \S+)?( \[[^\]]*\])?( \(n=\d+\))?(.*)$", main)
    if m:
        mean, sd, ci, n, rest = (g or "" for g in m.groups())
        out = (f'<span class="mean">{_e(mean)}</span><span class="sd">{_e(sd)}</span>'
               f'<span class="ci">{_e(ci)}{_e(n)}{_marks_html(rest)}</span>')
    else:
        out = _marks_html(main)
    # The separator stays in the text (the cell reads as the markdown's), hidden: a line each.
    return out + "".join(f'<span class="ref"><span class="sep"> · </span>{_e(r)}</span>' for r in refs)


def _marks_html(text: str) -> str:
    out = _e(text)
    for mark, cls in ((MARK_UP, "up"), (MARK_DOWN, "down"), (MARK_TIED, "tiedmark")):
        out = out.replace(mark, f'<span class="mark {cls}">{mark}</span>')
    return re.sub(r"(\(\d+ (?:failed|diverged|interrupted)\))", r'<span class="bad">\1</span>', out)


def _breakable(name: str) -> str:
    """A column name that may wrap after its ``_`` and ``.`` (``d_intra_over_inter``)."""
    return re.sub(r"([_.])", r"\1<wbr>", _e(name))


def _diag_html(diag: tuple, i: int) -> str:
    caption, head, body = diag
    ths = "".join(f'<th data-sort="{"text" if j < 2 else "num"}"'
                  f'{" class=num" if j >= 2 else ""}>{_breakable(h)}</th>' for j, h in enumerate(head))
    trs = []
    for row in body:
        tds = "".join(f'<td>{_e(c)}</td>' if j < 2 else
                      f'<td class="num" data-v="{_num(_float(c)) or ""}">{_e(c)}</td>'
                      for j, c in enumerate(row))
        trs.append(f"<tr>{tds}</tr>")
    return (f'<p>{_inline(caption)}</p><table class="diag sortable" id="diag{i}"><thead><tr>{ths}</tr></thead>'
            f'<tbody class="sorted">{"".join(trs)}</tbody></table>')


# ------------------------------------------------------------------ the CI plot of one pair
def _ci_plot(pair: str, cells: list[dict], labels: list[str], lit_keys: list[str]) -> str:
    """Every row's mean (dot; teachers a square) with its 95% interval (bar), the paper's number
    (diamond) and the published ones (triangle); the best row filled darker, tied rows ringed."""
    items = [(lbl, c) for lbl, c in zip(labels, cells) if _num(c.get("mean")) is not None]
    if not items:
        return f'<figure class="ci-plot"><figcaption>{_e(pair)}</figcaption><p>no finished runs</p></figure>'
    vals = []
    for _, c in items:
        vals += [v for k in ("mean", "ci_low", "ci_high", "paper") if (v := _num(c.get(k))) is not None]
        vals += [v for k in lit_keys if (v := _num(c.get(f"lit_{k}"))) is not None]
    lo, hi = min(vals), max(vals)
    pad = max((hi - lo) * 0.06, 0.5)
    lo, hi = lo - pad, hi + pad
    ticks = _ticks(lo, hi)
    label_w = min(180, 12 + 6.6 * max(len(lbl) for lbl, _ in items))
    width, row_h, top = 440, 18, 8
    plot_w = width - label_w - 12
    height = top + row_h * len(items) + 30
    x = lambda v: label_w + plot_w * (v - lo) / (hi - lo)  # noqa: E731
    parts = [f'<line class="axis" x1="{label_w:.1f}" x2="{width - 12}" y1="{height - 26}" y2="{height - 26}"/>']
    for t in ticks:
        parts.append(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top - 4}" y2="{height - 26}"/>'
                     f'<text class="tick" x="{x(t):.1f}" y="{height - 13}">{t:g}</text>')
    parts.append(f'<text class="tick end" x="{width - 12}" y="{height - 1}">top-1 (%)</text>')
    for k, (label, c) in enumerate(items):
        y = top + row_h * k + row_h / 2
        teacher = c.get("kind") == "teacher"
        best, tied = c.get("is_best") is True, c.get("tied_with_best") is True and c.get("is_best") is not True
        cls = "teacher" if teacher else "best" if best else "tied" if tied else "student"
        mean, n = _num(c["mean"]), c.get("n")
        parts.append(f'<text class="rowlabel{" b" if best else ""}" x="{label_w - 6:.1f}" y="{y + 4:.1f}">'
                     f'{_e(_short(label))}<title>{_e(label)}</title></text>')
        cl, ch = _num(c.get("ci_low")), _num(c.get("ci_high"))
        tip = f"{label}: mean {mean:.2f}" + (f", 95% CI [{cl:.2f}, {ch:.2f}]" if cl is not None else "") + f", n={n}"
        if cl is not None and ch is not None:
            parts.append(f'<g class="ci {cls}"><line x1="{x(cl):.1f}" x2="{x(ch):.1f}" y1="{y:.1f}" y2="{y:.1f}"/>'
                         f'<line x1="{x(cl):.1f}" x2="{x(cl):.1f}" y1="{y - 4:.1f}" y2="{y + 4:.1f}"/>'
                         f'<line x1="{x(ch):.1f}" x2="{x(ch):.1f}" y1="{y - 4:.1f}" y2="{y + 4:.1f}"/>'
                         f'<title>{_e(tip)}</title></g>')
        if teacher:
            parts.append(f'<rect class="mean {cls}" x="{x(mean) - 4:.1f}" y="{y - 4:.1f}" width="8" height="8">'
                         f'<title>{_e(tip)}</title></rect>')
        else:
            parts.append(f'<circle class="mean {cls}" cx="{x(mean):.1f}" cy="{y:.1f}" r="4.5">'
                         f'<title>{_e(tip)}</title></circle>')
        ref = _num(c.get("paper"))
        if ref is not None:
            parts.append(f'<path class="ref paper" d="M{x(ref):.1f},{y - 5.5:.1f} l5.5,5.5 l-5.5,5.5 l-5.5,-5.5 z">'
                         f'<title>{_e(f"{label}: paper {ref:.2f}")}</title></path>')
        for key in lit_keys:
            v = _num(c.get(f"lit_{key}"))
            if v is not None:
                parts.append(f'<path class="ref lit" d="M{x(v):.1f},{y - 5:.1f} l4.5,8.5 l-9,0 z">'
                             f'<title>{_e(f"{label}: published ({key}) {v:.2f}")}</title></path>')
    return (f'<figure class="ci-plot"><figcaption>{_e(pair)}</figcaption>'
            f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" '
            f'aria-label="{_e(f"means and 95% intervals, {pair}")}">{"".join(parts)}</svg></figure>')


def _ticks(lo: float, hi: float, want: int = 5) -> list[float]:
    raw = (hi - lo) / want
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step) + 1)]


# ------------------------------------------------------------------ the runs of one cell
def _cell_runs(anchor: str, label: str, pair: str, recs: pd.DataFrame, runs_dir: Path,
               out_dir: Path, runs: dict, counts: dict, comparison: str) -> str:
    items = [f'<p class="compare">{_e(comparison)}.</p>'] if comparison else []
    # Seeds in numeric order (a teacher record without one has its id in their place).
    order = sorted(range(len(recs)), key=lambda k: (
        (0, recs["seed"].iloc[k], "") if isinstance(recs["seed"].iloc[k], numbers.Real)
        else (1, 0, str(recs["seed"].iloc[k])), str(recs["run_id"].iloc[k])))
    for r in recs.iloc[order].itertuples():
        status = str(r.status)
        counts[status] = counts.get(status, 0) + 1
        if status != "done":
            counts.setdefault("_bad", []).append((anchor, f"{label} · {pair} · seed {r.seed} ({status})"))
        items.append(_run_html(r, status, runs_dir, out_dir, runs))
    n_bad = sum(1 for r in recs.itertuples() if r.status != "done")
    tag = f' <span class="bad">({n_bad} not done)</span>' if n_bad else ""
    return (f'<details class="cellruns" id="{anchor}"><summary>{_e(label)} · {_e(pair)} '
            f'<span class="count">{len(recs)} run{"s" if len(recs) != 1 else ""}</span>{tag}</summary>'
            f'<div class="runs">{"".join(items) or "<p>no runs</p>"}</div></details>')


def _run_html(r, status: str, runs_dir: Path, out_dir: Path, runs: dict) -> str:
    rec_path = Path(r.where) if os.path.isabs(str(r.where)) else runs_dir / r.where
    rec_path = rec_path / "record.json"
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        rec = {}
    href = Path(os.path.relpath(rec_path.resolve(), out_dir.resolve())).as_posix()
    epochs = [e for e in rec.get("epochs") or [] if isinstance(e, dict)]
    series = {"epoch": [e.get("epoch") for e in epochs]}
    for key, _, _ in CURVES:
        if any(key in e for e in epochs):
            series[key] = [_num(e.get(key), 5) for e in epochs]
    runs[r.run_id] = series
    why = ""
    if status == "failed":
        why = f'<div class="why">error: {_e(str(rec.get("error", "")))}</div>'
    elif status == "diverged" and isinstance(rec.get("diverged"), dict):
        d = rec["diverged"]
        why = f'<div class="why">non-finite loss in epoch {_e(str(d.get("epoch")))}, step {_e(str(d.get("step")))}</div>'
    elif status == "interrupted" and isinstance(rec.get("interrupted"), dict):
        d = rec["interrupted"]
        why = (f'<div class="why">stopped by {_e(str(d.get("signal")))} in epoch {_e(str(d.get("epoch")))}, '
               f'step {_e(str(d.get("step")))}; the same command resumes it</div>')
    final, best = _num(r.final), _num(r.best)
    result = (f'final {final:.2f}' if final is not None else "no result") + \
        (f' · best {best:.2f} (epoch {_e(str((rec.get("best") or {}).get("epoch")))})' if best is not None else "")
    ids = [t for t in (rec.get("teacher_id"),) if t] + [r.run_id]
    cmd = (f'kdbench run {rec.get("recipe", "RECIPE")} --output repro '
           + " ".join(f"--run-id {x}" for x in ids))
    curves = (f'<div class="curves" data-run="{_e(r.run_id)}"></div>' if epochs else
              '<p class="hint">no epochs recorded</p>')
    return (f'<div class="run status-{_e(status)}"><div class="runhead">'
            f'<span class="badge {_e(status)}">{_e(STATUS_TEXT.get(status, status))}</span> '
            f'seed {_e(str(r.seed))} · <code>{_e(r.run_id)}</code> · {result} · '
            f'<a href="{_e(href)}">record.json</a></div>{why}'
            f'<div class="cmd"><code>{_e(cmd)}</code></div>{curves}</div>')


# ------------------------------------------------------------------ small helpers
def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _num(v, digits: int | None = None) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    return float(f"{f:.{digits}g}") if digits else f


def _float(text: str) -> float | None:
    return _num(text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "row"


def _short(label: str, n: int = 26) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _swatch(svg: str) -> str:
    return f'<svg class="sw" viewBox="0 0 22 14" width="22" height="14" aria-hidden="true">{svg}</svg>'


_MARKS_LEGEND = ('<p class="legend">Cells: <span class="mean">mean</span> ± sample std, [95% CI] (n '
                 'distinct seeds); <span class="best-sw">bold, tinted</span>: the best student '
                 f'mean of the column; <span class="mark up">{MARK_UP}</span>/<span class="mark down">'
                 f'{MARK_DOWN}</span>: significantly higher/lower than the baseline; '
                 f'<span class="mark tiedmark">{MARK_TIED}</span>: cannot be told apart from the '
                 'best row; <span class="bad">(n failed)</span>: runs left out; '
                 '"paper"/"lit.": the reference numbers and Δ.</p>')
_PLOT_LEGEND = ('<p class="legend">'
                + _swatch('<circle class="mean student" cx="11" cy="7" r="4.5"/>') + ' student mean '
                + _swatch('<circle class="mean best" cx="11" cy="7" r="4.5"/>') + ' best row '
                + _swatch('<circle class="mean tied" cx="11" cy="7" r="4.5"/>') + ' tied with the best '
                + _swatch('<rect class="mean teacher" x="7" y="3" width="8" height="8"/>') + ' teacher '
                + _swatch('<g class="ci student"><line x1="2" x2="20" y1="7" y2="7"/><line x1="2" x2="2" y1="3" y2="11"/>'
                          '<line x1="20" x2="20" y1="3" y2="11"/></g>') + ' 95% CI (n ≥ 2) '
                + _swatch('<path class="ref paper" d="M11,1.5 l5.5,5.5 l-5.5,5.5 l-5.5,-5.5 z"/>') + ' paper '
                + _swatch('<path class="ref lit" d="M11,2 l4.5,8.5 l-9,0 z"/>') + ' published (lit.)</p>')
_CURVE_LEGEND = ('<p class="legend">Curves: '
                 + _swatch('<line class="s-train" x1="1" x2="21" y1="7" y2="7"/>') + ' train '
                 + _swatch('<line class="s-val" x1="1" x2="21" y1="7" y2="7"/>') + ' val '
                 + _swatch('<line class="s-test" x1="1" x2="21" y1="7" y2="7"/>') + ' test; the loss '
                 'axis is logarithmic when the losses span more than a factor 20.</p>')
