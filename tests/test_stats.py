"""The leaderboard's statistics (kdbench.stats) and how the leaderboard uses them.

Reference values are computed independently of the code under test, and each says how:
Student-t quantiles are the printed table values (e.g. t_{0.975,4} = 2.776445); the paired
t-test p-value uses the closed-form CDF of Student's t with 3 degrees of freedom; sign-flip
p-values are enumerated by hand in the comments or by a brute-force enumeration over Python
Fractions (no numpy, no kdbench); Holm adjustments are worked out by hand; the detectable
effect size is checked by Monte Carlo simulation of the t-test with a fixed seed. The
leaderboard tests write record.json files by hand with designed accuracies, so the expected
means, differences and marks follow from the design.
"""
from __future__ import annotations

import csv
import json
import math
import os
from fractions import Fraction
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from kdbench import stats
from kdbench.api import UserError
from kdbench.cli import main
from kdbench.leaderboard import write_leaderboard

# Student t quantiles t_{0.975, df} from a printed table (two-sided 95%).
T975 = {1: 12.7062, 3: 3.182446, 4: 2.776445, 7: 2.364624, 11: 2.200985}


def brute_sign_flip(diffs) -> Fraction:
    """Exact two-sided sign-flip p by enumeration in rational arithmetic: share of sign
    patterns whose |sum| is at least the observed |sum| (no floating point, no numpy)."""
    d = [Fraction(x) for x in diffs]
    obs = abs(sum(d))
    hits = sum(1 for s in product((1, -1), repeat=len(d)) if abs(sum(a * b for a, b in zip(s, d))) >= obs)
    return Fraction(hits, 2 ** len(d))


# ----------------------------------------------------------------------------- cell summary
def test_t_interval_of_one_to_five():
    # mean 3, sample variance (4+1+0+1+4)/4 = 2.5, half width t_{.975,4}·sqrt(2.5)/sqrt(5)
    # = 2.776445·sqrt(0.5) = 1.963243.
    s = stats.summarize([1, 2, 3, 4, 5])
    assert s.n == 5 and s.mean == pytest.approx(3.0)
    assert s.std == pytest.approx(math.sqrt(2.5))
    half = T975[4] * math.sqrt(2.5) / math.sqrt(5)
    assert half == pytest.approx(1.963243, abs=1e-6)
    assert (s.ci_low, s.ci_high) == (pytest.approx(3 - half, abs=1e-6), pytest.approx(3 + half, abs=1e-6))


def test_n1_has_no_spread_and_n2_has_the_wide_t_interval():
    one = stats.summarize([71.5])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 71.5, None, None, None)
    none = stats.summarize([])
    assert (none.n, none.mean, none.ci_low) == (0, None, None)
    # [70, 72]: mean 71, sd sqrt(2), half width t_{.975,1}·sqrt(2)/sqrt(2) = 12.7062.
    two = stats.summarize([70, 72])
    assert two.std == pytest.approx(math.sqrt(2))
    assert (two.ci_low, two.ci_high) == (pytest.approx(71 - 12.7062, abs=1e-4), pytest.approx(71 + 12.7062, abs=1e-4))
    with pytest.raises(ValueError):
        stats.summarize([1.0, float("nan")])


