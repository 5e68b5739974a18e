"""A validation split for "best epoch" (issue 13, item 2), evaluation every k epochs or on a
test subset, and one spec for a plugin's plain and qualified names."""
from __future__ import annotations

import json

import pytest
import torch

from kdbench.api import ImageData
from kdbench.cli import main
from kdbench.data.loader import hold_out_per_class
from kdbench.recipe import RecipeError, expand, load_recipe


def _data(n_per_class=(10, 7, 12), size=4):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))]
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, size, size).contiguous()
    return ImageData(images, labels, len(n_per_class), (0.5,) * 3, (0.25,) * 3)


def test_hold_out_is_class_balanced_disjoint_and_seeded():
    data = _data()
    rest, val = hold_out_per_class(data, 3)
    assert torch.bincount(val.labels).tolist() == [3, 3, 3]
    assert torch.bincount(rest.labels).tolist() == [7, 4, 9]
    ids = lambda d: set(d.images[:, 0, 0, 0].tolist())  # noqa: E731  (each image is its index)
    assert not ids(rest) & ids(val) and ids(rest) | ids(val) == set(range(29))
    again_rest, again_val = hold_out_per_class(data, 3)
    assert torch.equal(again_val.images, val.images) and torch.equal(again_rest.labels, rest.labels)
    assert not torch.equal(hold_out_per_class(data, 3, seed=7)[1].images, val.images)
    # A fraction of each class, rounded, at least one: 10 * 0.25 = 2.5 -> 2, 7 * 0.25 = 1.75 -> 2, 12 * 0.25 = 3
    assert torch.bincount(hold_out_per_class(data, 0.25)[1].labels).tolist() == [2, 2, 3]
    with pytest.raises(ValueError, match="class 1 has 7 training samples"):
        hold_out_per_class(data, 7)


def _with(recipe, top="", dataset=""):
    text = recipe.read_text().replace("seeds = [0]\n", f"seeds = [0]\n{top}\n")
    text = text.replace('name = "synthetic"\n', f'name = "synthetic"\n{dataset}\n', 1)
    recipe.write_text(text)
    return recipe


def test_a_validation_split_is_part_of_run_ids_and_its_absence_changes_none(tiny_recipe, registry):
    plain = load_recipe(tiny_recipe(name="plain"), registry)
    split = load_recipe(_with(tiny_recipe(name="split"), dataset="val_per_class = 3"), registry)
    (t_plain,), s_plain = expand(plain, registry)
    (t_split,), s_split = expand(split, registry)
    assert "val_per_class" not in t_plain.spec["dataset"] and t_split.spec["dataset"]["val_per_class"] == 3
    assert t_plain.id != t_split.id and {s.id for s in s_plain}.isdisjoint(s.id for s in s_split)
    # eval_every and eval_subset_per_class change what is evaluated, not what is trained
    evals = load_recipe(_with(tiny_recipe(name="evals"), top="eval_every = 2\neval_subset_per_class = 2"), registry)
    assert [s.id for s in expand(evals, registry)[1]] == [s.id for s in s_plain]
    for bad, msg in (("val_per_class = 1.5", "a fraction must be below 1"),
                     ('val_per_class = "3"', "val_per_class")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe(_with(tiny_recipe(name="bad"), dataset=bad), registry)


def test_best_is_chosen_on_validation_and_epochs_are_evaluated_as_asked(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    text = _with(recipe, top="eval_every = 2\neval_subset_per_class = 2", dataset="val_per_class = 3").read_text()
    recipe.write_text(text.replace("[teacher_schedule]\nepochs = 2", "[teacher_schedule]\nepochs = 5"))
    assert main(["run", str(recipe), "--plain"]) == 0
    (teacher,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "teachers").glob("*/record.json")]
    epochs = teacher["epochs"]
    assert [("test_top1" in e, "val_top1" in e) for e in epochs] == [(False, False), (True, True),
                                                                    (False, False), (True, True), (True, True)]
    evaluated = [e for e in epochs if "val_top1" in e]
    best = max(evaluated, key=lambda e: e["val_top1"])
    assert teacher["best"] == {"top1": best["test_top1"], "top5": best["test_top5"], "epoch": best["epoch"],
                               "selected_on": "validation", "test_images": 24, "val_top1": best["val_top1"]}
    # The whole test set (24 images) after the last epoch and after each new best on validation;
    # the subset (8) after the others.
    for i, e in enumerate(evaluated):
        new_best = all(e["val_top1"] > f["val_top1"] for f in evaluated[:i])
        assert e["test_images"] == (24 if new_best or e is evaluated[-1] else 8), (i, e)
    # 12 per class - 3 held out = 9 train; test: 6 per class (4 classes), 2 per class before the last epoch
    assert teacher["evaluation"] == {"every": 2, "test_images": 24, "test_images_other_epochs": 8,
                                     "val_images": 12}
    assert teacher["final"]["epoch"] == 5


def test_without_a_validation_split_best_says_it_was_chosen_on_the_test_set(tiny_recipe, tmp_path):
    assert main(["run", str(tiny_recipe()), "--plain"]) == 0
    recs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/*/record.json")]
    assert recs and all(r["best"]["selected_on"] == "test" for r in recs)


def test_a_split_that_leaves_no_training_data_is_a_clear_error(tiny_recipe, capsys):
    recipe = _with(tiny_recipe(), dataset="val_per_class = 12")
    assert main(["run", str(recipe), "--plain"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: dataset.val_per_class = 12: class 0 has 12 training samples" in err
    assert "hold out fewer samples per class" in err and "Traceback" not in err


def test_a_qualified_plugin_name_is_the_same_run_as_the_plain_one(tiny_recipe, registry):
    plain = expand(load_recipe(tiny_recipe(name="plain"), registry), registry)
    recipe = tiny_recipe(name="qualified")
    recipe.write_text(recipe.read_text().replace('{ name = "kd", weight = 0.9 }', '{ name = "kdbench:kd", weight = 0.9 }')
                      .replace('name = "synthetic"', 'name = "kdbench:synthetic"'))
    qualified = expand(load_recipe(recipe, registry), registry)
    assert [s.id for s in qualified[1]] == [s.id for s in plain[1]]
    assert [t.id for t in qualified[0]] == [t.id for t in plain[0]]
