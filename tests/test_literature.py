"""The literature's published numbers (kdbench/literature.py, kdbench/references/
literature-cifar100.csv) and the leaderboard that shows them beside kdbench's cells.

The published values asserted here were read off the CSV by hand (line numbers in comments);
kdbench's values are designed so that every Δ = kdbench − published is a two-decimal number
worked out in the comments."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from kdbench import literature
from kdbench.api import UserError
from kdbench.leaderboard import write_leaderboard
from kdbench.literature import LiteratureError, load, method_name, pair_models, parse_top1
from kdbench.recipe import load_recipe
from kdbench.recipe.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "kdbench" / "references" / "literature-cifar100.csv"
SHARED = ROOT.parent / "shared" / "reference" / "literature" / "literature-cifar100.csv"


# ------------------------------------------------------------------------------ the names
def test_every_name_in_the_csv_maps():
    """Every teacher, student and method spelling of the 464 rows is in a table (load() raises
    on any other), and the spellings the brief lists map where they should."""
    lit = load()
    assert len(lit.rows) == 464
    raw = list(csv.DictReader(SHIPPED.read_text(encoding="utf-8").splitlines()))
    for r in raw:
        assert r["teacher"] in literature.MODELS and r["student"] in literature.MODELS
        assert (r["method"] in literature.METHODS
                or r["method"] in literature.SOURCE_METHODS.get(literature.source_key(r["source"]), {}))
        assert r["dataset"] in literature.DATASETS
    m = literature.MODELS
    assert m["wrn-40-2"] == m["WRN-40-2"] == m["Wrn_40_2"] == "wrn_40_2"
    assert m["ResNet-8x4"] == m["ResNet8x4"] == m["resnet8x4"] == "resnet8x4"
    assert m["ShuffleNetV1"] == m["ShuffleNet-V1"] == m["ShuffleV1"] == "shufflenetv1"
    assert m["SHN-V2"] == m["ShuffleNet-V2"] == "shufflenetv2"
    assert m["MN-V2"] == m["MobileNet-V2"] == m["MobileNetV2"] == "mobilenetv2"  # mobile_half
    assert m["ResNet50"] == m["ResNet-50"] == "resnet50"
    assert m["DeiT-Tiny"] is None and m["Swin-T"] is None  # no kdbench model
    assert method_name("MLKD") == "MLLD" and method_name("KD+DOT") == "DOT"
    assert method_name("KD+Ours", "LS (Sun et al. CVPR 2024)") == "KD+LS"
    assert method_name("KD+Ours") is None  # "Ours" means LS only in the LS README
    assert method_name("Student") == "student" and method_name("Ours+RKD") is None
    # Rows per source as the CSV's README counts them (CRD 189 CIFAR-100 + 1 ImageNet quote).
    per = {}
    for r in lit.rows:
        per[r.key] = per.get(r.key, 0) + 1
    assert (per["CRD"], per["DKD"], per["DOT"], per["LS"], per["DIST"]) == (190, 33, 14, 125, 77)
    # Only CIFAR-100 rows are compared; the 12 LS ViT rows have no kdbench student.
    compared = [r for r in lit.rows if r.kdbench_dataset and r.teacher_model and r.student_model]
    assert len(compared) == 366 - 12


def test_the_shipped_csv_is_the_curated_one_with_every_provenance_column():
    if SHARED.exists():
        assert SHIPPED.read_bytes() == SHARED.read_bytes()
    header = next(csv.reader(SHIPPED.read_text(encoding="utf-8").splitlines()))
    assert header == list(literature.COLUMNS)


def test_an_unknown_spelling_is_an_error_naming_the_line(tmp_path):
    text = SHIPPED.read_text(encoding="utf-8").replace(",wrn-40-2,wrn-16-2,teacher,75.61,",
                                                       ",wrn-40-2,wrn-16-3,teacher,75.61,", 1)
    bad = tmp_path / "lit.csv"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(LiteratureError, match=r"lit\.csv:2: student 'wrn-16-3' is not a model "
                       r"spelling kdbench knows \(add the spelling to kdbench/literature\.py MODELS\)"):
        load(bad)
    bad.write_text(SHIPPED.read_text(encoding="utf-8").replace(",teacher,75.61,", ",teacher,75,61,", 1))
    with pytest.raises(LiteratureError, match=r"lit\.csv:2: 12 fields, expected 11 "):
        load(bad)  # "75,61": one field too many


# ---------------------------------------------------------------------------- the numbers
def test_top1_as_printed():
    assert parse_top1("75.61") == (75.61, None)
    assert parse_top1("74.43±0.24") == (74.43, 0.24)
    assert parse_top1("N/A") == (None, None)
    for bad in ("75,61", "", "74.43+-0.24", "about 75"):
        with pytest.raises(ValueError):
            parse_top1(bad)
    lit = load()
    dist = lit.lookup("DIST (Huang et al. NeurIPS 2022)", "cifar100", "resnet56", "resnet20", "DIST")
    assert (dist.top1, dist.mean, dist.spread, dist.line) == ("71.75±0.30", 71.75, 0.30, 423)
    fsp = lit.lookup("CRD (Tian et al. ICLR 2020)", "cifar100", "wrn_40_2", "wrn_40_1", "FSP")
    assert fsp.top1 == "N/A" and fsp.mean is None


# ----------------------------------------------------------------------------- the rule
def test_pair_matching_rule():
    # Zoo models: their kdbench names, whatever the ref names.
    assert pair_models("wrn_40_2", "wrn_16_2", "WRN-40-2", "WRN-16-2", False)[:2] == ("wrn_40_2", "wrn_16_2")
    # A generic model: the ref name, when the literature knows it and no paper table is named.
    assert pair_models("wrn", "timm", "wrn-40-2", "ShuffleV2", False)[:2] == ("wrn_40_2", "shufflenetv2")
    assert pair_models("wrn", "timm", "wrn-40-2", "ShuffleV2", True)[:2] == (None, None)  # paper names
    assert pair_models("wrn", "resnet8x4", "WRN-40-9", None, False)[:2] == (None, "resnet8x4")
    # A ref name contradicting a zoo model is said; the trained model counts.
    t, s, notes = pair_models("resnet32x4", "shufflenetv1", "resnet32x4", "ShuffleV2", False)
    assert (t, s) == ("resnet32x4", "shufflenetv1")
    assert notes == ["ref_student 'ShuffleV2' names shufflenetv2, but the student is "
                     "shufflenetv1; matched as shufflenetv1"]


# ------------------------------------------------------------------------ the leaderboard
LIT = ["CRD", "DKD", "DIST", "LS"]
P1, P2 = "resnet32x4→resnet8x4", "WRN-40-2→WRN-16-2"
PAIRS = {P1: ("resnet32x4", "resnet8x4", "resnet32x4", "resnet8x4"),
         P2: ("wrn_40_2", "wrn_16_2", "WRN-40-2", "WRN-16-2")}
# label -> (ref_method, final top-1 of seeds 0 and 1 for P1, for P2)
ROWS = {
    "Student": ("student", (72.8, 73.0), (73.0, 73.4)),
    "KD": ("KD", (73.5, 74.1), (74.5, 75.1)),
    "DKD": ("DKD", (76.0, 76.2), (75.9, 76.3)),
    "DIST": ("DIST", (76.5, 76.9), (75.0, 75.4)),
    "KD+LS": (None, (76.0, 76.4), (75.8, 76.2)),  # no ref_method: the label names the row
    "CRD+KD": ("CRD+KD", (75.0, 75.6), (76.0, 76.6)),  # no published CRD+KD number
}
TEACHER_TOP1 = {P1: 79.0, P2: 75.9}
P3 = "ResNet50→ResNet34"  # the paper's Table 1 pair; no literature source has it


def _write(folder: Path, kind: str, rid: str, rec: dict) -> None:
    path = folder / ("students" if kind == "student" else "teachers") / rid / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def write_crd_runs(runs: Path, reference: dict | None, pairs: dict = PAIRS) -> None:
    """Records as kdbench writes them for two CRD-benchmark pairs: students on a GPU with
    precision auto (bf16 autocast), teachers on the CPU (fp32), 240 epochs, best = final + 0.5.
    A pair other than P1 gets P2's values."""
    for p, (pair, (tm, sm, rt, rs)) in enumerate(pairs.items()):
        tid = f"t-{tm}"
        t = TEACHER_TOP1.get(pair, 75.9)
        _write(runs, "teacher", tid, {
            "id": tid, "kind": "teacher", "status": "done",
            "spec": {"model": {"name": tm, "params": {}}, "dataset": {"name": "cifar100"},
                     "precision": "auto", "schedule": {"epochs": 240}, "seed": 0},
            "final": {"top1": t}, "best": {"top1": t, "selected_on": "test"},
            "provenance": {"gpu": None}, "diagnostics": {}})
        for m, (label, (ref_method, v1, v2)) in enumerate(ROWS.items()):
            for seed, value in enumerate(v1 if pair == P1 else v2):
                rid = f"s-{p}-{m}-{seed}"
                needs_teacher = label != "Student"
                _write(runs, "student", rid, {
                    "id": rid, "kind": "student", "status": "done",
                    "spec": {"model": {"name": sm, "params": {}},
                             "dataset": {"name": "cifar100", "subset_per_class": None},
                             "precision": "auto", "schedule": {"epochs": 240}, "seed": seed,
                             "teacher": tid if needs_teacher else None},
                    "teacher_id": tid if needs_teacher else None,
                    "final": {"top1": value},
                    "best": {"top1": value + 0.5, "selected_on": "test"},
                    "provenance": {"gpu": "NVIDIA H200"},
                    "meta": {"group": "crd-benchmark", "dataset": "cifar100", "pair": pair,
                             "pair_index": p, "method_set": label, "method_set_index": m,
                             "objective": "ce" if needs_teacher else None,
                             "objective_index": 0 if needs_teacher else -1,
                             "teacher_reference_row": needs_teacher, "baseline": "KD",
                             "teacher_model": tm, "student_model": sm, "ref_method": ref_method,
                             "ref_teacher": rt, "ref_student": rs, "reference": reference}})


