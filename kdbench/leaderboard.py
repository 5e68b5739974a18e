"""Result records -> pandas -> markdown and CSV tables, and a PNG plot.

One table per (recipe group, dataset), in the layout of the paper's tables: methods as rows,
teacher→student pairs as columns, and where the recipe names a reference table the paper's
number and the difference. Teacher rows come first (one per teacher objective, showing the
teachers the students of that column actually used), then the method sets in recipe order (so a
"Student" set listed first comes right after the teachers). The paper's teacher numbers are
those of the CE-trained teacher: a recipe marks the objective whose teachers are that row with
``ref_teacher = true``, and only that row gets the paper's number.

Statistics (:mod:`kdbench.stats`): each cell is the mean, sample std and 95% Student-t interval
over distinct seeds. A seed counts once: records of one run id found in several folders under
the runs folder are one run (a ``done`` copy preferred), and of several run ids for one (row,
pair, seed) — a row retrained with another spec — only the newest record (file mtime) counts;
both are listed in a note under the table. Failed, diverged and interrupted runs are counted in
the cell's note and left out of the statistics. Every student row is compared, paired over the
seeds it shares with it, with a baseline row (the recipe's ``[leaderboard] baseline``, else the
row the paper calls KD; one of the same teacher objective where the baseline has several) and
with the best row of its column; p-values (exact sign-flip permutation test for ≤ 10 shared
seeds, else the paired t-test) are Holm-corrected over the rows of a column. The markdown shows
the marks and a legend, plus per column the smallest difference the seeds could detect; the CSV
has every number, for the ``final`` and the ``best`` epoch (one row per metric).

Published numbers (:mod:`kdbench.literature`): where the records' ``[reference]`` names
``literature`` sources (or ``write_leaderboard(literature_sources=...)`` does), each cell also
shows the number each source prints for it, "lit. CRD 74.92 (Δ +0.28)" (Δ = kdbench −
published; sources printing the same number listed together, "CRD/DKD/LS 73.33"), and the CSV
has ``lit_<source>``, ``lit_<source>_spread`` and ``lit_<source>_delta`` per source. A table
of the sources' protocols (repository and commit, epochs of the numbers shown, the epoch
reported, runs, precision, teachers) next to kdbench's own, and what a Δ holds besides the
method, follow the table. The paper's own tables (``[reference] table``) are unchanged.

Each table is followed by the teachers' soft-label diagnostics. ``leaderboard.png`` (needs
matplotlib, the ``plot`` extra) plots every row's accuracy per pair with 95% intervals.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from kdbench import literature, stats
from kdbench.api import UserError
from kdbench.store import atomic_write_bytes, iter_records

METRICS = ("final", "best")
INT_COLUMNS = ("n", "n_excluded", "n_paired", "n_paired_best", "mde_n")
ALPHA = stats.ALPHA
MARK_UP, MARK_DOWN, MARK_TIED = "▲", "▼", "≈"
MDE_MORE_SEEDS = (10, 20)  # the detectable difference is also shown for these seed counts


def load_reference(file: str | None = None) -> dict[tuple, float]:
    if file:
        text = Path(file).read_text()
    else:
        text = resources.files("kdbench").joinpath("references/paper-tables.csv").read_text()
    rows = csv.DictReader(text.splitlines())
    return {(r["table"], r["dataset"], r["teacher"], r["student"], r["method"]): float(r["top1"])
            for r in rows}


# ------------------------------------------------------------------------------ records
def _where(rec: dict, root: Path) -> str:
    path = Path(rec["_path"])
    try:
        return str(path.parent.relative_to(root))
    except ValueError:
        return str(path.parent)


def _mtime(rec: dict) -> int:
    try:
        return os.stat(rec["_path"]).st_mtime_ns
    except OSError:
        return 0


def _metric_values(rec: dict) -> dict:
    """top-1 at the final and the best epoch (NaN unless done), and what "best" was chosen on."""
    out = {}
    done = rec.get("status") == "done"
    for m in METRICS:
        if not done:
            out[m] = math.nan
            continue
        try:
            out[m] = float(rec[m]["top1"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{rec['_path']}: a done record without a number in {m}.top1; "
                            "delete that run's folder and run the recipe again") from None
    best = rec.get("best") if isinstance(rec.get("best"), dict) else {}
    out["selected_on"] = best.get("selected_on") or "test"
    return out


def _dedupe_ids(records: list[dict], root: Path, notes: dict) -> dict[str, dict]:
    """One record per run id. A run id found in several folders (the same run copied or kept
    in two output folders under ``root``) is one run: a ``done`` copy is preferred, else the
    newest; the duplicates go into ``notes``."""
    by_id: dict[str, list[dict]] = {}
    for rec in records:
        by_id.setdefault(rec["id"], []).append(rec)
    out = {}
    for rid, recs in by_id.items():
        chosen = max(recs, key=lambda r: (r.get("status") == "done", _mtime(r), r["_path"]))
        out[rid] = chosen
        if len(recs) > 1:
            meta = chosen.get("meta") or {}
            copies = ", ".join(f"{_where(r, root)} ({r.get('status')})"
                               for r in sorted(recs, key=lambda r: r["_path"]))
            notes.setdefault((meta.get("group"), meta.get("dataset")), {}).setdefault(
                "ids", []).append(f"{rid}: {len(recs)} records ({copies}); counted "
                                  f"{_where(chosen, root)} ({chosen.get('status')})")
    return out


def _check_student(rec: dict) -> None:
    meta, spec = rec.get("meta"), rec.get("spec")
    missing = [k for k in ("group", "dataset", "pair", "method_set")
               if not isinstance(meta, dict) or k not in meta]
    if not isinstance(spec, dict) or "seed" not in spec:
        missing.append("spec.seed")
    if missing:
        raise UserError(f"{rec['_path']}: a student record without {', '.join(missing)}; it was "
                        "not written by this kdbench (delete it or rerun that run)")


def collect(runs_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The student rows (one per counted run), the teacher rows of the teachers those students
    used, and the notes on duplicates per (group, dataset)."""
    runs_dir = Path(runs_dir)
    teachers_raw, students_raw = [], []
    for rec in iter_records(runs_dir):
        if "id" not in rec:
            continue
        if rec.get("kind") == "teacher":
            teachers_raw.append(rec)
        elif rec.get("kind") == "student":
            students_raw.append(rec)
    if not students_raw:
        raise UserError(f"{runs_dir}: no student records found (run `kdbench run RECIPE` first, "
                        "and point the leaderboard at its output folder)")
    notes: dict = {}
    teachers = _dedupe_ids(teachers_raw, runs_dir, notes)
    students = _dedupe_ids(students_raw, runs_dir, notes)
    rows = []
    for rec in students.values():
        _check_student(rec)
        m = rec["meta"]
        pair_order, row_order, objective_order = _student_order(m)
        rows.append({
            "group": m["group"], "dataset": m["dataset"], "pair": m["pair"],
            "pair_order": pair_order, "row_order": row_order, "objective_order": objective_order,
            "method_set": m["method_set"], "objective": m.get("objective"),
            "seed": rec["spec"]["seed"], "status": rec.get("status"), "run_id": rec["id"],
            "where": _where(rec, runs_dir), "mtime": _mtime(rec), **_metric_values(rec),
            "teacher_id": rec.get("teacher_id"), "reference": m.get("reference"),
            "ref_teacher": m.get("ref_teacher"), "ref_student": m.get("ref_student"),
            "ref_method": m.get("ref_method"), "baseline": m.get("baseline"),
            "teacher_reference_row": bool(m.get("teacher_reference_row")),
            **_protocol_fields(rec),
            "teacher_model": _spec_get(teachers.get(rec.get("teacher_id")) or {}, "model", "name"),
        })
    df = pd.DataFrame(rows)
    # Row labels: the method set, qualified by the teacher objective when a set is used with
    # several objectives in its table.
    n_obj = df.groupby(["group", "dataset", "method_set"])["objective"].nunique(dropna=False)
    df["row"] = [ms if n_obj[(g, d, ms)] <= 1 else f"{ms} ({o})"
                 for g, d, ms, o in zip(df["group"], df["dataset"], df["method_set"], df["objective"])]
    df = _one_per_seed(df, ["group", "dataset", "row", "pair", "seed"], "row", notes)

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
            trows.append({"group": key[0], "dataset": key[1], "pair": key[2], "objective": key[3],
                          "row": f"Teacher ({key[3]})",
                          "pair_order": pair_order, "objective_order": objective_order,
                          "reference_row": reference_row, "run_id": tid,
                          "seed": (t.get("spec") or {}).get("seed", tid),
                          "status": t.get("status"), "where": _where(t, runs_dir),
                          "mtime": _mtime(t), **_metric_values(t), **_protocol_fields(t),
                          "checkpoint": "checkpoint" in (t.get("spec") or {}),
                          "diagnostics": t.get("diagnostics") or {}})
    tdf = pd.DataFrame(trows)
    if len(tdf):
        tdf = _one_per_seed(tdf, ["group", "dataset", "row", "pair", "seed"], "row", notes)
    return df, tdf, notes


