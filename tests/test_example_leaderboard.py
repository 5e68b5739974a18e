"""The committed example (``leaderboard/``) is what ``kdbench leaderboard`` writes from its
committed records (``leaderboard/records/``: the ``record.json`` of every run of
recipes/fashion_mnist_cpu.toml, without weights): the same ``leaderboard.md`` and the same
numbers in ``leaderboard.csv``, a grid that is complete, and a page whose record links resolve in
a clone and that ``leaderboard/README.md`` shows as a screenshot."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from conftest import read_records
from kdbench.leaderboard import write_leaderboard
from kdbench.recipe import expand, load_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "leaderboard"


def test_the_example_is_what_its_records_give(tmp_path):
    write_leaderboard(EXAMPLE / "records", tmp_path, plot=False)
    assert (tmp_path / "leaderboard.md").read_text() == (EXAMPLE / "leaderboard.md").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "leaderboard.csv"),
                                  pd.read_csv(EXAMPLE / "leaderboard.csv"))


def test_the_records_are_the_whole_grid_of_the_recipe(registry):
    loaded = load_recipe(ROOT / "recipes" / "fashion_mnist_cpu.toml", registry, check_device=False,
                         check_files=False)
    teachers, students = expand(loaded, registry)
    records = read_records(EXAMPLE / "records")
    assert set(records) == {s.id for s in teachers + students}  # today's ids, nothing else
    assert {r["status"] for r in records.values()} == {"done"}
    assert not list((EXAMPLE / "records").rglob("*.pt"))  # records only, no weights


def test_the_page_links_its_records_and_the_readme_shows_it():
    page = (EXAMPLE / "index.html").read_text()
    links = re.findall(r'href="([^"#]+record\.json)"', page)
    assert len(links) == len(read_records(EXAMPLE / "records"))
    assert all((EXAMPLE / link).is_file() for link in links), [l for l in links if not (EXAMPLE / l).is_file()]
    readme = (EXAMPLE / "README.md").read_text()
    assert "](index.png)" in readme and (EXAMPLE / "index.png").stat().st_size > 50_000
    assert (EXAMPLE / "index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
