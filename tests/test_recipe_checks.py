"""Recipe checks that let bad values through before (issue 14, item 11): non-finite numbers,
string/number coercion, absurd epochs, repeated labels and seeds, missing files — each a
problem with its key path and line, found when the recipe is validated, before any training."""
from __future__ import annotations

import pytest

from kdbench.cli import main
from kdbench.recipe import RecipeError, load_recipe


def _problems(recipe, registry) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, registry)
    return str(err.value)


def _edit(recipe, *replacements):
    text = recipe.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    recipe.write_text(text)
    return recipe


@pytest.mark.parametrize("old,new,needle", [
    ("lr = 0.05", "lr = inf", "teacher_schedule.lr"),
    ("lr = 0.05", "lr = 1e400", "teacher_schedule.lr"),
    ("lr = 0.05", "lr = nan", "teacher_schedule.lr"),
    ('{ name = "kd", weight = 0.9 }', '{ name = "kd", weight = inf }', "method_sets[1].methods[1].weight"),
    ('{ name = "kd", weight = 0.9 }', '{ name = "kd", weight = 0.9, temperature = inf }',
     "method_sets[1].methods[1].temperature"),
    ('{ name = "kd", weight = 0.9 }', '{ name = "kd", weight = "0.9" }', "method_sets[1].methods[1].weight"),
    ("epochs = 2", "epochs = 99999999999999999999999", "teacher_schedule.epochs"),
    ("seeds = [0]", "seeds = [0, 0]", "seed(s) [0] appear twice"),
])
def test_a_bad_value_is_a_problem_with_its_key(tiny_recipe, registry, old, new, needle):
    text = _problems(_edit(tiny_recipe(), (old, new)), registry)
    assert needle in text and "line " in text and len(text.splitlines()) == 2, text


def test_repeated_labels_and_unknown_names_point_at_their_keys(tiny_recipe, registry):
    recipe = _edit(tiny_recipe(),
                   ('label = "Student"', 'label = "KD"'),
                   ('label = "KD"\nref_method = "KD"', 'label = "KD"\nref_method = "KD"\nteachers = ["ce", "nope"]'))
    text = _problems(recipe, registry)
    assert "method_sets[1].label: the method set label 'KD' is used twice" in text
    assert "method_sets[1].teachers[1]: names teacher 'nope', but the teacher objectives are labelled ['ce']" in text
    assert all(len(line) < 300 for line in text.splitlines()), "no line may hold the whole recipe"
    objectives = _edit(tiny_recipe(name="objs"), ('[[method_sets]]\nlabel = "Student"',
                                                  '[[teacher_objectives]]\nname = "ce"\n\n[[method_sets]]\nlabel = "Student"'))
    text = _problems(objectives, registry)
    assert "teacher_objectives[1].label: the teacher objective label 'ce' is used twice" in text


def test_missing_files_are_found_when_the_recipe_is_validated(tiny_recipe, tmp_path, registry, capsys):
    reference = _edit(tiny_recipe(name="ref"), ('dataset = "CIFAR-100"\n', 'dataset = "CIFAR-100"\nfile = "no/such.csv"\n'))
    assert "reference.file: reference table 'no/such.csv' not found" in _problems(reference, registry)
    root = (tmp_path / "nowhere").as_posix()
    data = _edit(tiny_recipe(name="data"), ('name = "synthetic"\nnum_classes = 4\ntrain_per_class = 12\n'
                                            'test_per_class = 6\nimage_size = 16',
                                            f'name = "cifar100"\nroot = "{root}"'))
    assert f"dataset.root: dataset folder '{root}' does not exist" in _problems(data, registry)
    # validate and --dry-run say so too (exit 2), before anything is trained
    for command in (["validate", str(data)], ["run", str(data), "--dry-run"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "does not exist" in err and "Traceback" not in err
    downloads = _edit(tiny_recipe(name="dl"), ('name = "synthetic"\nnum_classes = 4\ntrain_per_class = 12\n'
                                               'test_per_class = 6\nimage_size = 16',
                                               f'name = "cifar100"\nroot = "{root}"\ndownload = true'))
    load_recipe(downloads, registry)  # a folder the plugin will download into may not exist yet


# ------------------------------------------------------------------------------ per-pair overrides
SECOND_PAIR = '''[[pairs]]
teacher = { name = "wrn_16_2", width_mult = 0.25 }
student = { name = "vgg8", width_mult = 0.125 }
label = "T→V"
student_schedule = { lr = 0.01 }
method_params = { kd = { temperature = 2.0 } }

'''


def test_a_pair_can_use_its_own_student_lr_and_method_parameters(tiny_recipe, registry):
    from kdbench.recipe import expand

    plain = expand(load_recipe(tiny_recipe(name="plain"), registry), registry)[1]
    recipe = _edit(tiny_recipe(name="pairs"), ("[[teacher_objectives]]", SECOND_PAIR + "[[teacher_objectives]]"))
    _, students = expand(load_recipe(recipe, registry), registry)
    first = [s for s in students if s.meta.pair == "T→S"]
    second = [s for s in students if s.meta.pair == "T→V"]
    assert [s.id for s in first] == [s.id for s in plain]  # the other pair's runs are unchanged
    assert {s.spec["schedule"]["lr"] for s in second} == {0.01} and {s.spec["schedule"]["lr"] for s in first} == {0.05}
    (kd,) = [s for s in second if s.meta.method_set == "KD"]
    assert kd.spec["methods"][1] == {"name": "kd", "weight": 0.9, "params": {"temperature": 2.0}}
    assert kd.method_terms()[1][2].temperature == 2.0  # the validated object the engine builds from


@pytest.mark.parametrize("override,needle", [
    ("student_schedule = { lr = -1 }", "pairs[1].student_schedule.lr: Input should be greater than 0"),
    ("method_params = { fitnet = { hint = 2 } }", "pairs[1].method_params.fitnet: no method set uses a method 'fitnet'"),
    ("method_params = { kd = { temprature = 2.0 } }", "pairs[1].method_params.kd.temprature: Extra inputs are not permitted"),
])
def test_a_bad_pair_override_is_a_problem_with_its_key(tiny_recipe, registry, override, needle):
    second = SECOND_PAIR.replace("student_schedule = { lr = 0.01 }\nmethod_params = { kd = { temperature = 2.0 } }", override)
    recipe = _edit(tiny_recipe(), ("[[teacher_objectives]]", second + "[[teacher_objectives]]"))
    assert needle in _problems(recipe, registry)
