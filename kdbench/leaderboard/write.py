"""write_leaderboard: leaderboard.md, leaderboard.csv and leaderboard.png from a runs folder."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from kdbench import literature
from kdbench.api import UserError
from kdbench.leaderboard.common import INT_COLUMNS, METRICS
from kdbench.leaderboard.html import write_html
from kdbench.leaderboard.records import collect
from kdbench.leaderboard.tables import build_tables
from kdbench.store import atomic_write_bytes


def write_leaderboard(runs_dir: Path, out_dir: Path, metric: str | None = None,
                      reference_file: str | None = None, plot: bool = True,
                      literature_sources: list[str] | None = None) -> list[Path]:
    """Writes leaderboard.md (at ``metric``), leaderboard.csv (both metrics), index.html (the
    same tables as one self-contained page, with every run's curves; :mod:`.html`) and (with
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
    md = "# kdbench leaderboard\n\n" + _unreadable(notes.get("unreadable"), runs_dir) + "\n".join(
        md for _, md, _ in tables)
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
    from kdbench.param_plot import write_sweeps  # sweeps.md/.png where a teacher parameter varies

    written += write_sweeps(df, tdf, out_dir, plot=plot)
    # Last, so that the files before keep their places in the list.
    written.append(write_html(out_dir / "index.html", runs_dir, tables, df, tdf, metric,
                              unreadable=notes.get("unreadable")))
    return written


def _unreadable(bad: list[tuple[str, str]] | None, runs_dir: Path) -> str:
    """The records left out because they cannot be used, said on stderr and atop the markdown:
    a whole row must never vanish without a word."""
    if not bad:
        return ""
    for path, why in bad:
        print(f"kdbench leaderboard: left out {runs_dir / path}: {why}", file=sys.stderr)
    items = "".join(f"- `{path}`: {why}\n" for path, why in bad)
    return (f"**{len(bad)} record(s) under {runs_dir} cannot be used and are left out** "
            "(`kdbench run` trains those runs again, keeping the bad file beside as "
            "`record.json.corrupt-<time>`):\n\n" + items + "\n")