def md_cells(md: str) -> dict[str, list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Method")]
    rows = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows.setdefault(cells[0], cells[1:])
    return rows


REFERENCE = {"table": None, "dataset": None, "file": None, "literature": LIT}


def test_leaderboard_shows_the_published_numbers_their_delta_and_protocols(tmp_path):
    runs = tmp_path / "runs"
    write_crd_runs(runs, REFERENCE)
    md_path, csv_path, *_ = write_leaderboard(runs, tmp_path / "lb", plot=False)
    md = md_path.read_text()
    cells = md_cells(md)
    p1 = {k: v[0] for k, v in cells.items() if k in ROWS or k.startswith("Teacher")}
    p2 = {k: v[1] for k, v in cells.items() if k in ROWS or k.startswith("Teacher")}
    # Published (CSV lines): teacher 79.42 (CRD 12, DIST 427), student 72.50 (13, 428),
    # KD 73.33 (CRD 21, DKD 207, LS 238), DKD 76.32 (DKD 213, LS 266), DIST 76.31±0.19 (426),
    # KD+LS = LS's "KD+Ours" 76.62 (245).
    # kdbench means: teacher 79.0, Student (72.8+73.0)/2 = 72.9, KD 73.8, DKD 76.1, DIST 76.7,
    # KD+LS 76.2.
    assert p1["Teacher (ce)"].endswith(" · lit. CRD/DIST 79.42 (Δ -0.42)")
    assert p1["Student"].endswith(" · lit. CRD/DIST 72.50 (Δ +0.40)")
    assert "lit. CRD/DKD/LS 73.33 (Δ +0.47)" in p1["KD"]
    assert "lit. DKD/LS 76.32 (Δ -0.22)" in p1["DKD"]
    assert "lit. DIST 76.31±0.19 (Δ +0.39)" in p1["DIST"]
    assert "lit. LS 76.62 (Δ -0.42)" in p1["KD+LS"]
    assert "lit." not in p1["CRD+KD"]  # no source prints CRD+KD
    # WRN-40-2→WRN-16-2: teacher CRD 75.61 (2), student 73.26 (3), KD 74.92 (16, 208, 241),
    # DKD: mdistiller 76.23 (214) and LS 76.24 (269) differ, so both are shown; no DIST number.
    # kdbench: 75.9, 73.2, 74.8, 76.1, 75.2, 76.0.
    assert p2["Teacher (ce)"].endswith(" · lit. CRD 75.61 (Δ +0.29)")
    assert p2["Student"].endswith(" · lit. CRD 73.26 (Δ -0.06)")
    assert "lit. CRD/DKD/LS 74.92 (Δ -0.12)" in p2["KD"]
    assert "lit. DKD 76.23 (Δ -0.13), LS 76.24 (Δ -0.14)" in p2["DKD"]
    assert "lit." not in p2["DIST"]
    assert "lit. LS 76.11 (Δ -0.11)" in p2["KD+LS"]

    # The sources, their repositories and protocols, and kdbench's own, under the table.
    assert "Published numbers of CRD, DKD, DIST, LS beside each cell" in md
    proto = {c[0]: c[1:] for c in (
        [x.strip() for x in ln.strip("|").split("|")] for ln in md.splitlines()
        if ln.startswith("| ") and ("=" in ln.split("|")[1] or "kdbench (this table)" in ln))}
    crd = proto["CRD = CRD (Tian et al. ICLR 2020)"]
    assert crd[0] == "HobbitLong/RepDistiller@b84f547 (README.md)" and crd[1] == "240 ep"
    assert crd[2].startswith("last (train_student.py") and crd[3] == "not stated"
    dkd = proto["DKD = DKD (Zhao et al. CVPR 2022)"]
    assert dkd[0] == "megvii-research/mdistiller@a08d46f (README.md)" and dkd[1] == "240 ep"
    assert "best test accuracy" in dkd[2]
    # LS numbers shown: KD/DKD baselines (lines 238, 241, 266, 269: protocol unstated) and
    # KD+Ours (245, 248: 240 epochs).
    ls = proto["LS = LS (Sun et al. CVPR 2024)"]
    assert ls[0] == "sunshangquan/logit-standardization-KD@f6e5aa5 (README.md)"
    assert ls[1] == "240 ep (2), not stated (4)"
    dist = proto["DIST = DIST (Huang et al. NeurIPS 2022)"]
    assert dist[1] == "240 ep" and dist[3] == "mean±std over an unstated number of runs"
    ours = proto["kdbench (this table)"]
    # 2 pairs × 6 rows × 2 seeds = 24 students under bf16 autocast, 2 fp32 teachers.
    assert ours == ["—", "240 ep", "final (last) epoch",
                    "2 seeds per cell", "bf16 autocast (24 of 26 runs)",
                    "trained here (2, 240 ep)"]
    assert "What a Δ holds besides the method" in md and "RepDistiller reports the last epoch" in md
    assert "no published number" not in md  # every pair is covered

    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    by = {(r["row"], r["pair"], r["metric"]): r for r in rows}
    for key in LIT:
        assert {f"lit_{key}", f"lit_{key}_spread", f"lit_{key}_delta"} <= set(rows[0])
    kd = by[("KD", P1, "final")]
    assert float(kd["lit_CRD"]) == 73.33 and float(kd["lit_CRD_delta"]) == pytest.approx(0.47)
    assert float(kd["lit_LS_delta"]) == pytest.approx(0.47) and kd["lit_DIST"] == ""
    # best = final + 0.5: KD's best mean 74.3, 74.3 - 73.33 = 0.97.
    assert float(by[("KD", P1, "best")]["lit_DKD_delta"]) == pytest.approx(0.97)
    d = by[("DIST", P1, "final")]
    assert (float(d["lit_DIST"]), float(d["lit_DIST_spread"])) == (76.31, 0.19)
    assert float(d["lit_DIST_delta"]) == pytest.approx(0.39)
    t = by[("Teacher (ce)", P2, "final")]
    assert float(t["lit_CRD_delta"]) == pytest.approx(0.29) and t["lit_DIST"] == ""
    assert by[("CRD+KD", P1, "final")]["lit_CRD"] == ""

    # At the best epoch: KD 74.3 - 73.33 = 0.97; the kdbench row says what "best" was chosen on.
    md = write_leaderboard(runs, tmp_path / "lb-best", metric="best", plot=False)[0].read_text()
    assert "lit. CRD/DKD/LS 73.33 (Δ +0.97)" in md_cells(md)["KD"][0]
    assert "| kdbench (this table) | — | 240 ep | best epoch, selected on the test set (optimistic) |" in md


def test_literature_for_records_that_name_none_and_an_unknown_source(tmp_path):
    runs = tmp_path / "runs"
    write_crd_runs(runs, None)  # run before the recipe named [reference] literature
    md = write_leaderboard(runs, tmp_path / "lb0", plot=False)[0].read_text()
    assert "lit." not in md and "Published numbers" not in md
    md = write_leaderboard(runs, tmp_path / "lb1", plot=False, literature_sources=["crd"])[0].read_text()
    assert "lit. CRD 73.33 (Δ +0.47)" in md_cells(md)["KD"][0]
    with pytest.raises(UserError, match="literature: unknown literature source 'Foo'; use one of CRD, "):
        write_leaderboard(runs, tmp_path / "lb2", plot=False, literature_sources=["Foo"])
    shutil.rmtree(runs)
    write_crd_runs(runs, {**REFERENCE, "literature": ["CRD", "Gone"]})
    md = write_leaderboard(runs, tmp_path / "lb3", plot=False)[0].read_text()
    assert ("The source 'Gone' the records name is not in "
            "kdbench/references/literature-cifar100.csv: left out.") in md


def test_with_the_paper_table_the_ref_names_are_the_papers_and_both_numbers_show(tmp_path):
    """A reference naming the paper's Table 1 and CRD: the ref names look up the paper's
    numbers, the kdbench names the literature's; a pair no source has is said."""
    runs = tmp_path / "runs"
    pairs = {P2: PAIRS[P2], P3: ("resnet50", "resnet34", "ResNet50", "ResNet34")}
    write_crd_runs(runs, {"table": "Table 1", "dataset": "CIFAR-100", "file": None,
                          "literature": ["CRD"]}, pairs)
    md = write_leaderboard(runs, tmp_path / "lb", plot=False)[0].read_text()
    cells = md_cells(md)
    # KD on WRN-40-2→WRN-16-2: mean 74.8; paper 76.60 (Δ -1.80), CRD 74.92 (Δ -0.12).
    assert cells["KD"][0].endswith("· paper 76.60 (Δ -1.80) · lit. CRD 74.92 (Δ -0.12)")
    # ResNet50→ResNet34 (same values): paper KD 78.38 (Δ -3.58), no literature number.
    assert cells["KD"][1].endswith("· paper 78.38 (Δ -3.58)")
    assert ("ResNet50→ResNet34: no published number in CRD (looked up as resnet50→resnet34 on "
            "cifar100).") in md
    assert "Reference: Table 1 (CIFAR-100) of the paper; Δ = ours − paper. Published numbers of CRD" in md


# ------------------------------------------------------------------------------ recipes
def _recipe(tmp_path: Path, reference: str) -> Path:
    """The homogeneous CRD-benchmark recipe with another [reference] (its own is the last table)."""
    text = (ROOT / "recipes" / "crd_benchmark" / "cifar100_homogeneous.toml").read_text()
    path = tmp_path / "r.toml"
    path.write_text(text.split("\n[reference]")[0] + "\n" + reference)
    return path


def test_a_recipe_naming_an_unknown_source_is_a_recipe_error(tmp_path, registry):
    path = _recipe(tmp_path, '[reference]\nliterature = ["CRD", "CDR"]\n')
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, registry, check_device=False, check_files=False)
    msg = str(exc.value)
    assert ("reference.literature: Value error, unknown literature source 'CDR'; use one of "
            "CRD, DOT, DKD, LS, DIST") in msg
    path = _recipe(tmp_path, '[reference]\ntable = "Table 1"\n')
    with pytest.raises(RecipeError, match="reference: .*give both table and dataset"):
        load_recipe(path, registry, check_device=False, check_files=False)
    path = _recipe(tmp_path, '[reference]\nfile = "x.csv"\n')
    with pytest.raises(RecipeError, match="name the paper's table .* or literature sources"):
        load_recipe(path, registry, check_device=False, check_files=False)