# ---------------------------------------------------------------------- paired comparison
def test_paired_t_test_against_a_hand_computation():
    # diffs [1, 1, 0, 2]: mean 1, sd sqrt(2/3), t = 1 / (sqrt(2/3)/2) = sqrt(6), 3 df.
    # Student t CDF with 3 df: F(t) = 1/2 + (1/pi)·(u/(1+u²) + atan(u)), u = t/sqrt(3) = sqrt(2),
    # so p = 2(1 - F) = 1 - (2/pi)(sqrt(2)/3 + atan(sqrt(2))) = 0.0917208.
    p_hand = 1 - (2 / math.pi) * (math.sqrt(2) / 3 + math.atan(math.sqrt(2)))
    assert p_hand == pytest.approx(0.0917208, abs=1e-6)
    r = stats.paired([10, 12, 11, 14], [9, 11, 11, 12])
    assert r.n == 4 and r.diff == pytest.approx(1.0) and r.sd == pytest.approx(math.sqrt(2 / 3))
    assert r.p_t == pytest.approx(p_hand, rel=1e-6)
    half = T975[3] * math.sqrt(2 / 3) / 2  # 1.299228
    assert (r.ci_low, r.ci_high) == (pytest.approx(1 - half, abs=1e-5), pytest.approx(1 + half, abs=1e-5))
    # Sign flips of (1, 1, 0, 2): |sum| >= 4 needs 1, 1, 2 of one sign; the 0 takes either sign:
    # 2 · 2 = 4 of 16 patterns.
    assert r.p_perm == pytest.approx(0.25) and r.p == r.p_perm and r.test == "sign-flip"


def test_paired_edge_cases():
    one = stats.paired([70.0], [69.0])
    assert (one.n, one.diff, one.sd, one.ci_low, one.p_t, one.p_perm, one.p) == (1, 1.0, None, None, None, None, None)
    assert stats.paired([], []).n == 0
    # The same difference on every seed: no spread, t = 2/0; the limit p = 0, while the
    # sign-flip test has 2 of 8 patterns as extreme (p = 0.25).
    same = stats.paired([3, 4, 5], [1, 2, 3])
    assert same.p_t == 0.0 and same.p_perm == pytest.approx(0.25)
    assert same.ci_low == same.ci_high == pytest.approx(2.0)
    equal = stats.paired([3, 4, 5], [3, 4, 5])
    assert equal.p_t == 1.0 and equal.p_perm == 1.0
    # n = 2: diffs (3, -1): |sums| of ±3±1 are 4, 2, 2, 4, all >= |3 - 1| = 2: p = 1.
    two = stats.paired([4, 0], [1, 1])
    assert two.p_perm == 1.0
    # n > 10: no exact permutation test, the t-test p is used.
    rng = np.random.default_rng(0)
    a = rng.normal(size=12)
    big = stats.paired(a + 1, a + rng.normal(size=12))
    assert big.p_perm is None and big.p == big.p_t and big.test == "t"
    with pytest.raises(ValueError):
        stats.paired([1, 2], [1])


def test_sign_flip_p_enumerated_by_hand():
    # diffs (1, 2, 3), mean 2: the 8 patterns have sums ±6, ±4 (-1+2+3), ±2 (1-2+3), ±0 (1+2-3);
    # only +6 and -6 reach |mean| >= 2: p = 2/8.
    assert stats.sign_flip_p([1, 2, 3]) == 0.25
    assert stats.sign_flip_p([1, 1, 1, 1, 1]) == 2 / 32  # only all + and all -
    assert stats.sign_flip_p([0, 0]) == 1.0


def test_sign_flip_p_counts_float_ties():
    # Accuracies are multiples of 100/48 here; sums of such floats that are equal in exact
    # arithmetic differ in the last bits. The p must be that of the rational numbers.
    units = [1, 2, -3, 3, 1, -1]
    want = brute_sign_flip(units)
    diffs = [u * 100 / 48 for u in units]
    assert stats.sign_flip_p(diffs) == pytest.approx(float(want), abs=0)
    assert want == brute_sign_flip([Fraction(100, 48) * u for u in units])


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max
    # 0.02, 0.03, 0.06, 0.06; back in the given order (None: no test, not in the family):
    got = stats.holm([0.01, 0.04, 0.03, 0.005, None])
    assert got[:4] == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), pytest.approx(0.02)]
    assert got[4] is None
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]  # 2·0.5 = 1 caps, 0.6 is raised to it
    assert stats.holm([]) == []


