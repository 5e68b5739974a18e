"""Teacher-objective parameter sweeps: one parameter of a teacher objective (e.g. the margin
teacher's λ) against its teachers' diagnostics and the accuracy of the students they taught.

A sweep is found in the records, not declared: within one (recipe group, dataset, pair), the
teachers of one objective plugin whose parameters differ in exactly one numeric parameter, with
at least :data:`MIN_POINTS` distinct values (``recipes/*lambda_sweep.toml`` are such grids). Per
value: the teachers' mean top-1 and Section 4's statistics (:mod:`kdbench.diagnostics`; the
normalised pooled feature φ and, under "f", the representation the objective trained), and per
student method set the mean top-1 over seeds with its 95% Student-t interval.

:func:`write_sweeps` writes ``sweeps.md`` (one table per sweep) and, with matplotlib,
``sweeps.png`` (per sweep: d_intra/d_inter of φ and of f, L_intra/L_inter of φ, and the
teachers' and students' accuracy against the parameter). Nothing is written without a sweep.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd

from kdbench.stats import summarize
from kdbench.store import atomic_write_bytes

MIN_POINTS = 3
# (key in the diagnostics; "f." = under "trained"), column title
TEACHER_METRICS = (
    ("d_intra_over_inter", "φ d_intra/d_inter"),
    ("L_intra_over_inter", "φ L_intra/L_inter"),
    ("theorem1_rhs", "φ K·e^(L_intra−L_inter)"),
    ("f.log_d_intra_over_inter", "f log(d_intra/d_inter)"),
    ("f.L_intra_over_inter", "f L_intra/L_inter"),
)


def _diag(d: dict, key: str):
    if key.startswith("f."):
        d = d.get("trained") or {}
        key = key[2:]
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def find_sweeps(df: pd.DataFrame, tdf: pd.DataFrame) -> list[dict]:
    """The sweeps in the leaderboard's frames (``collect``'s students and teachers): dicts with
    group, dataset, pair, objective (plugin name), param, and points (value, teachers, teacher
    metrics, per method set the students' summary)."""
    if not len(tdf) or "objective_spec" not in tdf:
        return []
    sweeps = []
    tdf = tdf.drop_duplicates(subset=["group", "dataset", "pair", "run_id"])
    for (group, dataset, pair), sub in tdf.groupby(["group", "dataset", "pair"], sort=False):
        by_name: dict[str, list] = {}
        for row in sub.itertuples():
            spec = row.objective_spec if isinstance(row.objective_spec, dict) else {}
            if spec.get("name"):
                by_name.setdefault(spec["name"], []).append((row, spec.get("params") or {}))
        for name, teachers in by_name.items():
            keys = set().union(*(p.keys() for _, p in teachers))
            varying = [k for k in sorted(keys) if len({repr(p.get(k)) for _, p in teachers}) > 1]
            if len(varying) != 1:
                continue
            param = varying[0]
            values = {p.get(param) for _, p in teachers}
            if len(values) < MIN_POINTS or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in values):
                continue
            points = []
            for value in sorted(values):
                rows = [r for r, p in teachers if p.get(param) == value]
                ids = [r.run_id for r in rows]
                diags = [r.diagnostics if isinstance(r.diagnostics, dict) else {} for r in rows]
                metrics = {k: _mean(_diag(d, k) for d in diags) for k, _ in TEACHER_METRICS}
                metrics["top1"] = _mean(float(r.final) for r in rows)
                studs = df[(df["teacher_id"].isin(ids)) & (df["pair"] == pair) & (df["status"] == "done")]
                students = {ms: summarize(g["final"].tolist())
                            for ms, g in studs.groupby("method_set", sort=False)}
                points.append({"value": value, "teachers": ids, "metrics": metrics,
                               "students": students,
                               "f": next((d["trained"].get("embedding") for d in diags
                                          if isinstance(d.get("trained"), dict)), None)})
            sweeps.append({"group": group, "dataset": dataset, "pair": pair, "objective": name,
                           "param": param, "points": points})
    return sweeps


