"""What the leaderboard's modules share: the metrics, the significance level and the marks."""
from __future__ import annotations

from kdbench import stats

METRICS = ("final", "best")
INT_COLUMNS = ("n", "n_excluded", "n_paired", "n_paired_best", "mde_n")
ALPHA = stats.ALPHA
MARK_UP, MARK_DOWN, MARK_TIED = "▲", "▼", "≈"
MDE_MORE_SEEDS = (10, 20)  # the detectable difference is also shown for these seed counts


def _present(value) -> bool:
    """A name that is set (pandas turns a missing one into None or NaN)."""
    return isinstance(value, str) and bool(value)