@pytest.mark.parametrize("name", ["cifar100_homogeneous", "cifar100_heterogeneous"])
def test_the_crd_benchmark_recipes_name_the_literature(registry, name):
    loaded = load_recipe(ROOT / "recipes" / "crd_benchmark" / f"{name}.toml", registry,
                         check_device=False, check_files=False)
    ref = loaded.recipe.reference
    assert ref.table is None and ref.literature == ["CRD", "DKD", "DOT", "DIST", "LS"]
    assert literature.resolve_sources(ref.literature) == [
        "CRD (Tian et al. ICLR 2020)", "DKD (Zhao et al. CVPR 2022)", "DOT (Zhao et al. ICCV 2023)",
        "DIST (Huang et al. NeurIPS 2022)", "LS (Sun et al. CVPR 2024)"]
    # The DOT row (KD trained with the DOT optimizer) finds mdistiller's KD+DOT numbers.
    dot_row = next(ms for ms in loaded.recipe.method_sets if ms.optimizer is not None)
    published = {"cifar100_homogeneous": [("resnet32x4", "resnet8x4", 75.12), ("vgg13", "vgg8", 73.77)],
                 "cifar100_heterogeneous": [("resnet32x4", "shufflenetv2", 75.55)]}[name]
    for t, s, top1 in published:
        row = load().lookup("DOT (Zhao et al. ICCV 2023)", "cifar100", t, s, dot_row.ref_method)
        assert row is not None and literature.parse_top1(row.top1)[0] == top1, (t, s)
    # Every pair of the recipe has published numbers under the matching rule.
    lit = load()
    for pair in loaded.recipe.pairs:
        t, s, notes = pair_models(pair.teacher.name, pair.student.name, pair.ref_teacher,
                                  pair.ref_student, False)
        assert not notes
        assert any(lit.covers(src, "cifar100", t, s) for src in literature.resolve_sources(LIT)), pair.display