def _fmt(v, digits=4) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def _cell(s) -> str:
    if s.mean is None:
        return ""
    text = f"{s.mean:.2f}"
    if s.ci_low is not None:
        text += f" [{s.ci_low:.2f}, {s.ci_high:.2f}]"
    return text + f" (n={s.n})"


def sweeps_markdown(sweeps: list[dict]) -> str:
    out = ["# Teacher-objective parameter sweeps", "",
           "Per value: the teachers' final top-1 and Section 4's statistics on the test set (mean "
           "over teachers; φ = normalised pooled feature, f = the representation the objective "
           "trained), and each student method set's final top-1, mean [95% CI] over seeds.", ""]
    for sw in sweeps:
        methods = list(dict.fromkeys(m for p in sw["points"] for m in p["students"]))
        f = next((p["f"] for p in sw["points"] if p["f"]), None)
        out += [f"## {sw['group']} — {sw['dataset']} — {sw['pair']}: {sw['objective']}.{sw['param']}"
                + (f" (f = {f})" if f else ""), ""]
        head = [sw["param"], "teacher top-1", *[t for _, t in TEACHER_METRICS], *methods]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for p in sw["points"]:
            cells = [f"{p['value']:g}", _fmt(p["metrics"]["top1"], 4),
                     *[_fmt(p["metrics"][k]) for k, _ in TEACHER_METRICS],
                     *[_cell(p["students"][m]) if m in p["students"] else "" for m in methods]]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _plot(sweeps: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    panels = (("d_intra_over_inter", "φ: d_intra / d_inter"),
              ("f.log_d_intra_over_inter", "f: log(d_intra / d_inter)"),
              ("L_intra_over_inter", "φ: L_intra / L_inter"),
              (None, "top-1 (%), final epoch"))
    fig = Figure(figsize=(3.4 * len(panels), 2.8 * len(sweeps) + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(len(sweeps), len(panels), squeeze=False)
    for i, sw in enumerate(sweeps):
        xs = [p["value"] for p in sw["points"]]
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            if key is not None:
                ys = [p["metrics"][key] for p in sw["points"]]
                ax.plot(xs, [math.nan if y is None else y for y in ys], "o-", color="0.3", ms=4)
            else:
                ax.plot(xs, [p["metrics"]["top1"] or math.nan for p in sw["points"]], "s--",
                        color="0.5", ms=4, label="teacher")
                methods = list(dict.fromkeys(m for p in sw["points"] for m in p["students"]))
                for m in methods:
                    pts = [(p["value"], p["students"][m]) for p in sw["points"] if m in p["students"]]
                    pts = [(x, s) for x, s in pts if s.mean is not None]
                    err = [[s.mean - s.ci_low if s.ci_low is not None else 0 for _, s in pts],
                           [s.ci_high - s.mean if s.ci_high is not None else 0 for _, s in pts]]
                    ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=err, fmt="o-",
                                ms=4, capsize=3, label=m)
                ax.legend(fontsize=7, frameon=False)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(sw["param"], fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        axes[i][0].annotate(f"{sw['pair']} · {sw['objective']}", xy=(0, 1), xycoords="axes fraction",
                            xytext=(0, 16), textcoords="offset points", fontsize=9,
                            fontweight="bold", ha="left", va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_sweeps(df: pd.DataFrame, tdf: pd.DataFrame, out_dir: Path, plot: bool = True) -> list[Path]:
    """sweeps.md (and sweeps.png with matplotlib) in ``out_dir`` if the records hold a sweep."""
    sweeps = find_sweeps(df, tdf)
    if not sweeps:
        return []
    out_dir = Path(out_dir)
    written = [out_dir / "sweeps.md"]
    atomic_write_bytes(written[0], sweeps_markdown(sweeps).encode())
    if plot:
        try:
            written.append(_plot(sweeps, out_dir / "sweeps.png"))
        except ImportError:
            pass  # the leaderboard's own plot already said that matplotlib is missing
    return written
