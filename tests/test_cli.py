"""End to end through the CLI: run, rerun (idempotent), add a seed, dry run, leaderboard."""
import pytest

from conftest import read_records, run_kdbench
from kdbench.cli import main


def test_run_rerun_add_seed_and_leaderboard(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(seeds=(0,))
    assert main(["run", str(recipe), "--plain"]) == 0
    runs = tmp_path / "runs"
    teachers, students = read_records(runs, "teachers"), read_records(runs, "students")
    assert len(teachers) == 1 and len(students) == 2
    for rec in [*teachers.values(), *students.values()]:
        assert rec["status"] == "done"
        assert set(rec["final"]) == {"top1", "top5", "epoch"}
        # no validation split here: best is chosen on the (whole) test set and says so
        assert set(rec["best"]) == {"top1", "top5", "epoch", "selected_on", "test_images"}
        assert rec["best"]["selected_on"] == "test"
        assert rec["provenance"]["torch"] and rec["provenance"]["kdbench"]
        assert rec["wall_time_s"] > 0
        assert len(rec["epochs"]) == rec["spec"]["schedule"]["epochs"]
    kd = next(r for r in students.values() if r["meta"]["method_set"] == "KD")
    assert kd["teacher_id"] in teachers
    assert {m["name"]: m["weight"] for m in kd["spec"]["methods"]} == {"ce": 0.1, "kd": 0.9}
    assert "loss_kd" in kd["epochs"][0] and "loss_ce" in kd["epochs"][0]
    assert (runs / "teachers" / kd["teacher_id"] / "model.pt").exists()

    # Rerun: nothing retrained, records untouched.
    mtimes = {p: p.stat().st_mtime_ns for p in runs.rglob("record.json")}
    capsys.readouterr()
    assert main(["run", str(recipe), "--plain"]) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("record.json")} == mtimes

    # Adding a seed runs only the new cells (one new teacher, two new students).
    recipe = tiny_recipe(seeds=(0, 1))
    assert main(["run", str(recipe), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "teachers: 2 in the grid, 1 cached, 1 to train" in plan
    assert "students: 4 in the grid, 2 done, 2 to train" in plan
    assert main(["run", str(recipe), "--plain"]) == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert len(read_records(runs, "students")) == 4 and len(read_records(runs, "teachers")) == 2

    out = tmp_path / "lb"
    assert main(["leaderboard", str(runs), "-o", str(out)]) == 0
    md = (out / "leaderboard.md").read_text()
    assert "| Method | T→S |" in md
    assert "Teacher (ce)" in md and "(n=2)" in md and "**" in md
    assert "paper 76.60" in md and "paper 76.40" in md and "paper 76.89" in md  # Table 1 WRN column
    assert "final" in md
    assert (out / "leaderboard.csv").read_text().startswith("group,dataset,row,pair")


def test_same_recipe_and_seed_gives_same_numbers(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    assert main(["run", str(recipe), "--plain", "--output", str(tmp_path / "a")]) == 0
    assert main(["run", str(recipe), "--plain", "--output", str(tmp_path / "b")]) == 0
    for kind in ("teachers", "students"):
        a, b = read_records(tmp_path / "a", kind), read_records(tmp_path / "b", kind)
        assert a.keys() == b.keys()
        for k in a:
            strip = lambda eps: [{x: v for x, v in e.items()} for e in eps]
            assert strip(a[k]["epochs"]) == strip(b[k]["epochs"])


@pytest.mark.slow
def test_user_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = not [toml")
    for args in (["validate", str(bad)], ["run", str(tmp_path / "missing.toml")],
                 ["leaderboard", str(tmp_path / "nothing")]):
        proc = run_kdbench(*args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("kdbench: error: ")


def _published_ce(checkpoint) -> dict:
    """The tiny recipe's teacher objective, from a published checkpoint instead of trained."""
    return {"name": "ce", "checkpoint": checkpoint, "ref_teacher": True}


def test_published_teacher_is_loaded_evaluated_and_not_trained(tiny_recipe, tmp_path):
    import torch

    from kdbench.registry import load_registry

    plugin = load_registry().find("model", "wrn_16_2")
    torch.manual_seed(5)
    net = plugin.factory(4, plugin.params(width_mult=0.25))
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": net.state_dict(), "epoch": 240}, ckpt)  # mdistiller's layout
    recipe = tiny_recipe(teacher_objectives=[_published_ce(ckpt)])
    assert main(["run", str(recipe), "--plain"]) == 0
    (teacher,) = read_records(tmp_path / "runs", "teachers").values()
    assert teacher["status"] == "done" and teacher["epochs"] == []
    assert teacher["published"]["sha256"] == teacher["spec"]["checkpoint"]["sha256"]
    # The cached weights are exactly the checkpoint's, and the recorded accuracy is measured.
    cached = torch.load(tmp_path / "runs" / "teachers" / teacher["id"] / "model.pt", weights_only=True)
    assert all(torch.equal(cached[k], v) for k, v in net.state_dict().items())
    assert 0.0 <= teacher["final"]["top1"] <= 100.0 and "d_intra" in teacher["diagnostics"]
    kd = [r for r in read_records(tmp_path / "runs", "students").values() if r["meta"]["method_set"] == "KD"]
    assert kd and kd[0]["teacher_id"] == teacher["id"] and kd[0]["status"] == "done"


@pytest.mark.slow
def test_a_missing_published_checkpoint_is_a_recipe_error(tiny_recipe, tmp_path):
    """A missing checkpoint is a recipe error (exit 2) naming the key, from the real process.
    (The second half of the test above, apart: it needs a subprocess.)"""
    recipe = tiny_recipe(teacher_objectives=[_published_ce(tmp_path / "nope.pth")])
    proc = run_kdbench("validate", recipe)
    assert proc.returncode == 2 and "teacher_objectives[0].checkpoint" in proc.stderr


def test_dry_run_estimates_device_hours(tiny_recipe, capsys):
    recipe = tiny_recipe(seeds=(0, 1))
    assert main(["run", str(recipe), "--dry-run", "--throughput", "48"]) == 0
    out = capsys.readouterr().out
    # 2 teachers x 2 epochs x 48 images + 4 students x 1 epoch x 48 images at 48 images/s
    assert "teachers: 2 runs, 0.00111 device-hours (4 s)" in out
    assert "students: 4 runs, 0.00111 device-hours (4 s)" in out
    assert "total: 0.00222 device-hours (8 s)" in out
    assert main(["run", str(recipe), "--dry-run", "--calibrate", "2"]) == 0
    out = capsys.readouterr().out
    assert "calibrated: 2 timed steps per kind of run on cpu" in out and "students: 4 runs" in out
    assert main(["run", str(recipe), "--calibrate", "2"]) == 2  # only with --dry-run