def _spec_get(rec: dict, *keys):
    cur = rec.get("spec")
    for k in keys:
        cur = cur.get(k) if isinstance(cur, dict) else None
    return cur


def _protocol_fields(rec: dict) -> dict:
    """What the literature note says about kdbench's own runs: the model's and the dataset's
    kdbench names, the epochs, and whether the run trained under bf16 autocast (on CUDA unless
    precision = "fp32", on the CPU only with "bf16"; None when the record does not say)."""
    precision = _spec_get(rec, "precision")
    on_gpu = bool((rec.get("provenance") or {}).get("gpu"))
    autocast = None if precision is None else (precision != "fp32" if on_gpu else precision == "bf16")
    return {"model_name": _spec_get(rec, "model", "name"),
            "dataset_name": _spec_get(rec, "dataset", "name"),
            "subset_per_class": _spec_get(rec, "dataset", "subset_per_class"),
            "val_per_class": _spec_get(rec, "dataset", "val_per_class"),
            "epochs": _spec_get(rec, "schedule", "epochs"), "autocast": autocast}


def _one_per_seed(df: pd.DataFrame, key: list[str], label: str, notes: dict) -> pd.DataFrame:
    """Of several run ids for one (row, pair, seed) — a row retrained with another spec — the
    newest record counts (file mtime); the others go into ``notes``."""
    keep = []
    for k, sub in df.groupby(key, sort=False, dropna=False):
        sub = sub.sort_values(["mtime", "run_id"])
        keep.append(sub.index[-1])
        if len(sub) > 1:
            new = sub.iloc[-1]
            old = ", ".join(f"{r.run_id} ({r.status})" for r in sub.iloc[:-1].itertuples())
            notes.setdefault((new["group"], new["dataset"]), {}).setdefault("seeds", []).append(
                f"{new[label]} · {new['pair']} · seed {new['seed']}: counted {new['run_id']} "
                f"({new['status']}, newest), left out {old}")
    return df.loc[sorted(keep)]