# ------------------------------------------------------------------ detectable difference
@pytest.mark.parametrize("n", [2, 5, 12])
def test_detectable_effect_size_has_80_percent_power_by_simulation(n):
    """At the solved effect size d, a simulated two-sided paired t-test (critical value from
    the printed t table) rejects in 80% of 40,000 samples (standard error 0.002)."""
    d = stats.detectable_effect_size(n)
    rng = np.random.default_rng(1234)
    x = rng.normal(loc=d, scale=1.0, size=(40_000, n))
    t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(n))
    power = float(np.mean(np.abs(t) > T975[n - 1]))
    assert power == pytest.approx(0.80, abs=0.01)
    # and a 10% smaller effect is detected clearly less often
    x = rng.normal(loc=0.9 * d, scale=1.0, size=(40_000, n))
    t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(n))
    assert float(np.mean(np.abs(t) > T975[n - 1])) < 0.77


def test_detectable_effect_size_for_five_seeds_and_the_large_n_limit():
    # n = 5 pairs: d = 1.682 (the often quoted "about 1.7"; the power at exactly 1.70 is 0.808).
    assert stats.detectable_effect_size(5) == pytest.approx(1.682, abs=0.002)
    # Large n: the normal approximation d ≈ (z_.975 + z_.8)/sqrt(n) = 2.80158/sqrt(n), which
    # the t-test needs slightly more than.
    d = stats.detectable_effect_size(400)
    assert 2.80158 / 20 < d < 1.01 * 2.80158 / 20
    assert stats.minimal_detectable_difference(0.5, 5) == pytest.approx(0.5 * stats.detectable_effect_size(5))
    with pytest.raises(ValueError):
        stats.detectable_effect_size(1)


def test_pooled_sd():
    # sqrt((2·1² + 4·2²) / (2 + 4)) = sqrt(3); the n = 1 sample carries no information.
    sd, dof = stats.pooled_sd([(1.0, 3), (2.0, 5), (None, 1)])
    assert sd == pytest.approx(math.sqrt(3)) and dof == 6
    assert stats.pooled_sd([(None, 1)]) == (None, 0)


# ------------------------------------------------------------------------ the leaderboard
PAIR = "T→S"


def write_record(folder: Path, rid: str, *, seed, method_set=None, objective="ce", status="done",
                 final=None, best=None, selected_on=None, baseline="KD", ref_method=None,
                 order=0, kind="student", mtime=None, teacher_id=None, pair=PAIR, group="g",
                 dataset="d"):
    """A record.json with the fields the leaderboard reads."""
    best = final if best is None else best
    rec = {"id": rid, "kind": kind, "status": status, "spec": {"seed": seed},
           "final": {"top1": final} if status == "done" else None,
           "best": ({"top1": best, **({"selected_on": selected_on} if selected_on else {})}
                    if status == "done" else None)}
    if kind == "student":
        rec["teacher_id"] = teacher_id
        rec["meta"] = {"group": group, "dataset": dataset, "pair": pair, "pair_index": 0,
                       "method_set": method_set, "method_set_index": order,
                       "objective": objective, "objective_index": 0,
                       "teacher_reference_row": False, "baseline": baseline,
                       "ref_method": ref_method, "ref_teacher": None, "ref_student": None,
                       "reference": None}
    else:
        rec["meta"] = {"group": group, "dataset": dataset, "pair": pair, "objective": objective}
        rec["diagnostics"] = {}
    path = folder / ("students" if kind == "student" else "teachers") / rid / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    if mtime is not None:
        os.utime(path, ns=(mtime, mtime))
    return path


def write_rows(folder: Path, rows: dict[str, list], **kw):
    for order, (label, values) in enumerate(rows.items()):
        for seed, v in enumerate(values):
            if v is not None:
                write_record(folder, f"s-{label}-{seed}", seed=seed, method_set=label,
                             final=v, order=order, **kw)


def md_rows(md: str) -> dict[str, list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Teacher (pair)")
             and not ln.startswith("| Method")]
    return {c[0]: c[1:] for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in lines)}


def csv_rows(path: Path, metric="final") -> dict[str, dict]:
    return {r["row"]: r for r in csv.DictReader(path.read_text().splitlines()) if r["metric"] == metric}


def num(x: str) -> float | None:
    return float(x) if x != "" else None


