"""Recipe validation (every problem at once, with line, key path and a fix) and expansion."""
from pathlib import Path

import pytest

from kdbench.api import UserError
from kdbench.recipe import RecipeError, expand, load_recipe


def test_expansion_counts_and_stable_ids(tiny_recipe, registry):
    loaded = load_recipe(tiny_recipe(seeds=(0, 1, 2)), registry)
    teachers, students = expand(loaded, registry)
    assert len(teachers) == 3  # one CE teacher per seed
    assert len(students) == 6  # (Student, KD) x 3 seeds
    vanilla = [s for s in students if s.meta.method_set == "Student"]
    assert all(s.teacher is None for s in vanilla)  # the plain student trains no teacher
    kd = [s for s in students if s.meta.method_set == "KD"]
    assert sorted(s.teacher.spec["seed"] for s in kd) == [0, 1, 2]
    # Ids depend on content only: the same recipe gives the same ids, labels do not matter.
    again = expand(load_recipe(tiny_recipe(seeds=(0, 1, 2), name="renamed"), registry), registry)
    assert [s.id for s in again[1]] == [s.id for s in students]
    assert len({s.id for s in students}) == 6


def test_shared_teacher_seed_and_method_set_teacher_filter(tiny_recipe, registry):
    ours = '[[method_sets]]\nlabel = "Ours-ish"\nteachers = ["intra"]\nmethods = [{ name = "kd" }]\n'
    path = tiny_recipe(seeds=(0, 1), extra=ours, top={"teacher_seed": 0}, teacher_objectives=[
        {"name": "ce", "ref_teacher": True}, {"name": "intra_class", "label": "intra", "lambda": 0.01}])
    teachers, students = expand(load_recipe(path, registry), registry)
    assert {t.spec["seed"] for t in teachers} == {0}
    assert {t.meta.objective for t in teachers} == {"ce", "intra"}
    ours = [s for s in students if s.meta.method_set == "Ours-ish"]
    assert len(ours) == 2 and all(s.teacher.meta.objective == "intra" for s in ours)
    kd = [s for s in students if s.meta.method_set == "KD"]
    assert len(kd) == 4  # KD has no `teachers` filter: both objectives x 2 seeds
    # default weight from the plugin when the recipe gives none
    assert ours[0].spec["methods"][0]["weight"] == 0.9


BAD = """\
name = "bad"
seeds = [0, "x"]
sed = 3

[dataset]
name = "synthetc"
subset_per_clas = 3

[[pairs]]
teacher = { name = "wrn_40_2", widht_mult = 0.5 }
student = "wrn_16_3"

[[teacher_objectives]]
name = "margin_intra"
lambda = "big"

[[method_sets]]
methods = [{ name = "ce", weight = -1 }, { name = "kd", temprature = 4.0 }]

[teacher_schedule]
epochs = 0
batch_size = 64
lr = "fast"
milestone = [3]

[student_schedule]
epochs = 3
batch_size = 0
lr = -0.1
"""


def test_every_problem_reported_at_once_with_lines_and_suggestions(tmp_path, registry):
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry)
    msg = str(info.value)
    assert str(path) in msg.splitlines()[0]
    expected = [
        "line 2: seeds[1]: expected an integer, got 'x'",
        "line 3: sed: unknown key (did you mean 'seeds'?)",
        "line 6: dataset.name: unknown dataset 'synthetc' (did you mean 'synthetic'?)",
        "line 10: pairs[0].teacher.widht_mult: unknown key for 'wrn_40_2' (did you mean 'width_mult'?)",
        "line 11: pairs[0].student.name: unknown model 'wrn_16_3' (did you mean 'wrn_16_2'?)",
        "line 15: teacher_objectives[0].lambda: expected a number, got 'big'",
        "line 18: method_sets[0].methods[1].temprature: unknown key for 'kd' (did you mean 'temperature'?)",
        "line 21: teacher_schedule.epochs",
        "line 23: teacher_schedule.lr: expected a number, got 'fast'",
        "line 24: teacher_schedule.milestone: unknown key (did you mean 'milestones'?)",
        "student_schedule.batch_size",
        "student_schedule.lr",
        "method_sets[0].methods[0].weight",
    ]
    for needle in expected:
        assert needle in msg, f"missing {needle!r} in:\n{msg}"


@pytest.mark.parametrize("text, needle", [
    ("", "the recipe is empty"),
    ("not = [toml", "not valid TOML"),
    ('name = "x"\n', "dataset: required key is missing"),
])
def test_malformed_files(tmp_path, registry, text, needle):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle.replace("[", r"\[")):
        load_recipe(path, registry)


def test_missing_file_and_folder(tmp_path, registry):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml", registry)
    with pytest.raises(UserError, match="is a folder"):
        load_recipe(tmp_path, registry)


def test_device_that_does_not_exist(tiny_recipe, registry):
    import torch

    path = tiny_recipe()
    path.write_text(path.read_text().replace('device = "cpu"', 'device = "cuda:7"'))
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(RecipeError, match="cuda:7"):
        load_recipe(path, registry)
    path.write_text(path.read_text().replace('device = "cuda:7"', 'device = "tpu"'))
    with pytest.raises(RecipeError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        load_recipe(path, registry)


def test_method_set_naming_an_unknown_teacher_label(tiny_recipe, registry):
    path = tiny_recipe(extra='[[method_sets]]\nlabel = "X"\nteachers = ["margin"]\nmethods = [{ name = "kd" }]\n')
    with pytest.raises(RecipeError, match="names teacher 'margin'"):
        load_recipe(path, registry)


def test_a_plugin_revision_is_in_its_run_specs_only_when_nonzero(registry):
    """``revision`` (issue 15: intra_class and margin_intra at 1) gives new ids to the runs of a
    plugin whose training changed; revision 0 (every other plugin) adds nothing to a spec."""
    teachers, students = expand(load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "smoke.toml", registry), registry)
    objectives = {t.spec["objective"]["name"]: t.spec["objective"] for t in teachers}
    assert objectives["margin_intra"]["revision"] == objectives["intra_class"]["revision"] == 1
    assert "revision" not in objectives["ce"]
    assert all("revision" not in m for s in students for m in s.spec["methods"])
