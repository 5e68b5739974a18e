"""The leaderboard's teacher-objective parameter sweeps (kdbench.param_plot) and the teacher
table's Section 4 columns, from hand-made frames shaped like leaderboard.records.collect's."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from kdbench.leaderboard.tables import _diagnostics_table
from kdbench.param_plot import find_sweeps, sweeps_markdown, write_sweeps


def teacher(run_id, lam, d_ratio, top1, pair="A→B", name="margin_intra", delta=0.5, seed=0):
    diag = {"top1": top1, "d_intra": 2.0 * d_ratio, "d_inter": 2.0, "d_intra_over_inter": d_ratio,
            "L_intra": 3.0, "L_inter": 2.0, "L_intra_over_inter": 1.5, "theorem1_rhs": 7.0,
            "entropy_T": 1.0, "nontarget_mass_T": 0.5,
            "trained": {"embedding": "logits", "log_d_intra_over_inter": 10 * lam, "L_intra": 5.0,
                        "L_inter": 1.0, "log_theorem1_rhs": 4.0, "L_intra_over_inter": 5.0}}
    return {"group": "g", "dataset": "d", "pair": pair, "objective": f"λ={lam}", "run_id": run_id,
            "seed": seed, "final": top1, "diagnostics": diag, "status": "done",
            "objective_spec": {"name": name, "params": {"lambda": lam, "delta": delta}}}


def student(run_id, teacher_id, method_set, seed, top1, pair="A→B"):
    return {"group": "g", "dataset": "d", "pair": pair, "run_id": run_id, "teacher_id": teacher_id,
            "method_set": method_set, "seed": seed, "final": top1, "status": "done"}


def frames():
    tdf = pd.DataFrame([teacher("t0", 0.0, 1.5, 80.0), teacher("t1", 0.02, 1.4, 81.0),
                        teacher("t2", 0.1, 1.2, 79.0),
                        teacher("t3", 0.02, 1.4, 81.0, delta=0.9),  # a 2nd varying key: no sweep
                        teacher("c", 0.0, 1.0, 70.0, name="ce")])
    df = pd.DataFrame([student(f"s{t}{s}", f"t{t}", "KD", s, 60.0 + t + s) for t in range(3) for s in range(3)]
                      + [student("x", "t1", "KD", 3, 0.0) | {"status": "failed"}])
    return df, tdf


def test_sweep_found_with_teacher_metrics_and_student_intervals():
    df, tdf = frames()
    tdf = tdf[tdf["run_id"] != "t3"]
    (sw,) = find_sweeps(df, tdf)
    assert (sw["objective"], sw["param"]) == ("margin_intra", "lambda")
    assert [p["value"] for p in sw["points"]] == [0.0, 0.02, 0.1]
    assert [p["metrics"]["d_intra_over_inter"] for p in sw["points"]] == [1.5, 1.4, 1.2]
    assert [p["metrics"]["f.log_d_intra_over_inter"] for p in sw["points"]] == pytest.approx([0, 0.2, 1.0])
    kd = sw["points"][1]["students"]["KD"]  # teacher t1: seeds 0..2 -> 61, 62, 63 (failed left out)
    assert kd.n == 3 and kd.mean == pytest.approx(62.0)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) · sd / √n
    assert kd.ci_low == pytest.approx(62.0 - half) and kd.ci_high == pytest.approx(62.0 + half)
    md = sweeps_markdown([sw])
    assert "| 0.02 | 81 | 1.4 |" in md and "62.00 [" in md and "(f = logits)" in md


def test_no_sweep_when_two_parameters_vary_or_too_few_values(tmp_path):
    df, tdf = frames()
    assert find_sweeps(df, tdf) == []  # t3 varies delta as well
    assert find_sweeps(df, tdf[tdf["run_id"].isin(["t0", "t1"])]) == []  # two values only
    assert write_sweeps(df, tdf, tmp_path) == [] and not list(tmp_path.iterdir())


def test_write_sweeps_files(tmp_path):
    pytest.importorskip("matplotlib")
    df, tdf = frames()
    written = write_sweeps(df, tdf[tdf["run_id"] != "t3"], tmp_path)
    assert [p.name for p in written] == ["sweeps.md", "sweeps.png"]
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_teacher_table_shows_section4_and_the_trained_representation():
    _, tdf = frames()
    text = _diagnostics_table(tdf[tdf["run_id"].isin(["t1", "c"])])
    head = next(ln for ln in text.splitlines() if ln.startswith("| Teacher"))
    for col in ("L_intra", "L_inter", "L_intra_over_inter", "theorem1_rhs", "f.log_d_intra_over_inter",
                "f.L_intra", "f.log_theorem1_rhs"):
        assert f"| {col} |" in head
    assert "λ=0.02 (f = logits)" in text


# --------------------------------------------------------------------------------------------
# the λ-sweep recipes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,counts", [("cifar100_lambda_sweep", (35, 35)),
                                         ("fashion_mnist_lambda_sweep", (7, 21))])
def test_lambda_sweep_recipes(registry, name, counts):
    from pathlib import Path

    from kdbench.recipe import expand, load_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    loaded = load_recipe(recipes / f"{name}.toml", registry, check_device=False, check_files=False)
    teachers, students = expand(loaded, registry)
    assert (len(teachers), len(students)) == counts
    lams = sorted({t.spec["objective"]["params"]["lambda"] for t in teachers
                   if t.spec["objective"]["name"] == "margin_intra"})
    assert lams == [0.0, 0.01, 0.02, 0.03, 0.05, 0.1]
    assert {t.spec["objective"]["params"]["embedding"] for t in teachers
            if t.spec["objective"]["name"] == "margin_intra"} == {"pooled_normalized"}
    for s in students:  # every student is the same KD on its teacher
        assert [(m["name"], m["weight"]) for m in s.spec["methods"]] == [("ce", 0.1), ("kd", 0.9)]
    if name.startswith("cifar100"):  # λ = 0.02 and CE: the paper recipe's teachers (one cache)
        home = load_recipe(recipes / "cifar100_homogeneous.toml", registry, check_device=False,
                           check_files=False)
        assert loaded.teacher_dir == home.teacher_dir
        wrn = {t.id for t in expand(home, registry)[0] if t.meta.model == "wrn_40_2"}
        ours = {t.id for t in teachers if t.spec["objective"]["name"] == "ce"
                or t.spec["objective"]["params"]["lambda"] == 0.02}
        assert len(ours) == 10 and ours <= wrn
