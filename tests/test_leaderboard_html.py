"""index.html (kdbench/leaderboard/html.py) opened in a real headless browser: Debian's chromium
and chromium-driver, driven through Selenium (.ci/run installs them; without them this test
fails, it never skips).

The page is generated from hand-written records of recipes/table1_tiny.toml's grid (3 pairs,
11 method rows, 2 seeds; no training), with designed accuracies so that the expected row order
of a sorted column is known without the leaderboard's code, per-epoch curves, and one failed,
one diverged and one interrupted run. The test clicks a column header and checks the order,
checks that the interval plots and a run's curves are drawn, that every cell says what
leaderboard.md says, that the page fits a 1366-pixel-wide window, and saves a screenshot.
"""
from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import pytest

from kdbench.cli import main
from kdbench.leaderboard import write_leaderboard
from kdbench.leaderboard.screenshot import capture, headless_chromium
from kdbench.recipe import expand, load_recipe
from kdbench.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
EPOCHS = 4
BAD = {("KD", 0, 1): "diverged", ("FitNet", 1, 0): "failed", ("RKD", 2, 1): "interrupted"}


def designed(row_index: int, pair_index: int, seed: int) -> float:
    """A different row order in every column (7 is invertible mod 11: no two rows tie)."""
    return 40.0 + 1.5 * ((7 * row_index + 3 * pair_index) % 11) + 0.5 * seed


def epochs_to(final: float) -> list[dict]:
    out = []
    for e in range(1, EPOCHS + 1):
        frac = e / EPOCHS
        out.append({"epoch": e, "lr": 0.05, "train_loss": 2.0 / e, "train_top1": final * frac + 5,
                    "val_top1": final * frac + 1, "val_loss": 2.2 / e,
                    "test_top1": final * frac, "test_loss": 2.3 / e, "test_images": 200})
    return out


def write_grid(registry, out: Path) -> dict:
    """Records for table1_tiny's grid; {(row, pair index): [top-1 of each done seed]}."""
    loaded = load_recipe(ROOT / "recipes" / "table1_tiny.toml", registry, check_device=False,
                         check_files=False)
    teachers, students = expand(loaded, registry)
    store = RunStore(out, out / "teachers")
    # The keys a teacher record holds since issue 15 (the table has 17 columns).
    theory = {"d_intra": 2.39, "d_inter": 1.44, "d_intra_over_inter": 1.66, "log_d_intra_over_inter": 0.508,
              "L_intra": 5.58, "L_inter": 7.27, "L_intra_over_inter": 0.767, "theorem1_K": 9.03,
              "theorem1_rhs": 1.661, "log_theorem1_rhs": 0.507}
    diag = {"top1": 70.0, "entropy_T": 1.2, "nontarget_mass_T": 0.3, **theory,
            "trained": {"embedding": "pooled_normalized", **theory}}
    for i, t in enumerate(teachers):
        final = 70.0 + i % 3
        store.write_record("teacher", t.id, {
            "id": t.id, "kind": "teacher", "status": "done", "spec": t.spec, "meta": t.meta_dict(),
            "teacher_id": None, "recipe": "recipes/table1_tiny.toml", "epochs": epochs_to(final),
            "final": {"top1": final}, "best": {"top1": final, "epoch": EPOCHS}, "diagnostics": diag})
    rows = [ms.display for ms in loaded.recipe.method_sets]
    pairs = [p.display for p in loaded.recipe.pairs]
    done: dict = {}
    for s in students:
        m = s.meta_dict()
        k, p, seed = rows.index(m["method_set"]), pairs.index(m["pair"]), s.spec["seed"]
        status = BAD.get((m["method_set"], p, seed), "done")
        rec = {"id": s.id, "kind": "student", "status": status, "spec": s.spec, "meta": m,
               "teacher_id": s.teacher.id if s.teacher else None,
               "recipe": "recipes/table1_tiny.toml"}
        if status == "done":
            top1 = designed(k, p, seed)
            rec.update(epochs=epochs_to(top1), final={"top1": top1, "epoch": EPOCHS},
                       best={"top1": top1, "epoch": EPOCHS, "selected_on": "validation"})
            done.setdefault((m["method_set"], p), []).append(top1)
        elif status == "failed":
            rec["error"] = "RuntimeError: a designed failure"
        elif status == "diverged":
            rec["diverged"] = {"epoch": 2, "step": 7, "terms": {}}
        else:
            rec["interrupted"] = {"signal": "SIGTERM", "epoch": 3, "step": 11}
        store.write_record("student", s.id, rec)
    return {"rows": rows, "pairs": pairs, "done": done}


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install -y chromium chromium-driver")
    driver = headless_chromium()
    yield driver
    driver.quit()