KD = [70, 71, 69, 72, 70, 71, 70, 69]
D_BETTER = [2, 3, 1, 2, 4, 2, 3, 1]
D_CLOSE = [-1, 1, -0.5, 0.5, -1, 1, -0.5, 0]  # Close = Better + these
D_WORSE = [3, 2, 4, 3, 2, 5, 3, 2]  # Worse = KD - these
D_STUDENT = [1, -1, 1, -1, 1, -1, 0.5, -0.5]  # Student = KD + these
DESIGN = {
    "Student": [k + d for k, d in zip(KD, D_STUDENT)],
    "KD": KD,
    "Better": [k + d for k, d in zip(KD, D_BETTER)],
    "Close": [k + d + c for k, d, c in zip(KD, D_BETTER, D_CLOSE)],
    "Worse": [k - d for k, d in zip(KD, D_WORSE)],
}


def test_marks_and_numbers_against_the_baseline_and_the_best_row(tmp_path):
    """8 seeds. Against KD: Better, Close (all differences > 0) and Worse (all < 0) have sign-flip
    p = 2/256 (only all + and all - are as extreme); Student's differences sum to 0: p = 1.
    Holm over 4 rows: 4·2/256 = 1/32, 3·2/256 -> 1/32, 2·2/256 -> 1/32, 1·1 = 1: Better and Close
    ▲, Worse ▼, Student unmarked. Against the best row (Better): KD and Worse all below (2/256),
    Student all below but one tie (4/256: the 0 takes either sign), Close - Better sums to -0.5
    with magnitudes summing to 5.5, so every pattern's sum is an odd multiple of 0.5: p = 1.
    Holm: 1/32, 1/32, 1/32 and 1: only Close is ≈ (cannot be told apart from the best)."""
    runs = tmp_path / "runs"
    write_rows(runs, DESIGN)
    written = write_leaderboard(runs, tmp_path / "lb", plot=False)
    md = written[0].read_text()
    rows = md_rows(md)
    assert list(rows) == ["Student", "KD", "Better", "Close", "Worse"]
    cell = {k: v[0] for k, v in rows.items()}
    assert cell["Better"].startswith("**") and cell["Better"].endswith("▲**") and "≈" not in cell["Better"]
    assert cell["Close"].endswith("▲ ≈")
    assert cell["Worse"].endswith("▼") and "≈" not in cell["Worse"]
    assert cell["Student"].endswith("(n=8)") and cell["KD"].endswith("(n=8)")
    # KD: mean 562/8 = 70.25, sample sd of KD by hand: squared deviations sum to 7.5, sd = sqrt(7.5/7).
    sd_kd = math.sqrt(7.5 / 7)
    half = T975[7] * sd_kd / math.sqrt(8)
    assert cell["KD"] == f"70.25 ± {sd_kd:.2f} [{70.25 - half:.2f}, {70.25 + half:.2f}] (n=8)"
    assert "▲/▼" in md and "≈: cannot be told apart" in md and "Baseline: KD" in md
    assert "sign-flip permutation" in md and "nan" not in md.lower()

    c = csv_rows(written[1])
    better = c["Better"]
    # Better - KD = D_BETTER: mean 2.25, squared deviations sum to 7.5 (by hand), sd = sqrt(7.5/7).
    sd_d = math.sqrt(7.5 / 7)
    half = T975[7] * sd_d / math.sqrt(8)
    assert num(better["mean"]) == pytest.approx(72.5)
    assert num(better["diff"]) == pytest.approx(2.25) and int(better["n_paired"]) == 8
    assert num(better["diff_ci_low"]) == pytest.approx(2.25 - half, abs=1e-5)
    assert num(better["diff_ci_high"]) == pytest.approx(2.25 + half, abs=1e-5)
    # t = 2.25/(sd_d/sqrt(8)) = 6.15 > 5.408 = t_{0.9995,7} (table): two-sided p < 0.001.
    assert 0 < num(better["p_t"]) < 0.001
    assert num(better["p_perm"]) == pytest.approx(2 / 256) and better["p_test"] == "sign-flip"
    assert num(better["p_holm"]) == pytest.approx(1 / 32) and better["significant"] == "True"
    assert better["is_best"] == "True" and better["best_row"] == "Better"
    assert num(c["Worse"]["diff"]) == pytest.approx(-np.mean(D_WORSE))
    assert num(c["Student"]["p_perm"]) == 1.0 and num(c["Student"]["p_holm"]) == 1.0
    assert c["Student"]["significant"] == "False"
    assert c["KD"]["baseline_row"] == "" and c["KD"]["p_holm"] == ""  # no test against itself
    assert num(c["Close"]["p_best"]) == 1.0 and c["Close"]["tied_with_best"] == "True"
    assert float(brute_sign_flip(D_CLOSE)) == 1.0
    for label, p_hand in (("KD", Fraction(2, 256)), ("Worse", Fraction(2, 256)), ("Student", Fraction(4, 256))):
        diffs = [a - b for a, b in zip(DESIGN[label], DESIGN["Better"])]
        assert brute_sign_flip(diffs) == p_hand
        assert num(c[label]["p_best"]) == pytest.approx(float(p_hand))
        assert num(c[label]["p_best_holm"]) == pytest.approx(1 / 32)
        assert c[label]["tied_with_best"] == "False"

    # The smallest detectable difference: SD of the paired differences against KD pooled over
    # the 4 rows (numpy, ddof 1) times the effect size for 8 seeds.
    diffs = [D_STUDENT, D_BETTER, [b + x for b, x in zip(D_BETTER, D_CLOSE)], [-w for w in D_WORSE]]
    pooled = math.sqrt(np.mean([np.var(d, ddof=1) for d in diffs]))  # equal n: the mean variance
    mde = stats.detectable_effect_size(8) * pooled
    assert num(better["mde_sd_diff"]) == pytest.approx(pooled)
    assert num(better["mde"]) == pytest.approx(mde) and int(better["mde_n"]) == 8
    assert f"{PAIR}: {mde:.2f} with 8 seeds" in md and "80% power" in md


