"""Published numbers (:mod:`kdbench.literature`) beside a table's cells: the cell text
("lit. CRD 74.92 (Δ +0.28)"), the CSV's lit_<source> columns, and the sources' protocols next
to kdbench's own under the table."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from kdbench import literature
from kdbench.leaderboard.common import _present
from kdbench.leaderboard.comparisons import _Row


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