def md_cells(md: str) -> dict[str, list[str]]:
    """The main table's cells of leaderboard.md, bold marks removed."""
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| Method |"))
    out = {}
    for ln in lines[head + 2:]:
        if not ln.startswith("|"):
            break
        label, *cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])]
        out[label] = [c[2:-2] if c.startswith("**") else c for c in cells]
    return out


def test_the_page_in_a_browser(registry, tmp_path, browser):
    t0 = time.perf_counter()
    grid = write_grid(registry, tmp_path / "runs")
    out = tmp_path / "lb"
    written = write_leaderboard(tmp_path / "runs", out, plot=False)
    page = out / "index.html"
    assert page in written
    text = page.read_text()
    # Self-contained: no stylesheet, script or image fetched from anywhere.
    assert not re.search(r"<(script|img|link|iframe)[^>]*\s(src|href)=", text)
    assert not re.search(r"(src|href)=\"(https?:)?//", text)

    browser.set_window_size(1366, 900)
    browser.get(page.as_uri())
    js = browser.execute_script
    assert js("return document.querySelector('table.diag').getBoundingClientRect().right "
              "<= window.innerWidth"), "the teachers' diagnostics are cut at 1366 px"
    assert js("return document.documentElement.scrollWidth <= window.innerWidth"), \
        "the 3-column page scrolls sideways at 1366 px"

    # Every cell says what leaderboard.md says (the page adds no numbers of its own).
    md = md_cells((out / "leaderboard.md").read_text())
    shown = js("""return Array.from(document.querySelectorAll('#lb0 tbody tr')).map(
        tr => [tr.cells[0].textContent, Array.from(tr.cells).slice(1).map(td => td.textContent)])""")
    assert {label: cells for label, cells in shown} == md
    # Numbers right-aligned; the column's best cell marked (as bold in the markdown).
    assert js("return getComputedStyle(document.querySelector('#lb0 td.num')).textAlign") == "right"
    for j, pair in enumerate(grid["pairs"]):
        means = {r: sum(v) / len(v) for (r, p), v in grid["done"].items() if p == j}
        best = max(means, key=means.get)
        assert js(f"return Array.from(document.querySelectorAll('#lb0 tbody.sorted tr')).filter("
                  f"tr => tr.cells[{j + 1}].classList.contains('best')).map(tr => tr.cells[0].textContent)") == [best]

    # A header click sorts the method rows by that column's mean (descending, then ascending);
    # the expected order comes from the designed accuracies, rows without a result last.
    def order():
        return js("return Array.from(document.querySelectorAll('#lb0 tbody.sorted tr'))"
                  ".map(tr => tr.cells[0].textContent)")

    assert order() == grid["rows"]
    header = browser.find_elements("css selector", "#lb0 thead th")[2]  # WRN-40-2→WRN-16-2
    assert header.text.startswith(grid["pairs"][1])
    means = {r: sum(v) / len(v) for (r, p), v in grid["done"].items() if p == 1}
    header.click()
    assert order() == sorted(means, key=means.get, reverse=True) + [r for r in grid["rows"] if r not in means]
    assert header.get_attribute("aria-sort") == "descending"
    header.click()
    assert order() == sorted(means, key=means.get) + [r for r in grid["rows"] if r not in means]
    assert js("return Array.from(document.querySelectorAll('#lb0 tbody.pinned tr')).map("
              "tr => tr.cells[0].textContent)") == ["Teacher (ce)", "Teacher (margin)"]

    # One interval plot per pair: a mark per row with a result, the paper's number as a marker,
    # all of it with real geometry.
    plots = browser.find_elements("css selector", "#t0 figure.ci-plot svg")
    assert len(plots) == 3
    for j, svg in enumerate(plots):
        n_students = sum(1 for (r, p) in grid["done"] if p == j)
        assert len(svg.find_elements("css selector", "circle.mean")) == n_students
        assert len(svg.find_elements("css selector", "rect.mean")) == 2  # two teacher rows
        assert len(svg.find_elements("css selector", "path.ref.paper")) >= n_students
        box = js("const b = arguments[0].getBBox(); return [b.width, b.height]", svg)
        assert box[0] > 200 and box[1] > 100
        widths = js("return Array.from(arguments[0].querySelectorAll('g.ci line')).map("
                    "l => l.getBBox().width)", svg)
        assert widths and max(widths) > 5  # the 95% intervals of the 2-seed rows

    # A cell's runs: a click on its cell opens them and draws each run's top-1 and loss curves.
    browser.find_element("css selector", "#lb0 tbody.sorted tr td:nth-child(2) a.cell").click()
    opened = browser.find_elements("css selector", "details.cellruns[open]")
    assert len(opened) == 1
    # Its paired comparisons are the CSV's numbers.
    label = js("return document.querySelector('#lb0 tbody.sorted tr').cells[0].textContent")
    row = next(r for r in csv.DictReader((out / "leaderboard.csv").read_text().splitlines())
               if r["row"] == label and r["pair"] == grid["pairs"][0] and r["metric"] == "final")
    compare = opened[0].find_element("css selector", ".compare").text
    assert f"vs baseline {row['baseline_row']}: Δ {float(row['diff']):+.2f}" in compare
    assert f"vs the best row {row['best_row']}: Δ {float(row['diff_best']):+.2f}" in compare
    curves = opened[0].find_elements("css selector", ".curves svg")
    assert len(curves) == 2 * len(opened[0].find_elements("css selector", ".run"))
    lines = js("return Array.from(arguments[0].querySelectorAll('.curves polyline')).map("
               "p => [p.getAttribute('class'), p.points.numberOfItems, p.getBBox().width, p.getBBox().height])",
               opened[0])
    assert {c for c, *_ in lines} == {"s-train", "s-val", "s-test"}
    assert all(n == EPOCHS and w > 100 and h > 10 for _, n, w, h in lines)
    href = opened[0].find_element("css selector", "a[href$='record.json']").get_attribute("href")
    assert Path(href.removeprefix("file://")).is_file()
    assert "kdbench run recipes/table1_tiny.toml" in opened[0].text

    # Runs that did not finish are there, saying so.
    for status in ("failed", "diverged", "interrupted"):
        assert len(browser.find_elements("css selector", f".run.status-{status} .badge.{status}")) == 1
    assert "(1 diverged)" in md["KD"][0] and "(1 failed)" in md["FitNet"][1] \
        and "(1 interrupted)" in md["RKD"][2]

    shot = capture(browser, tmp_path / "index.png")
    assert shot.stat().st_size > 10_000
    print(f"index.html {page.stat().st_size} bytes; test {time.perf_counter() - t0:.1f} s; {shot}")


def test_screenshot_from_the_command_line(registry, tmp_path, capsys):
    """`kdbench leaderboard --screenshot` saves the page as Chromium draws it: a PNG 1366 px
    wide, as tall as the page."""
    write_grid(registry, tmp_path / "runs")
    out = tmp_path / "lb"
    assert main(["leaderboard", str(tmp_path / "runs"), "-o", str(out), "--screenshot"]) == 0
    assert f"wrote {out / 'index.png'}" in capsys.readouterr().out
    head = (out / "index.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width == 1366 and height > 900, (width, height)


def test_screenshot_without_a_browser_is_one_line_before_anything_is_written(registry, tmp_path,
                                                                             capsys, monkeypatch):
    from kdbench.leaderboard import screenshot

    write_grid(registry, tmp_path / "runs")
    monkeypatch.setattr(screenshot, "_find", lambda name, path: None if name == "chromium" else path)
    out = tmp_path / "lb"
    assert main(["leaderboard", str(tmp_path / "runs"), "-o", str(out), "--screenshot"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get install -y chromium chromium-driver" in err, err
    assert not out.exists()