def test_paired_over_shared_seeds_n1_n2_and_failed_runs(tmp_path):
    """Partial lacks seed 1 (a failed run there): n = 2, paired with KD over seeds 0 and 2 only.
    Single has one seed: (n=1), no interval, no test, no NaN anywhere in the markdown."""
    runs = tmp_path / "runs"
    write_rows(runs, {"KD": [70, 72, 74], "Partial": [71, None, 76], "Single": [80]})
    write_record(runs, "s-Partial-1", seed=1, method_set="Partial", status="failed", order=1)
    write_record(runs, "s-Diverged", seed=3, method_set="Partial", status="diverged", order=1)
    written = write_leaderboard(runs, tmp_path / "lb", plot=False)
    md = written[0].read_text()
    cell = {k: v[0] for k, v in md_rows(md).items()}
    # Partial: [71, 76]: mean 73.5, sd sqrt(12.5) = 3.54, half width 12.7062·3.5355/sqrt(2) = 31.77.
    assert cell["Partial"] == "73.50 ± 3.54 [41.73, 105.27] (n=2) (1 diverged) (1 failed)" or \
        cell["Partial"] == "73.50 ± 3.54 [41.73, 105.27] (n=2) (1 failed) (1 diverged)"
    assert cell["Single"] == "**80.00 (n=1)**"
    assert "nan" not in md.lower()
    c = csv_rows(written[1])
    p = c["Partial"]
    # diffs over the shared seeds 0 and 2: 71-70 = 1, 76-74 = 2: mean 1.5; sign flips of (1, 2):
    # |sums| 3, 1, 1, 3 >= 3 twice: p = 0.5.
    assert int(p["n"]) == 2 and int(p["n_paired"]) == 2 and num(p["diff"]) == pytest.approx(1.5)
    assert num(p["p_perm"]) == 0.5 and int(p["n_excluded"]) == 2
    s = c["Single"]
    assert (s["std"], s["ci_low"], s["ci_high"]) == ("", "", "")
    assert int(s["n_paired"]) == 1 and num(s["diff"]) == pytest.approx(10.0)
    assert s["p_t"] == s["p_perm"] == s["p_holm"] == s["significant"] == ""
    assert "▲" not in md.split("Legend")[0] and "▼" not in md.split("Legend")[0]


