"""The leaderboard's plot: every row's top-1 accuracy per teacher→student pair, with error bars.

Laid out like the tables: one row of panels per table (recipe group × dataset), one panel per
pair (the table's columns), the table's rows on the y axis in table order (teachers first). Each
dot is the mean over seeds with its 95% confidence interval (Student t) as the error bar; a row
with one seed has no interval and no bar. Where the recipe names a reference table, the paper's
number is a hollow diamond on the same line. Teacher rows are grey.

matplotlib is the optional extra ``plot`` (``pip install 'kdbench[plot]'``); without it
:func:`write_plot` raises :class:`MissingMatplotlib`, which the leaderboard reports in one line.
Only the object-oriented API is used (no pyplot), so nothing global is touched.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

from kdbench.store import atomic_write_bytes

TEACHER_COLOR = "0.45"
STUDENT_COLOR = "tab:blue"
PAPER_COLOR = "tab:red"


class MissingMatplotlib(RuntimeError):
    """matplotlib is not installed."""


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def ci_error(row: dict) -> list[list[float]] | None:
    """The asymmetric error bar [[below], [above]] of a row's 95% interval around its mean;
    None (no bar) without an interval (n = 1)."""
    lo, hi, mean = row.get("ci_low"), row.get("ci_high"), row.get("mean")
    if not (_finite(lo) and _finite(hi) and _finite(mean)):
        return None
    return [[mean - lo], [hi - mean]]


def write_plot(tables: Sequence[tuple[str, list[dict]]], metric: str, path: Path) -> Path:
    """``tables``: (title, long-form rows with row/kind/pair/mean/n/ci_low/ci_high/paper) per
    table, as :func:`kdbench.leaderboard.build_tables` makes them (one metric's rows). Writes a
    PNG to ``path`` atomically."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib("matplotlib is not installed, so no plot was written "
                                "(pip install 'kdbench[plot]' to get leaderboard.png)") from None

    layout = []
    for title, rows in tables:
        pairs = list(dict.fromkeys(r["pair"] for r in rows))
        labels = list(dict.fromkeys(r["row"] for r in rows))
        layout.append((title, pairs, labels, rows))
    ncols = max(len(p) for _, p, _, _ in layout)
    height_per_row = max(2.5, 0.32 * max(len(lbl) for _, _, lbl, _ in layout) + 1.2)
    fig = Figure(figsize=(3.6 * ncols + 1.8, height_per_row * len(layout)), dpi=100,
                 layout="constrained")
    axes = fig.subplots(len(layout), ncols, squeeze=False)
    for i, (title, pairs, labels, rows) in enumerate(layout):
        ypos = {lbl: len(labels) - 1 - k for k, lbl in enumerate(labels)}  # first row on top
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(pairs):
                ax.set_visible(False)
                continue
            pair = pairs[j]
            for r in (r for r in rows if r["pair"] == pair):
                y = ypos[r["row"]]
                color = TEACHER_COLOR if r.get("kind") == "teacher" else STUDENT_COLOR
                if _finite(r["mean"]):
                    ax.errorbar(r["mean"], y, xerr=ci_error(r), fmt="o", color=color, ms=4,
                                capsize=3, elinewidth=1)
                if _finite(r.get("paper")):
                    ax.plot(r["paper"], y, marker="D", ms=5, mfc="none", color=PAPER_COLOR,
                            linestyle="none")
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(list(reversed(labels)) if j == 0 else [])
            ax.set_ylim(-0.6, len(labels) - 0.4)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(pair, fontsize=9)
            ax.set_xlabel(f"top-1 (%), {metric} epoch", fontsize=8)
            ax.tick_params(labelsize=8)
        axes[i][0].annotate(title, xy=(0, 1), xycoords="axes fraction", xytext=(0, 18),
                            textcoords="offset points", fontsize=10, fontweight="bold",
                            ha="left", va="bottom")
    handles = [
        axes[0][0].errorbar([], [], xerr=[], fmt="o", color=STUDENT_COLOR, ms=4, capsize=3,
                            label="student: mean and 95% CI over seeds"),
        axes[0][0].errorbar([], [], xerr=[], fmt="o", color=TEACHER_COLOR, ms=4, capsize=3,
                            label="teacher: mean and 95% CI"),
    ]
    if any(_finite(r.get("paper")) for _, _, _, rows in layout for r in rows):
        handles += axes[0][0].plot([], [], marker="D", ms=5, mfc="none", color=PAPER_COLOR,
                                   linestyle="none", label="paper")
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
               frameon=False)
    buf = io.BytesIO()
    # No "Software" (matplotlib version) text chunk: the same results give the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
