"""The text of a table: a cell's mean ± std [CI], the marks against the baseline and the best
row, the legend, the detectable-difference line, and a cell's long-form CSV row."""
from __future__ import annotations

import pandas as pd

from kdbench import stats
from kdbench.leaderboard.common import ALPHA, MARK_DOWN, MARK_TIED, MARK_UP
from kdbench.leaderboard.comparisons import _Column, _Row


def _bad_note(statuses: pd.Series) -> str:
    bad = statuses[statuses != "done"].value_counts()
    return "".join(f" ({n} {s})" for s, n in bad.items())


def _cell_text(s: stats.CellSummary, note: str) -> str:
    if s.n == 0:
        return "—" + note
    if s.n == 1:  # no spread and no interval from a single run
        return f"{s.mean:.2f} (n=1){note}"
    return f"{s.mean:.2f} ± {s.std:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}] (n={s.n}){note}"


def _marks(label: str, col: _Column, bold: bool) -> str:
    """▲/▼ against the baseline, ≈ for a row tied with the best (not on a row whose mean equals
    the best one: it is bold already)."""
    marks = []
    if label in col.vs_base:
        _, t, p = col.vs_base[label]
        if p is not None and p < ALPHA:
            marks.append(MARK_UP if t.diff > 0 else MARK_DOWN)
    if label in col.vs_best and not bold:
        _, p = col.vs_best[label]
        if p is not None and p >= ALPHA:
            marks.append(MARK_TIED)
    return "".join(f" {m}" for m in marks)


def _legend(columns: dict, pairs: list, metric: str, baseline_note: str | None,
            compared: bool) -> str:
    cols = [columns[(p, metric)] for p in pairs]
    tests = [t for c in cols for _, t, _ in c.vs_base.values()] + \
            [t for c in cols for t, _ in c.vs_best.values()]
    kinds = {t.test for t in tests if t.test}
    parts = ["Legend: mean ± sample std [95% CI of the mean, Student t] (n = distinct seeds; "
             "n=1: no spread, no interval, no test); failed, diverged and interrupted runs are "
             "counted in parentheses and left out. **bold**: the best student mean of the column."]
    if baseline_note:
        parts.append(baseline_note)
    if compared:
        parts.append(f"{MARK_UP}/{MARK_DOWN}: higher/lower than the baseline, significant at "
                     f"α = {ALPHA} after Holm's correction over the rows of the column.")
    parts.append(f"{MARK_TIED}: cannot be told apart from the column's best row (paired test "
                 f"against it, Holm-corrected, not significant at α = {ALPHA}); rows with the "
                 "best mean are bold instead.")
    parts.append("Comparisons are paired over the seeds both rows have (n_paired in the CSV); a "
                 "row with fewer than 2 shared seeds is not tested and gets no mark.")
    if kinds:
        used = {"sign-flip": "the exact sign-flip permutation test (≤ 10 shared seeds; its "
                             "smallest p is 2/2ⁿ, 0.0625 for n = 5, before Holm)",
                "t": "the paired t-test (> 10 shared seeds)"}
        parts.append("p-values: " + " and ".join(used[k] for k in ("sign-flip", "t") if k in kinds) + ".")
    return " ".join(parts)


def _mde_line(columns: dict, pairs: list, metric: str, baseline_of: dict) -> str:
    per = []
    against = None
    for p in pairs:
        m = columns[(p, metric)].mde
        if m is None:
            per.append(f"{p}: — (no row shares 2 seeds with the compared row)")
            continue
        against = m["against"]
        more = "".join(f"; {k} seeds: {v:.2f}" for k, v in m["more"].items())
        per.append(f"{p}: {m['mde']:.2f} with {m['n']} seeds{more} "
                   f"(pooled SD of the differences {m['sd']:.2f}, {m['rows']} row{'s' if m['rows'] != 1 else ''})")
    if against is None:
        return ("Smallest detectable difference: needs at least 2 seeds a row shares with the "
                "row it is compared with; none here.")
    vs = "the baseline" if against == "baseline" else "the best row (no baseline)"
    return ("Smallest detectable difference (points of top-1; paired t-test, 80% power, "
            f"α = 0.05 two-sided, from the paired differences against {vs}): " + "; ".join(per) + ".")


def _long_row(group, dataset, r: _Row, pair, metric, col: _Column, prow, note, refval,
              selected_on, lit_columns: dict) -> dict:
    s = col.summaries[r.label]
    row = {"group": group, "dataset": dataset, "row": r.label, "pair": pair, "metric": metric,
           "kind": "teacher" if r.is_teacher else "student",
           "mean": s.mean, "std": s.std, "n": s.n, "ci_low": s.ci_low, "ci_high": s.ci_high,
           "excluded": note.strip().replace(") (", "; ").strip("()") or None,
           "n_excluded": int((prow["status"] != "done").sum()),
           "selected_on": selected_on if metric == "best" else None, "paper": refval,
           "baseline_row": None, "n_paired": None, "diff": None, "diff_ci_low": None,
           "diff_ci_high": None, "p_t": None, "p_perm": None, "p_test": None, "p_holm": None,
           "significant": None, "best_row": col.best, "is_best": None, "n_paired_best": None,
           "diff_best": None, "p_best": None, "p_best_holm": None, "tied_with_best": None,
           "mde": None, "mde_n": None, "mde_sd_diff": None, "mde_against": None,
           **lit_columns}
    if r.is_teacher:
        row["best_row"] = None
        return row
    if s.mean is not None and col.best is not None:
        row["is_best"] = s.mean == col.summaries[col.best].mean
    if r.label in col.vs_base:
        base, t, p = col.vs_base[r.label]
        row.update(baseline_row=base, n_paired=t.n, diff=t.diff, diff_ci_low=t.ci_low,
                   diff_ci_high=t.ci_high, p_t=t.p_t, p_perm=t.p_perm, p_test=t.test, p_holm=p,
                   significant=None if p is None else bool(p < ALPHA))
    if r.label in col.vs_best:
        t, p = col.vs_best[r.label]
        row.update(n_paired_best=t.n, diff_best=t.diff, p_best=t.p, p_best_holm=p,
                   tied_with_best=None if p is None else bool(p >= ALPHA))
    if col.mde:
        row.update(mde=col.mde["mde"], mde_n=col.mde["n"], mde_sd_diff=col.mde["sd"],
                   mde_against=col.mde["against"])
    return row