def test_a_run_id_in_several_folders_counts_once_and_done_is_preferred(tmp_path):
    parent = tmp_path / "all"
    write_rows(parent / "a", {"KD": [70, 72]})
    write_rows(parent / "b", {"KD": [70, 72]})  # the same run ids copied into a second folder
    write_record(parent / "a", "s-X-0", seed=0, method_set="X", final=75, order=1, mtime=10**18)
    # a newer failed copy of the same run id: the done one still counts
    write_record(parent / "b", "s-X-0", seed=0, method_set="X", status="failed", order=1, mtime=2 * 10**18)
    written = write_leaderboard(parent, tmp_path / "lb", plot=False)
    md = written[0].read_text()
    cell = {k: v[0] for k, v in md_rows(md).items()}
    assert cell["KD"].endswith("(n=2)") and "(n=4)" not in md
    assert cell["X"] == "**75.00 (n=1)**"  # not "(1 failed)": the failed copy is the same run
    c = csv_rows(written[1])
    assert int(c["KD"]["n"]) == 2 and num(c["KD"]["mean"]) == 71.0
    note = next(ln for ln in md.splitlines() if ln.startswith("Run ids found in several folders"))
    assert "s-X-0: 2 records (a/students/s-X-0 (done), b/students/s-X-0 (failed)); counted a/students/s-X-0 (done)" in note
    assert "s-KD-0" in note and "s-KD-1" in note


def test_two_run_ids_for_one_seed_count_once_newest_wins(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, "s-old", seed=0, method_set="KD", final=50.0, mtime=10**18)
    write_record(runs, "s-new", seed=0, method_set="KD", final=60.0, mtime=2 * 10**18)
    write_record(runs, "s-one", seed=1, method_set="KD", final=62.0, mtime=10**18)
    written = write_leaderboard(runs, tmp_path / "lb", plot=False)
    md = written[0].read_text()
    c = csv_rows(written[1])
    assert int(c["KD"]["n"]) == 2 and num(c["KD"]["mean"]) == pytest.approx(61.0)  # (60 + 62)/2
    note = next(ln for ln in md.splitlines() if ln.startswith("Several runs of one row, pair and seed"))
    assert f"KD · {PAIR} · seed 0: counted s-new (done, newest), left out s-old (done)" in note


def test_rows_take_the_place_their_newest_record_gives(tmp_path):
    """The same runs trained from another version of the recipe (a row added before them since)
    carry their old position; the row goes where its newest record puts it."""
    runs = tmp_path / "runs"
    old, new = 10**18, 2 * 10**18
    write_record(runs, "s-st", seed=0, method_set="Student", final=50.0, order=0, mtime=new)
    write_record(runs, "s-kd", seed=0, method_set="KD", final=51.0, order=1, mtime=new)
    write_record(runs, "s-ctl-a", seed=0, method_set="Control", final=52.0, order=2, mtime=old)
    write_record(runs, "s-ctl-b", seed=1, method_set="Control", final=52.5, order=3, mtime=new)
    write_record(runs, "s-ours", seed=0, method_set="Ours", final=53.0, order=2, mtime=new)
    md = write_leaderboard(runs, tmp_path / "lb", plot=False)[0].read_text()
    assert list(md_rows(md)) == ["Student", "KD", "Ours", "Control"]