def _student_order(meta: dict) -> tuple[int, int, int]:
    """(pair, method set, objective) positions in the recipe. Records written before the
    metadata was typed hold them as a list ``order``."""
    if "pair_index" in meta:
        return meta["pair_index"], meta["method_set_index"], meta["objective_index"]
    order = meta["order"]
    return order[0], order[1], order[2] if len(order) > 2 else 0


# ---------------------------------------------------------------------------- statistics
def _bad_note(statuses: pd.Series) -> str:
    bad = statuses[statuses != "done"].value_counts()
    return "".join(f" ({n} {s})" for s, n in bad.items())


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


# ----------------------------------------------------------------------------- literature
def _lit_text(published: dict, mean: float | None) -> str:
    """" · lit. CRD 74.92 (Δ +0.28), DKD/LS 73.33 (Δ -0.10)": sources printing the same
    number are listed together; N/A (the source prints no number) has no Δ."""
    groups: dict[str, list] = {}
    for key, p in published.items():
        if p is not None:
            groups.setdefault(p.top1, []).append((key, p))
    parts = []
    for printed, entries in groups.items():
        p = entries[0][1]
        part = f"{'/'.join(k for k, _ in entries)} {printed}"
        if mean is not None and p.mean is not None:
            part += f" (Δ {mean - p.mean:+.2f})"
        parts.append(part)
    return " · lit. " + ", ".join(parts) if parts else ""


