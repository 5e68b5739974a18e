"""Result records -> frames: the student rows (one per counted run) and the teacher rows, a run
id found in several folders counted once, and of several runs of one (row, pair, seed) the
newest; both noted for the table. Nothing is dropped silently: records that cannot be used
(truncated, empty, not an object, without their metadata or numbers) are listed in
``notes["unreadable"]`` with why, and a teacher whose students are counted but whose record is
missing is noted for its table (``"missing_teachers"``)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from kdbench.api import UserError
from kdbench.leaderboard.common import METRICS
from kdbench.store import scan_records


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
    """top-1 at the final and the best epoch (NaN unless done: a good done record has both,
    see :func:`kdbench.store.record_problem`), and what "best" was chosen on."""
    done = rec.get("status") == "done"
    out = {m: float(rec[m]["top1"]) if done else math.nan for m in METRICS}
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


def collect(runs_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The student rows (one per counted run), the teacher rows of the teachers those students
    used, and the notes on duplicates per (group, dataset)."""
    runs_dir = Path(runs_dir)
    teachers_raw, students_raw = [], []
    records, unreadable = scan_records(runs_dir)
    for rec in records:
        if rec.get("kind") == "teacher":
            teachers_raw.append(rec)
        elif rec.get("kind") == "student":
            students_raw.append(rec)
    if not students_raw:
        bad = (f" ({len(unreadable)} record(s) that cannot be used: "
               + "; ".join(f"{path}: {why}" for path, why in unreadable[:3])
               + ("; ..." if len(unreadable) > 3 else "") + ")") if unreadable else ""
        raise UserError(f"{runs_dir}: no student records found{bad} (run `kdbench run RECIPE` "
                        "first, and point the leaderboard at its output folder)")
    notes: dict = {"unreadable": [(_where({"_path": str(path)}, runs_dir) + "/record.json", why)
                                  for path, why in unreadable]}
    teachers = _dedupe_ids(teachers_raw, runs_dir, notes)
    students = _dedupe_ids(students_raw, runs_dir, notes)
    rows = []
    for rec in students.values():
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
                recipe = students[sub.loc[sub["teacher_id"] == tid, "run_id"].iloc[0]].get("recipe")
                notes.setdefault((key[0], key[1]), {}).setdefault("missing_teachers", []).append(
                    f"{tid} (pair {key[2]}, objective {key[3]}): no usable record under {runs_dir}, "
                    "so its row leaves it out; `kdbench run "
                    f"{recipe or 'RECIPE'} --run-id {tid}` trains it again")
                continue
            trows.append({"group": key[0], "dataset": key[1], "pair": key[2], "objective": key[3],
                          "row": f"Teacher ({key[3]})",
                          "pair_order": pair_order, "objective_order": objective_order,
                          "reference_row": reference_row, "run_id": tid,
                          "seed": (t.get("spec") or {}).get("seed", tid),
                          "status": t.get("status"), "where": _where(t, runs_dir),
                          "mtime": _mtime(t), **_metric_values(t), **_protocol_fields(t),
                          "checkpoint": "checkpoint" in (t.get("spec") or {}),
                          "diagnostics": t.get("diagnostics") or {},
                          "objective_spec": (t.get("spec") or {}).get("objective") or {}})
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