def test_baseline_of_the_same_teacher_objective(tmp_path):
    """The baseline set KD has rows for teacher objectives ce and intra: Ours (intra) is compared
    with KD (intra), FitNet (ce) with KD (ce), and Student (no teacher) with the first, KD (ce)."""
    runs = tmp_path / "runs"
    for seed in range(3):
        write_record(runs, f"s-st-{seed}", seed=seed, method_set="Student", objective=None, final=60 + seed, order=0)
        write_record(runs, f"s-kdce-{seed}", seed=seed, method_set="KD", objective="ce", final=70 + seed, order=1)
        write_record(runs, f"s-kdin-{seed}", seed=seed, method_set="KD", objective="intra", final=80 + seed, order=1)
        write_record(runs, f"s-fit-{seed}", seed=seed, method_set="FitNet", objective="ce", final=71 + seed, order=2)
        write_record(runs, f"s-ours-{seed}", seed=seed, method_set="Ours", objective="intra", final=83 + seed, order=3)
    written = write_leaderboard(runs, tmp_path / "lb", plot=False)
    c = csv_rows(written[1])
    assert c["Ours"]["baseline_row"] == "KD (intra)" and num(c["Ours"]["diff"]) == pytest.approx(3.0)
    assert c["FitNet"]["baseline_row"] == "KD (ce)" and num(c["FitNet"]["diff"]) == pytest.approx(1.0)
    assert c["Student"]["baseline_row"] == "KD (ce)" and num(c["Student"]["diff"]) == pytest.approx(-10.0)
    assert c["KD (ce)"]["baseline_row"] == "" and c["KD (intra)"]["baseline_row"] == ""
    assert "own teacher objective" in written[0].read_text()


def test_without_a_baseline_the_kd_reference_row_or_none(tmp_path):
    runs = tmp_path / "kd"
    write_rows(runs, {"Student": [60, 61], "Distil": [62, 64]}, baseline=None)
    for seed in range(2):  # Distil is the row the reference table calls KD
        path = runs / "students" / f"s-Distil-{seed}" / "record.json"
        rec = json.loads(path.read_text())
        rec["meta"]["ref_method"] = "KD"
        path.write_text(json.dumps(rec))
    c = csv_rows(write_leaderboard(runs, tmp_path / "lb1", plot=False)[1])
    assert c["Student"]["baseline_row"] == "Distil" and num(c["Student"]["diff"]) == pytest.approx(-2.5)

    runs = tmp_path / "none"
    write_rows(runs, {"A": [60, 61, 65], "B": [62, 64, 63]}, baseline=None)
    written = write_leaderboard(runs, tmp_path / "lb2", plot=False)
    md = written[0].read_text()
    c = csv_rows(written[1])
    assert c["A"]["baseline_row"] == "" and c["A"]["p_holm"] == ""
    assert "▲/▼" not in md and "Baseline" not in md
    # The detectable difference then comes from the differences against the best row (B):
    # A - B = (-2, -3, 2): mean -1, sample sd sqrt((1 + 4 + 9)/2) = sqrt(7).
    assert num(c["A"]["mde_sd_diff"]) == pytest.approx(math.sqrt(7)) and c["A"]["mde_against"] == "best"
    assert f"{stats.detectable_effect_size(3) * math.sqrt(7):.2f} with 3 seeds" in md