def _counts(values, unit: str = "") -> str:
    """"240 ep" or "240 ep (12), 480 ep (3)"; None counts as "not stated"."""
    c: dict = {}
    for v in values:
        c[v] = c.get(v, 0) + 1
    if not c:
        return "—"
    named = sorted(c, key=lambda v: (v is None, v))
    if len(named) == 1:
        return "not stated" if named[0] is None else f"{named[0]}{unit}"
    return ", ".join(f"{'not stated' if v is None else f'{v}{unit}'} ({c[v]})" for v in named)


@dataclass
class _Lit:
    """The published numbers of one table: the sources its records name, the kdbench names
    each pair is looked up by (kdbench.literature.pair_models), and the numbers shown, for the
    protocol note under the table."""
    table: literature.Literature
    keys: list  # short source keys, in the recipe's order
    sources: dict  # key -> full source name
    pairs: dict  # pair label -> (kdbench dataset, teacher, student)
    remarks: list  # sentences for the note
    shown: dict = field(default_factory=dict)  # key -> {CSV line: Published}

    @classmethod
    def build(cls, reference: dict | None, sub: pd.DataFrame, pairs: list,
              override: list | None = None) -> "_Lit | None":
        names = override
        if names is None:  # the newest record that names sources (a recipe may add them later)
            named = [r for r in sub.sort_values("mtime")["reference"]
                     if isinstance(r, dict) and r.get("literature")]
            names = named[-1]["literature"] if named else None
        if not names:
            return None
        table = literature.load()
        remarks, sources = [], {}
        for n in names:
            try:
                full = table.resolve([n])[0]
            except ValueError:
                remarks.append(f"The source {n!r} the records name is not in {table.path}: left out.")
                continue
            sources[literature.source_key(full)] = full
        paper_table = isinstance(reference, dict) and _present(reference.get("table"))
        out = {}
        for pair in pairs:
            prs = sub[sub["pair"] == pair]
            first = prs.iloc[0]
            t_model = next((m for m in prs["teacher_model"] if _present(m)), None)
            s_model = next((m for m in prs["model_name"] if _present(m)), None)
            dataset = next((d for d in prs["dataset_name"] if _present(d)), None)
            t, s, notes = literature.pair_models(t_model, s_model, first["ref_teacher"],
                                                 first["ref_student"], paper_table)
            out[pair] = (dataset, t, s)
            remarks += [f"{pair}: {n}." for n in notes]
            if not any(table.covers(full, dataset, t, s) for full in sources.values()):
                looked = f"{t or '?'}→{s or '?'} on {dataset or '?'}"
                remarks.append(f"{pair}: no published number in {', '.join(sources) or '—'} "
                               f"(looked up as {looked}).")
        return cls(table, list(sources), sources, out, remarks)

    def cell(self, r: _Row, pair: str) -> dict:
        """key -> the published row for one cell (None where the source has none)."""
        if r.is_teacher:
            method = "teacher" if r.method == "teacher" else None
        else:
            method = literature.method_name(r.method) or literature.method_name(r.method_set)
        dataset, t, s = self.pairs[pair]
        found = {k: self.table.lookup(full, dataset, t, s, method) for k, full in self.sources.items()}
        for k, p in found.items():
            if p is not None:
                self.shown.setdefault(k, {})[p.line] = p
        return found if any(found.values()) else {}

    def csv_columns(self, published: dict, mean: float | None) -> dict:
        """lit_<key> (published mean), lit_<key>_spread (its ±, when printed), lit_<key>_delta
        (kdbench − published) for every source of the table."""
        out = {}
        for k in self.keys:
            p = published.get(k)
            value = p.mean if p is not None else None
            out[f"lit_{k}"] = value
            out[f"lit_{k}_spread"] = p.spread if p is not None else None
            out[f"lit_{k}_delta"] = (mean - value if mean is not None and value is not None
                                     else None)
        return out

    def note(self, metric: str, selection_note: str, sub: pd.DataFrame,
             tsub: pd.DataFrame) -> str:
        """The sources' protocols next to kdbench's, and what a Δ includes besides the method."""
        head = ("| Published numbers | Repository @ commit (file) | Epochs (numbers shown) | "
                "Epoch reported | Runs | Precision | Teachers |")
        lines = ["Published numbers (lit.) and their protocols (Δ = kdbench − published; "
                 "kdbench/references/literature-cifar100.csv, the `protocol` column per number):",
                 "", head, "|---|---|---|---|---|---|---|"]
        for k in self.keys:
            rows = list(self.shown.get(k, {}).values())
            where = sorted({f"{r.repo}@{r.commit[:7]} ({r.file})" for r in rows})
            epoch, runs, precision, teachers = literature.protocol(k)
            epochs = _counts([r.epochs for r in rows], " ep") if rows else "no number for these cells"
            lines.append(f"| {k} = {self.sources[k]} | {'; '.join(where) or '—'} | {epochs} | "
                         f"{epoch} | {runs} | {precision} | {teachers} |")
        reported = "final (last) epoch" if metric == "final" else f"best epoch, {selection_note}"
        lines.append(f"| kdbench (this table) | — | {self._epochs(sub)} | {reported} | "
                     f"{self._seeds(sub)} | {self._precision(sub, tsub)} | {self._teachers(tsub)} |")
        subset = sorted({int(v) for v in sub["subset_per_class"].dropna()})
        caveats = [
            "What a Δ holds besides the method: the precision (kdbench autocasts to bf16 on "
            "GPUs unless `precision = \"fp32\"`; RepDistiller's and mdistiller's training loops "
            "use no autocast, fp32); the epoch (kdbench reports the final epoch, or with "
            "`--metric best` the best one, chosen on the validation split when the recipe holds "
            "one out (`val_per_class`), else on the test set; RepDistiller reports the last "
            "epoch, mdistiller-based code logs the best test accuracy, which is optimistic); the "
            "number of runs (kdbench's n per cell against an unstated number, so a Δ within a few "
            "tenths is no evidence either way); the teachers (trained here, or published "
            "checkpoints loaded and evaluated, against the sources' own checkpoints); the "
            "deviations each kdbench plugin documents (`kdbench list`, the method's docstring); "
            "and sources that quote one another (a KD row re-printed by DKD and LS is one "
            "measurement)."]
        if subset:
            caveats.append(f"These runs trained on a subset of {', '.join(map(str, subset))} "
                           "images per class: not the published protocol.")
        held = sorted({str(v) for v in sub["val_per_class"].dropna()})
        if held:
            caveats.append(f"These runs held out a validation split (`val_per_class = "
                           f"{' / '.join(held)}`) to choose the best epoch on: they trained on "
                           "fewer images than the sources, which train on the whole training set.")
        return "\n".join(lines) + "\n\n" + " ".join(caveats + self.remarks)

    @staticmethod
    def _epochs(sub: pd.DataFrame) -> str:
        return _counts([None if pd.isna(e) else int(e) for e in sub["epochs"]], " ep")

    @staticmethod
    def _seeds(sub: pd.DataFrame) -> str:
        done = sub[sub["status"] == "done"]
        n = done.groupby(["row", "pair"])["seed"].nunique()
        if not len(n):
            return "no done runs"
        lo, hi = int(n.min()), int(n.max())
        if lo == hi:
            return f"{lo} seed{'s' if lo != 1 else ''} per cell"
        return f"{lo}–{hi} seeds per cell"

    @staticmethod
    def _precision(sub: pd.DataFrame, tsub: pd.DataFrame) -> str:
        teachers = tsub.drop_duplicates("run_id") if len(tsub) else tsub
        flags = list(sub["autocast"]) + (list(teachers["autocast"]) if len(teachers) else [])
        known = [bool(f) for f in flags if f is not None and not pd.isna(f)]
        if not known:
            return "not recorded"
        n_bf16 = sum(known)
        if n_bf16 == 0:
            return "fp32"
        return f"bf16 autocast ({n_bf16} of {len(known)} runs)"

    @staticmethod
    def _teachers(tsub: pd.DataFrame) -> str:
        if not len(tsub):
            return "—"
        tsub = tsub.drop_duplicates("run_id")
        loaded = int(tsub["checkpoint"].sum())
        trained = len(tsub) - loaded
        parts = []
        if trained:
            epochs = [None if pd.isna(e) else int(e) for e in tsub.loc[~tsub["checkpoint"], "epochs"]]
            parts.append(f"trained here ({trained}, {_counts(epochs, ' ep')})")
        if loaded:
            parts.append(f"published checkpoints loaded and evaluated ({loaded})")
        return "; ".join(parts)


