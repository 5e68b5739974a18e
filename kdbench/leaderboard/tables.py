"""The markdown tables, one per (recipe group, dataset), with their long-form CSV rows; the
paper's reference numbers; the teachers' diagnostics table."""
from __future__ import annotations

import csv
import math
from importlib import resources
from pathlib import Path

import pandas as pd

from kdbench.leaderboard.cells import _bad_note, _cell_text, _legend, _long_row, _marks, _mde_line
from kdbench.leaderboard.common import METRICS, _present
from kdbench.leaderboard.comparisons import _baseline_rows, _column_stats, _Row, _selection
from kdbench.leaderboard.literature_cells import _Lit, _lit_text


def _md(text) -> str:
    """A table cell's text: a ``|`` in a label (or anything else) would end the cell."""
    return str(text).replace("|", "\\|")


def load_reference(file: str | None = None) -> dict[tuple, float]:
    if file:
        text = Path(file).read_text()
    else:
        text = resources.files("kdbench").joinpath("references/paper-tables.csv").read_text()
    rows = csv.DictReader(text.splitlines())
    return {(r["table"], r["dataset"], r["teacher"], r["student"], r["method"]): float(r["top1"])
            for r in rows}


def build_tables(df: pd.DataFrame, tdf: pd.DataFrame, metric: str,
                 reference_file: str | None = None, notes: dict | None = None,
                 literature_sources: list[str] | None = None):
    """Returns [(title, markdown, long-form rows)] per table; the markdown is at ``metric``, the
    long-form rows hold both metrics (column ``metric``). ``literature_sources`` shows those
    published sources beside every table's cells instead of the ones its records name."""
    notes = notes or {}
    ref = None
    out = []
    for (group, dataset), sub in df.groupby(["group", "dataset"], sort=False):
        pairs = sub.sort_values("pair_order")["pair"].drop_duplicates().tolist()
        first = sub.iloc[0]
        reference = first["reference"] if isinstance(first["reference"], dict) else None
        paper = reference if reference and _present(reference.get("table")) else None
        if paper and ref is None:
            ref = load_reference(reference_file or paper.get("file"))
        lit = _Lit.build(reference, sub, pairs, literature_sources)
        # A row's place is the one its newest record has: the same runs trained by an older
        # version of the recipe, or by another recipe holding them, keep their old positions.
        newest = sub.sort_values(["mtime", "run_id"], kind="stable").groupby("row", sort=False).tail(1)
        row_order = newest.sort_values(["row_order", "objective_order"], kind="stable")["row"].tolist()
        tsub = tdf[(tdf["group"] == group) & (tdf["dataset"] == dataset)] if len(tdf) else tdf
        if len(tsub):  # the diagnostics table lists the pairs in column order
            tsub = tsub.sort_values(["pair_order", "objective_order"], kind="stable")
        teacher_rows = []
        for obj in (tsub["objective"].drop_duplicates() if len(tsub) else []):
            trows = tsub[tsub["objective"] == obj]
            # The reference table's teacher row is the one the recipe marks (ref_teacher =
            # true on the objective: the paper's teachers are CE-trained).
            is_ref = bool(trows["reference_row"].all())
            teacher_rows.append(_Row(f"Teacher ({obj})", trows, True, "teacher" if is_ref else None))
        student_rows = []
        for r in row_order:
            rs = sub[sub["row"] == r]
            obj = rs.iloc[0]["objective"]
            student_rows.append(_Row(r, rs, False, rs.iloc[0]["ref_method"],
                                     rs.iloc[0]["method_set"], obj if _present(obj) else None))
        rows = teacher_rows + student_rows
        baseline_of, baseline_note = _baseline_rows(student_rows, sub)
        columns = {(pair, m): _column_stats(rows, pair, m, baseline_of)
                   for pair in pairs for m in METRICS}
        selected_on, selection_note = _selection(pd.concat([sub, tsub]) if len(tsub) else sub)

        long_rows, lines = [], {}
        for r in rows:
            cells = []
            for pair in pairs:
                prow = r.records[r.records["pair"] == pair]
                refval = None
                if paper and len(prow):
                    srow = sub[sub["pair"] == pair].iloc[0]
                    if _present(r.method) and srow["ref_teacher"] and srow["ref_student"]:
                        refval = ref.get((paper["table"], paper["dataset"],
                                          srow["ref_teacher"], srow["ref_student"], r.method))
                published = lit.cell(r, pair) if lit and len(prow) else {}
                note = _bad_note(prow["status"])
                for m in METRICS:
                    long_rows.append(_long_row(group, dataset, r, pair, m, columns[(pair, m)],
                                               prow, note, refval, selected_on,
                                               lit.csv_columns(published, columns[(pair, m)]
                                                               .summaries[r.label].mean)
                                               if lit else {}))
                col = columns[(pair, metric)]
                s = col.summaries[r.label]
                text = _cell_text(s, note) if len(prow) else ""
                bold = (not r.is_teacher and col.best is not None
                        and s.mean == col.summaries[col.best].mean)
                text += _marks(r.label, col, bold) if not r.is_teacher else ""
                if refval is not None and s.mean is not None:
                    text += f" · paper {refval:.2f} (Δ {s.mean - refval:+.2f})"
                elif refval is not None:
                    text += f" · paper {refval:.2f}"
                if published:
                    text += _lit_text(published, s.mean)
                if bold:
                    text = f"**{text}**"
                cells.append(text)
            lines[r.label] = cells
        header = "| Method | " + " | ".join(map(_md, pairs)) + " |"
        sep = "|---|" + "---|" * len(pairs)
        body = [f"| {_md(lbl)} | " + " | ".join(map(_md, cells)) + " |" for lbl, cells in lines.items()]
        title = f"{group} — {dataset}"
        what = f"**{metric}** epoch" + (f" ({selection_note})" if metric == "best" else "")
        intro = (f"Top-1 accuracy (%) at the {what}, over distinct seeds."
                 + (f" Reference: {paper['table']} ({paper['dataset']}) of the paper; "
                    "Δ = ours − paper." if paper else "")
                 + (f" Published numbers of {', '.join(lit.keys)} beside each cell "
                    "(\"lit. SOURCE value (Δ = kdbench − published)\"; sources printing the "
                    "same number are listed together); their protocols under the table."
                    if lit else ""))
        below = [_legend(columns, pairs, metric, baseline_note, bool(baseline_of)),
                 _mde_line(columns, pairs, metric, baseline_of)]
        if lit:
            below.append(lit.note(metric, selection_note, sub, tsub))
        tnotes = notes.get((group, dataset), {})
        if tnotes.get("ids"):
            below.append("Run ids found in several folders (counted once each, a done record "
                         "preferred): " + "; ".join(tnotes["ids"]) + ".")
        if tnotes.get("seeds"):
            below.append("Several runs of one row, pair and seed (the newest counted): "
                         + "; ".join(tnotes["seeds"]) + ".")
        if tnotes.get("missing_teachers"):
            below.append("Teachers whose students are counted but whose record is missing or "
                         "cannot be used (their teacher row leaves them out): "
                         + "; ".join(tnotes["missing_teachers"]) + ".")
        md = "\n".join([f"## {title}", "", intro, "", header, sep, *body, "",
                        *[line + "\n" for line in below if line]])
        if len(tsub):
            md += "\n" + _diagnostics_table(tsub) + "\n"
        out.append((title, md, long_rows))
    return out