def test_metric_best_and_what_it_was_selected_on(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(2):
        write_record(runs, f"s-kd-{seed}", seed=seed, method_set="KD", final=70 + seed, best=75 + seed)
    out = tmp_path / "lb"
    assert main(["leaderboard", str(runs), "-o", str(out), "--metric", "best"]) == 0
    md = (out / "leaderboard.md").read_text()
    assert "**best** epoch (selected on the test set (optimistic))" in md
    assert "**75.50 ±" in md and "70.50" not in md
    rows = list(csv.DictReader((out / "leaderboard.csv").read_text().splitlines()))
    assert {(r["metric"], r["mean"], r["selected_on"]) for r in rows} == {("final", "70.5", ""), ("best", "75.5", "test")}
    assert main(["leaderboard", str(runs), "-o", str(out)]) == 0
    assert "**final** epoch" in (out / "leaderboard.md").read_text()

    runs = tmp_path / "val"
    for seed in range(2):
        write_record(runs, f"s-kd-{seed}", seed=seed, method_set="KD", final=70, best=74, selected_on="validation")
    md = write_leaderboard(runs, tmp_path / "lb2", metric="best", plot=False)[0].read_text()
    assert "**best** epoch (selected on the validation split)" in md and "optimistic" not in md
    write_record(runs, "s-kd-2", seed=2, method_set="KD", final=70, best=74, selected_on="test")
    md = write_leaderboard(runs, tmp_path / "lb3", metric="best", plot=False)[0].read_text()
    assert "selected on the validation split for 2 of 3 runs, on the test set (optimistic) for the others" in md


def test_teacher_rows_have_intervals_and_no_marks(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_record(runs, f"t-{seed}", seed=seed, kind="teacher", final=80.0 + seed)
        write_record(runs, f"s-kd-{seed}", seed=seed, method_set="KD", final=70.0 + seed, teacher_id=f"t-{seed}")
        write_record(runs, f"s-x-{seed}", seed=seed, method_set="X", final=75.0 + seed, teacher_id=f"t-{seed}", order=1)
    written = write_leaderboard(runs, tmp_path / "lb", plot=False)
    cell = {k: v[0] for k, v in md_rows(written[0].read_text()).items()}
    # [80, 81, 82]: mean 81, sd 1, half width t_{.975,2}·1/sqrt(3) = 4.302653/sqrt(3) = 2.48.
    assert cell["Teacher (ce)"] == "81.00 ± 1.00 [78.52, 83.48] (n=3)"
    c = csv_rows(written[1])
    assert c["Teacher (ce)"]["kind"] == "teacher" and c["Teacher (ce)"]["baseline_row"] == ""
    assert c["Teacher (ce)"]["is_best"] == ""


def test_a_done_record_without_a_number_is_named(tmp_path):
    runs = tmp_path / "runs"
    path = write_record(runs, "s-bad", seed=0, method_set="KD", final=70.0)
    rec = json.loads(path.read_text())
    del rec["final"]
    path.write_text(json.dumps(rec))
    with pytest.raises(UserError, match=r"s-bad/record.json: a done record without a number in final.top1"):
        write_leaderboard(runs, tmp_path / "lb", plot=False)
    with pytest.raises(UserError, match="--metric 'last'"):
        write_leaderboard(runs, tmp_path / "lb", metric="last", plot=False)


def test_the_plot_draws_the_95_percent_interval(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the test extra installs it
    from matplotlib.axes import Axes

    from kdbench.plot import ci_error

    assert ci_error({"mean": 3.0, "ci_low": 1.0, "ci_high": 6.0}) == [[2.0], [3.0]]
    assert ci_error({"mean": 3.0, "ci_low": None, "ci_high": None}) is None
    calls = []
    real = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        if not (hasattr(x, "__len__") and len(x) == 0):  # the legend's empty handles
            calls.append((x, kwargs.get("xerr")))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    runs = tmp_path / "runs"
    write_rows(runs, {"KD": [1, 2, 3, 4, 5], "One": [7]})
    written = write_leaderboard(runs, tmp_path / "lb")
    assert written[2].read_bytes()[:4] == b"\x89PNG"
    by_mean = {x: xerr for x, xerr in calls}
    half = T975[4] * math.sqrt(2.5) / math.sqrt(5)  # as in test_t_interval_of_one_to_five
    lo, hi = by_mean[3.0]
    assert lo[0] == pytest.approx(half, abs=1e-6) and hi[0] == pytest.approx(half, abs=1e-6)
    assert by_mean[7.0] is None  # n = 1: no bar


def test_a_baseline_without_runs_in_the_table_is_said(tmp_path):
    runs = tmp_path / "runs"
    write_rows(runs, {"A": [60, 61], "B": [62, 64]}, baseline="KD")  # no KD runs here
    md = write_leaderboard(runs, tmp_path / "lb", plot=False)[0].read_text()
    assert "Baseline KD (the recipe's `[leaderboard] baseline = \"KD\"`) has no runs in this table" in md
    assert "▲/▼" not in md