# ------------------------------------------------------------------------------- markdown
def _cell_text(s: stats.CellSummary, note: str) -> str:
    if s.n == 0:
        return "—" + note
    if s.n == 1:  # no spread and no interval from a single run
        return f"{s.mean:.2f} (n=1){note}"
    return f"{s.mean:.2f} ± {s.std:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}] (n={s.n}){note}"


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
        row_order = sub.sort_values(["row_order", "objective_order"], kind="stable")["row"]
        row_order = row_order.drop_duplicates().tolist()
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
        header = "| Method | " + " | ".join(pairs) + " |"
        sep = "|---|" + "---|" * len(pairs)
        body = [f"| {lbl} | " + " | ".join(cells) + " |" for lbl, cells in lines.items()]
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
        md = "\n".join([f"## {title}", "", intro, "", header, sep, *body, "",
                        *[line + "\n" for line in below if line]])
        if len(tsub):
            md += "\n" + _diagnostics_table(tsub) + "\n"
        out.append((title, md, long_rows))
    return out


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


# Diagnostics shown in the teacher table (kdbench.diagnostics): accuracy, soft-label entropy and
# non-target mass at the distillation temperature, and the Section 4.2 distances.
DIAGNOSTICS = ("top1", "entropy_T", "nontarget_mass_T", "d_intra", "d_inter", "d_intra_over_inter")


