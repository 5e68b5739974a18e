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

The package: :mod:`.records` collects the records into frames (one run per run id and per
seed), :mod:`.comparisons` computes each column's statistics (paired comparisons with the
baseline and the best row, the detectable difference), :mod:`.cells` writes the cell text,
marks, legend, detectable-difference line and CSV rows, :mod:`.literature_cells` the published
numbers beside the cells and their protocol table, :mod:`.tables` the markdown tables, and
:mod:`.write` writes leaderboard.md, .csv and .png (:func:`write_leaderboard`).
"""
from __future__ import annotations

from kdbench.leaderboard.common import (
    ALPHA, INT_COLUMNS, MARK_DOWN, MARK_TIED, MARK_UP, MDE_MORE_SEEDS, METRICS,
)
from kdbench.leaderboard.records import collect
from kdbench.leaderboard.tables import DIAGNOSTICS, build_tables, load_reference
from kdbench.leaderboard.write import write_leaderboard

__all__ = [
    "ALPHA", "DIAGNOSTICS", "INT_COLUMNS", "MARK_DOWN", "MARK_TIED", "MARK_UP", "MDE_MORE_SEEDS",
    "METRICS", "build_tables", "collect", "load_reference", "write_leaderboard",
]
