"""Result records -> pandas -> markdown and CSV tables, and a PNG plot.

One table per (recipe group, dataset), in the layout of the paper's tables: methods as rows,
teacher→student pairs as columns, mean ± std over seeds with n, the best student row per column
in bold, and — where the recipe names a reference table — the paper's number and the
difference. Teacher rows come first (one per teacher objective, showing the teachers the
students of that column actually used), then the method sets in recipe order (so a "Student"
set listed first comes right after the teachers). The paper's teacher numbers are those of the
CE-trained teacher: a recipe marks the objective whose teachers are that row with
``ref_teacher = true``, and only that row gets the paper's number. Each table
is followed by the teachers' soft-label diagnostics. ``leaderboard.png`` (needs matplotlib, the
``plot`` extra) plots every row's accuracy per pair with error bars.
"""
from __future__ import annotations

import csv
import math
import sys
from importlib import resources
from pathlib import Path

import pandas as pd

from kdbench.api import UserError
from kdbench.store import atomic_write_bytes, iter_records


def load_reference(file: str | None = None) -> dict[tuple, float]:
    if file:
        text = Path(file).read_text()
    else:
        text = resources.files("kdbench").joinpath("references/paper-tables.csv").read_text()
    rows = csv.DictReader(text.splitlines())
    return {(r["table"], r["dataset"], r["teacher"], r["student"], r["method"]): float(r["top1"])
            for r in rows}


