"""The statistics of one column (pair) at one metric (:mod:`kdbench.stats`): each row's
summary over its seeds, the best row, paired comparisons with the baseline and the best row
(Holm-corrected over the rows), the smallest detectable difference; and what the "best" epoch
was chosen on."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from kdbench import stats
from kdbench.leaderboard.common import MDE_MORE_SEEDS, _present


def _values_by_seed(rows: pd.DataFrame, metric: str) -> dict:
    ok = rows[(rows["status"] == "done") & rows[metric].notna()]
    return dict(zip(ok["seed"], ok[metric]))


def _shared(a: dict, b: dict) -> tuple[list[float], list[float]]:
    seeds = [s for s in a if s in b]
    seeds.sort(key=lambda s: (str(type(s)), s))
    return [a[s] for s in seeds], [b[s] for s in seeds]


@dataclass
class _Row:
    label: str
    records: pd.DataFrame
    is_teacher: bool
    method: str | None  # name of the row in the reference table
    method_set: str | None = None
    objective: str | None = None


@dataclass
class _Column:
    """The statistics of one column (pair) at one metric."""
    summaries: dict = field(default_factory=dict)  # label -> CellSummary
    by_seed: dict = field(default_factory=dict)  # label -> {seed: value}
    best: str | None = None  # label of the best student row
    vs_base: dict = field(default_factory=dict)  # label -> (baseline label, Paired, p_holm)
    vs_best: dict = field(default_factory=dict)  # label -> (Paired, p_holm)
    mde: dict | None = None


def _baseline_rows(student_rows: list[_Row], sub: pd.DataFrame) -> tuple[dict, str | None]:
    """label -> the label of the baseline row it is compared with, and a sentence saying which
    baseline (None when there is none)."""
    named = [b for b in sub.sort_values("mtime")["baseline"].tolist() if _present(b)]
    note_extra = ""
    if named:
        base_set = named[-1]
        if len(set(named)) > 1:
            note_extra = (f" (the records name different baselines: {', '.join(sorted(set(named)))}; "
                          "the newest record's counts)")
        source = f"the recipe's `[leaderboard] baseline = \"{base_set}\"`{note_extra}"
    else:
        kd = [r.method_set for r in student_rows if r.method == "KD"]
        if not kd:
            return {}, None
        base_set = kd[0]
        source = "the row the reference table calls KD (the recipe names no `[leaderboard] baseline`)"
    base = [r for r in student_rows if r.method_set == base_set]
    if not base:
        return {}, f"Baseline {base_set} ({source}) has no runs in this table: no paired comparisons."
    mapping = {}
    for r in student_rows:
        same = [b for b in base if b.objective == r.objective]
        target = same[0] if same else base[0]
        if target.label != r.label:
            mapping[r.label] = target.label
    which = (base[0].label if len(base) == 1 else
             f"{base_set} (each row against the {base_set} row of its own teacher objective, "
             f"else {base[0].label})")
    return mapping, f"Baseline: {which}, from {source}."


def _column_stats(rows: list[_Row], pair: str, metric: str, baseline_of: dict) -> _Column:
    col = _Column()
    for r in rows:
        prow = r.records[r.records["pair"] == pair]
        col.by_seed[r.label] = _values_by_seed(prow, metric)
        col.summaries[r.label] = stats.summarize(list(col.by_seed[r.label].values()))
    students = [r.label for r in rows if not r.is_teacher]
    means = [(col.summaries[l].mean, -i, l) for i, l in enumerate(students)
             if col.summaries[l].mean is not None]
    if means:
        col.best = max(means)[2]  # the first of equal means
    # Against the baseline row, Holm over the rows of the column.
    labels = [l for l in students if l in baseline_of and col.by_seed[baseline_of[l]]
              and col.by_seed[l]]
    tests = [stats.paired(*_shared(col.by_seed[l], col.by_seed[baseline_of[l]])) for l in labels]
    for l, t, p in zip(labels, tests, stats.holm([t.p for t in tests])):
        col.vs_base[l] = (baseline_of[l], t, p)
    # Against the best row.
    if col.best is not None:
        labels = [l for l in students if l != col.best and col.by_seed[l]]
        tests = [stats.paired(*_shared(col.by_seed[l], col.by_seed[col.best])) for l in labels]
        for l, t, p in zip(labels, tests, stats.holm([t.p for t in tests])):
            col.vs_best[l] = (t, p)
    # The smallest detectable difference, from the paired differences pooled over the rows.
    against, comps = ("baseline", [t for _, t, _ in col.vs_base.values()]) if col.vs_base else \
        ("best", [t for t, _ in col.vs_best.values()])
    comps = [t for t in comps if t.n >= 2]
    if comps:
        sd, dof = stats.pooled_sd((t.sd, t.n) for t in comps)
        n = max(t.n for t in comps)
        col.mde = {"against": against, "sd": sd, "rows": len(comps), "n": n,
                   "mde": stats.minimal_detectable_difference(sd, n),
                   "more": {k: stats.minimal_detectable_difference(sd, k)
                            for k in MDE_MORE_SEEDS if k > n}}
    return col


def _selection(records: pd.DataFrame) -> tuple[str, str]:
    """What the "best" epoch of a table's done runs was chosen on: ("validation" | "test" |
    "mixed", the sentence for the table's note). A record that does not say was chosen on the
    test set (records before the validation split existed)."""
    on = records.loc[records["status"] == "done", "selected_on"]
    n_val = int((on == "validation").sum())
    if len(on) and n_val == len(on):
        return "validation", "selected on the validation split"
    if n_val:
        return "mixed", (f"selected on the validation split for {n_val} of {len(on)} runs, on "
                         "the test set (optimistic) for the others")
    return "test", "selected on the test set (optimistic)"
