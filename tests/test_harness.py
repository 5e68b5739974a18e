"""The test harness in conftest.py: the tiny recipe and its overrides, the clean environment of
a `kdbench` subprocess, and reading run records."""
from __future__ import annotations

import json
import os
import sys
import tomllib

import pytest

from conftest import TINY_RECIPE, edit_recipe, kdbench_cmd, kdbench_env, read_records, toml_value
from kdbench.recipe import load_recipe


def test_the_default_tiny_recipe_is_the_template_byte_for_byte(tiny_recipe, tmp_path):
    extra = '\n[[method_sets]]\nlabel = "X"\nmethods = [{ name = "kd" }]\n'
    for seeds, more in (((0,), ""), ((0, 1), extra)):
        path = tiny_recipe(seeds=seeds, extra=more)
        assert path == tmp_path / "tiny.toml"
        assert path.read_text() == TINY_RECIPE.format(name="tiny", output=(tmp_path / "runs").as_posix(),
                                                      seeds=list(seeds), extra=more)


def test_overrides_set_add_and_remove_keys_tables_and_arrays(tiny_recipe, tmp_path, registry):
    net = {"name": "wrn_16_2", "width_mult": 0.25}
    path = tiny_recipe(
        file="other.toml", extra='[[method_sets]]\nlabel = "extra"\nmethods = [{ name = "kd" }]\n',
        top={"teacher_seed": 0, "device": "cpu"},
        dataset={"train_per_class": 8, "image_size": None, "channels": 3},
        pairs=[{"teacher": net, "student": net, "label": "a→b"}],
        method_sets=[{"label": "only", "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd"}]}],
        reference=None, leaderboard={"baseline": "only"}, teacher_schedule={"milestones": None})
    assert path == tmp_path / "other.toml"
    recipe = tomllib.loads(path.read_text())
    assert recipe["teacher_seed"] == 0 and recipe["seeds"] == [0]
    assert recipe["dataset"] == {"name": "synthetic", "num_classes": 4, "train_per_class": 8,
                                 "test_per_class": 6, "channels": 3}
    assert recipe["pairs"] == [{"teacher": net, "student": net, "label": "a→b"}]
    assert [m["label"] for m in recipe["method_sets"]] == ["only", "extra"]  # extra after the sets
    assert "reference" not in recipe and recipe["leaderboard"] == {"baseline": "only"}
    assert recipe["teacher_schedule"] == {"epochs": 2, "batch_size": 16, "lr": 0.05}
    load_recipe(path, registry)  # still a valid recipe
    with pytest.raises(KeyError, match="no key 'nope'"):
        tiny_recipe(dataset={"nope": None})
    with pytest.raises(ValueError, match="give a list"):
        tiny_recipe(method_sets={"label": "x"})


def test_toml_values_read_back():
    values = {"b": True, "i": -3, "f": 1e30, "s": 'a "quoted" → \\ path', "l": [1, 2.5],
              "t": {"name": "x", "n": [0]}, "e": {}}
    text = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
    assert tomllib.loads(text) == values
    assert edit_recipe("a = 1\n\n[t]\nx = 1\n", top={"b": 2}, t={"x": None, "y": "z"}) == \
        'a = 1\nb = 2\n\n[t]\ny = "z"\n'


def test_kdbench_env_variants(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_TEST_KILL_AT_STEP", "5")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("PYTHONPATH", "/before")
    monkeypatch.setenv("KDB_HARNESS_OTHER", "kept")
    env = kdbench_env()
    assert "KDBENCH_TEST_KILL_AT_STEP" not in env  # no test hook leaks into the subprocess
    assert env["KDBENCH_ONLY_DISTS"] == "kdbench" and env["OMP_NUM_THREADS"] == "1"
    assert env["PYTHONPATH"] == "/before" and env["KDB_HARNESS_OTHER"] == "kept"
    assert kdbench_env(threads=None)["OMP_NUM_THREADS"] == "7"
    env = kdbench_env(threads=2, dists=["a", "b"], pythonpath=[tmp_path], KDBENCH_TEST_KILL_AT_STEP=5)
    assert env["OMP_NUM_THREADS"] == "2" and env["KDBENCH_ONLY_DISTS"] == "kdbench,a,b"
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path), "/before"])
    assert env["KDBENCH_TEST_KILL_AT_STEP"] == "5"
    assert kdbench_cmd("run", tmp_path / "r.toml") == [sys.executable, "-m", "kdbench", "run", str(tmp_path / "r.toml")]
    assert kdbench_cmd("run", torchrun=["--nproc-per-node", 2]) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "kdbench", "run"]


def test_read_records(tmp_path):
    for kind, run_id in (("teachers", "t-1"), ("students", "s-1"), ("students", "s-2")):
        (tmp_path / kind / run_id).mkdir(parents=True)
        (tmp_path / kind / run_id / "record.json").write_text(json.dumps({"id": run_id}))
    assert set(read_records(tmp_path)) == {"t-1", "s-1", "s-2"}
    assert read_records(tmp_path, "teachers") == {"t-1": {"id": "t-1"}}
    assert set(read_records(tmp_path, "students")) == {"s-1", "s-2"}
    assert read_records(tmp_path / "nothing") == {}
    with pytest.raises(ValueError, match="kind"):
        read_records(tmp_path, "teacher")