def _present(value) -> bool:
    """A name that is set (pandas turns a missing one into None or NaN)."""
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
                      reference_file: str | None = None, plot: bool = True,
                      literature_sources: list[str] | None = None) -> list[Path]:
    """Writes leaderboard.md (at ``metric``), leaderboard.csv (both metrics) and (with
    matplotlib) leaderboard.png (at ``metric``) into ``out_dir``; returns the paths written.
    Without matplotlib the plot is skipped with one line on stderr. ``literature_sources``
    (e.g. ["CRD", "DKD"]) shows those published numbers beside every table, for records run
    before their recipe named ``[reference] literature``."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    if not runs_dir.exists():
        raise UserError(f"{runs_dir}: runs folder does not exist")
    metric = metric or "final"
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if literature_sources is not None:
        try:
            literature.resolve_sources(literature_sources)
        except ValueError as exc:
            raise UserError(f"literature: {exc}") from None
    df, tdf, notes = collect(runs_dir)
    tables = build_tables(df, tdf, metric, reference_file, notes, literature_sources)
    md = "# kdbench leaderboard\n\n" + "\n".join(md for _, md, _ in tables)
    written = [out_dir / "leaderboard.md", out_dir / "leaderboard.csv"]
    atomic_write_bytes(written[0], md.encode())
    long = pd.DataFrame([r for *_, rows in tables for r in rows])
    for c in INT_COLUMNS:  # counts stay integers next to empty fields
        long[c] = long[c].astype("Int64")
    atomic_write_bytes(written[1], long.to_csv(index=False).encode())
    if plot:
        from kdbench.plot import MissingMatplotlib, write_plot

        try:
            written.append(write_plot([(title, [r for r in rows if r["metric"] == metric])
                                       for title, _, rows in tables], metric,
                                      out_dir / "leaderboard.png"))
        except MissingMatplotlib as exc:
            print(f"kdbench leaderboard: {exc}", file=sys.stderr)
    return written