def collect(runs_dir: Path, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    teachers, students = {}, []
    for rec in iter_records(runs_dir):
        if rec.get("kind") == "teacher":
            teachers[rec["id"]] = rec
        elif rec.get("kind") == "student":
            students.append(rec)
    if not students:
        raise UserError(f"{runs_dir}: no student records found (run `kdbench run RECIPE` first, "
                        "and point the leaderboard at its output folder)")
    rows = []
    for rec in students:
        m = rec["meta"]
        ok = rec["status"] == "done"
        pair_order, row_order, objective_order = _student_order(m)
        rows.append({
            "group": m["group"], "dataset": m["dataset"], "pair": m["pair"],
            "pair_order": pair_order, "row_order": row_order, "objective_order": objective_order,
            "method_set": m["method_set"], "objective": m.get("objective"),
            "seed": rec["spec"]["seed"], "status": rec["status"],
            "top1": rec[metric]["top1"] if ok else math.nan,
            "teacher_id": rec.get("teacher_id"), "reference": m.get("reference"),
            "ref_teacher": m.get("ref_teacher"), "ref_student": m.get("ref_student"),
            "ref_method": m.get("ref_method"),
            "teacher_reference_row": bool(m.get("teacher_reference_row")),
        })
    df = pd.DataFrame(rows)
    trows = []
    for key, sub in df.dropna(subset=["teacher_id"]).groupby(["group", "dataset", "pair", "objective"]):
        pair_order = int(sub["pair_order"].min())
        objective_order = int(sub["objective_order"].min())
        # Per objective label (one teacher run may serve two labels of identical objectives).
        reference_row = bool(sub["teacher_reference_row"].any())
        for tid in sub["teacher_id"].unique():
            t = teachers.get(tid)
            if t is None:
                continue
            ok = t["status"] == "done"
            trows.append({"group": key[0], "dataset": key[1], "pair": key[2], "objective": key[3],
                          "pair_order": pair_order, "objective_order": objective_order,
                          "reference_row": reference_row,
                          "teacher_id": tid, "status": t["status"],
                          "top1": t[metric]["top1"] if ok else math.nan,
                          "diagnostics": t.get("diagnostics") or {}})
    return df, pd.DataFrame(trows)


def _student_order(meta: dict) -> tuple[int, int, int]:
    """(pair, method set, objective) positions in the recipe. Records written before the
    metadata was typed hold them as a list ``order``."""
    if "pair_index" in meta:
        return meta["pair_index"], meta["method_set_index"], meta["objective_index"]
    order = meta["order"]
    return order[0], order[1], order[2] if len(order) > 2 else 0


def _cell(values: pd.Series, statuses: pd.Series) -> tuple[str, float]:
    good = values.dropna()
    bad = statuses[statuses != "done"].value_counts()
    note = "".join(f" ({n} {s})" for s, n in bad.items())
    if good.empty:
        return ("—" + note if note else "—"), math.nan
    mean = good.mean()
    if len(good) == 1:  # no spread to show from a single run
        return f"{mean:.2f} (n=1){note}", mean
    return f"{mean:.2f} ± {good.std(ddof=1):.2f} (n={len(good)}){note}", mean


def build_tables(df: pd.DataFrame, tdf: pd.DataFrame, metric: str, reference_file: str | None = None):
    """Returns [(title, markdown, long-form rows)] per table."""
    ref = None
    out = []
    for (group, dataset), sub in df.groupby(["group", "dataset"], sort=False):
        pairs = sub.sort_values("pair_order")["pair"].drop_duplicates().tolist()
        first = sub.iloc[0]
        reference = first["reference"] if isinstance(first["reference"], dict) else None
        if reference and ref is None:
            ref = load_reference(reference_file or reference.get("file"))
        # Row labels: the method set, qualified by the teacher objective when a set is used with
        # several objectives in this table.
        n_obj = sub.groupby("method_set")["objective"].nunique(dropna=False)
        sub = sub.assign(row=[ms if n_obj[ms] <= 1 else f"{ms} ({o})"
                              for ms, o in zip(sub["method_set"], sub["objective"])])
        row_order = sub.sort_values(["row_order", "objective_order"], kind="stable")["row"]
        row_order = row_order.drop_duplicates().tolist()
        lines, long_rows, means = {}, [], {}
        tsub = tdf[(tdf["group"] == group) & (tdf["dataset"] == dataset)] if len(tdf) else tdf
        if len(tsub):  # the diagnostics table lists the pairs in column order
            tsub = tsub.sort_values(["pair_order", "objective_order"], kind="stable")
        # (label, records, is_teacher, reference row name)
        teacher_rows = []
        if len(tsub):
            for obj in tsub["objective"].drop_duplicates():
                trows = tsub[tsub["objective"] == obj]
                # The reference table's teacher row is the one the recipe marks (ref_teacher =
                # true on the objective: the paper's teachers are CE-trained).
                is_ref = bool(trows["reference_row"].all())
                teacher_rows.append((f"Teacher ({obj})", trows, True, "teacher" if is_ref else None))
        student_rows = [(r, sub[sub["row"] == r], False,
                         sub[sub["row"] == r].iloc[0]["ref_method"]) for r in row_order]
        for label, rows, is_teacher, method in teacher_rows + student_rows:
            cells = []
            for pair in pairs:
                prow = rows[rows["pair"] == pair]
                text, mean = _cell(prow["top1"], prow["status"]) if len(prow) else ("", math.nan)
                refval = None
                if reference and len(prow):
                    srow = sub[sub["pair"] == pair].iloc[0]
                    if _present(method) and srow["ref_teacher"] and srow["ref_student"]:
                        refval = ref.get((reference["table"], reference["dataset"],
                                          srow["ref_teacher"], srow["ref_student"], method))
                if refval is not None and not math.isnan(mean):
                    text += f" · paper {refval:.2f} (Δ {mean - refval:+.2f})"
                elif refval is not None:
                    text += f" · paper {refval:.2f}"
                cells.append(text)
                means[(label, pair)] = (mean, not is_teacher)
                long_rows.append({"group": group, "dataset": dataset, "row": label, "pair": pair,
                                  "metric": metric, "mean": mean,
                                  "std": prow["top1"].dropna().std(ddof=1) if prow["top1"].notna().sum() > 1 else 0.0,
                                  "n": int(prow["top1"].notna().sum()), "paper": refval,
                                  "kind": "teacher" if is_teacher else "student"})
            lines[label] = cells
        # Bold the best student row per column.
        for j, pair in enumerate(pairs):
            cands = [(m, lbl) for (lbl, p), (m, is_student) in means.items()
                     if p == pair and is_student and not math.isnan(m)]
            if cands:
                best = max(cands)[0]
                for lbl, (m, is_student) in ((l, means[(l, pair)]) for l in lines):
                    if is_student and m == best:
                        lines[lbl][j] = f"**{lines[lbl][j]}**"
        header = "| Method | " + " | ".join(pairs) + " |"
        sep = "|---|" + "---|" * len(pairs)
        body = [f"| {lbl} | " + " | ".join(cells) + " |" for lbl, cells in lines.items()]
        title = f"{group} — {dataset}"
        note = (f"Top-1 accuracy (%) at the **{metric}** epoch, mean ± sample std over seeds (n runs)."
                + (f" Reference: {reference['table']} ({reference['dataset']}) of the paper; "
                   "Δ = ours − paper." if reference else ""))
        md = "\n".join([f"## {title}", "", note, "", header, sep, *body, ""])
        if len(tsub):
            md += "\n" + _diagnostics_table(tsub) + "\n"
        out.append((title, md, long_rows))
    return out


# Diagnostics shown in the teacher table (kdbench.diagnostics): accuracy, soft-label entropy and
# non-target mass at the distillation temperature, and the Section 4.2 distances.
DIAGNOSTICS = ("top1", "entropy_T", "nontarget_mass_T", "d_intra", "d_inter", "d_intra_over_inter")


def _present(value) -> bool:
    """A reference row name that is set (pandas turns a missing one into None or NaN)."""
    return isinstance(value, str) and bool(value)


def _diagnostics_table(tsub: pd.DataFrame) -> str:
    rows = []
    for (pair, obj), g in tsub.groupby(["pair", "objective"], sort=False):
        diags = [d for d in g["diagnostics"] if d]
        keys = [k for k in DIAGNOSTICS if diags and k in diags[0]]
        vals = {k: sum(d[k] for d in diags) / len(diags) for k in keys}
        rows.append((pair, obj, len(g), vals))
    keys = [k for k in DIAGNOSTICS if any(k in v for *_, v in rows)]
    if not keys:
        return ""
    head = "| Teacher (pair) | Objective | n | " + " | ".join(keys) + " |"
    sep = "|---|---|---|" + "---|" * len(keys)
    body = [f"| {p} | {o} | {n} | " + " | ".join(f"{v.get(k, math.nan):.4g}" for k in keys) + " |"
            for p, o, n, v in rows]
    return "\n".join(["Teacher diagnostics (test set, mean over teachers):", "", head, sep, *body])


def write_leaderboard(runs_dir: Path, out_dir: Path, metric: str | None = None,
                      reference_file: str | None = None, plot: bool = True) -> list[Path]:
    """Writes leaderboard.md, leaderboard.csv and (with matplotlib) leaderboard.png into
    ``out_dir``; returns the paths written. Without matplotlib the plot is skipped with one
    line on stderr."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    if not runs_dir.exists():
        raise UserError(f"{runs_dir}: runs folder does not exist")
    metric = metric or "final"
    df, tdf = collect(runs_dir, metric)
    tables = build_tables(df, tdf, metric, reference_file)
    md = "# kdbench leaderboard\n\n" + "\n".join(md for _, md, _ in tables)
    written = [out_dir / "leaderboard.md", out_dir / "leaderboard.csv"]
    atomic_write_bytes(written[0], md.encode())
    long = pd.DataFrame([r for *_, rows in tables for r in rows])
    atomic_write_bytes(written[1], long.to_csv(index=False).encode())
    if plot:
        from kdbench.plot import MissingMatplotlib, write_plot

        try:
            written.append(write_plot([(title, rows) for title, _, rows in tables], metric,
                                      out_dir / "leaderboard.png"))
        except MissingMatplotlib as exc:
            print(f"kdbench leaderboard: {exc}", file=sys.stderr)
    return written