# Diagnostics shown in the teacher table (kdbench.diagnostics): accuracy, soft-label entropy and
# non-target mass at the distillation temperature, Section 4's distances and losses and Theorem
# 1's right-hand side for the normalised pooled feature φ, and ("f.", log space: f may be the
# unnormalised logits) for the representation the objective trained.
DIAGNOSTICS = ("top1", "entropy_T", "nontarget_mass_T", "d_intra", "d_inter", "d_intra_over_inter",
               "L_intra", "L_inter", "L_intra_over_inter", "theorem1_rhs",
               "f.log_d_intra_over_inter", "f.L_intra", "f.L_inter", "f.log_theorem1_rhs")


def _flat_diagnostics(d: dict) -> dict:
    """A record's diagnostics with the trained representation's under "f." keys."""
    trained = d.get("trained") if isinstance(d.get("trained"), dict) else {}
    return {**d, **{f"f.{k}": v for k, v in trained.items()}}


def _diagnostics_table(tsub: pd.DataFrame) -> str:
    rows = []
    for (pair, obj), g in tsub.groupby(["pair", "objective"], sort=False):
        diags = [_flat_diagnostics(d) for d in g["diagnostics"] if d]
        keys = [k for k in DIAGNOSTICS if diags and all(k in d for d in diags)]
        vals = {k: sum(d[k] for d in diags) / len(diags) for k in keys}
        fs = sorted({str(d["f.embedding"]) for d in diags if "f.embedding" in d})
        rows.append((pair, f"{obj} (f = {', '.join(fs)})" if fs else obj, len(g), vals))
    keys = [k for k in DIAGNOSTICS if any(k in v for *_, v in rows)]
    if not keys:
        return ""
    head = "| Teacher (pair) | Objective | n | " + " | ".join(keys) + " |"
    sep = "|---|---|---|" + "---|" * len(keys)
    body = [f"| {_md(p)} | {_md(o)} | {n} | " + " | ".join(f"{v.get(k, math.nan):.4g}" for k in keys) + " |"
            for p, o, n, v in rows]
    return "\n".join(["Teacher diagnostics (test set, mean over teachers; φ = the normalised pooled "
                      "feature, f. = the representation the objective trained, named beside the "
                      "objective; kdbench.diagnostics):", "", head, sep, *body])
