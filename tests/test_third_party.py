"""End to end: a third-party distribution adds a student method and the CLI trains with it.

The distribution is real installed metadata (``.dist-info`` with an ``entry_points.txt`` in the
``[kdbench]`` group) plus its module, in ``tmp_path``; the CLI runs in a subprocess with that
folder on ``PYTHONPATH`` and ``KDBENCH_ONLY_DISTS`` naming kdbench and the fake distribution,
so nothing installed in the developer's environment takes part. Tiny on purpose: synthetic
16x16 images, 4 classes, quarter-width WRN-16-2, one epoch of two batches per run.
"""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import TINY_NET, kdbench_env, read_records, run_kdbench, write_tiny_recipe

DIST, VERSION, MODULE, METHOD = "kdbt-lmse", "0.3.0", "kdbt_lmse", "logit_mse"
BROKEN_DIST = "kdbt-e2e-broken"

PLUGIN = '''
"""Logit MSE (Ba & Caruana 2014): L = scale * mean_b,c (s_bc - t_bc)^2."""
import torch.nn.functional as F
from pydantic import Field

from kdbench.api import Params, StudentMethod, hookimpl


class LogitMSEParams(Params):
    scale: float = Field(1.0, gt=0, description="multiplies the MSE")


class LogitMSE(StudentMethod):
    default_weight = 0.9

    def __init__(self, params: LogitMSEParams, setup):
        super().__init__()
        self.scale = params.scale

    def forward(self, student, teacher, batch, extra):
        return {"logit_mse": self.scale * F.mse_loss(student.logits, teacher.logits)}


@hookimpl
def kdbench_register_student_methods(register):
    register("logit_mse", LogitMSE, params=LogitMSEParams, help="MSE between logits (test)")
'''

# The tiny recipe, smaller (8 + 4 images per class, one teacher epoch), the method in two sets.
RECIPE = dict(
    name="third_party", output="runs", top={"eval_batch_size": 64},  # runs/: relative to the cwd
    dataset={"train_per_class": 8, "test_per_class": 4},
    pairs=[{"teacher": TINY_NET, "student": TINY_NET}],
    teacher_objectives=[{"name": "ce"}],
    method_sets=[
        {"label": "bare", "methods": [{"name": "ce", "weight": 0.1}, {"name": METHOD}]},
        {"label": "qualified", "methods": [{"name": "ce", "weight": 0.1},
                                           {"name": f"{DIST}:{METHOD}", "weight": 0.5, "scale": 2.0}]},
    ],
    reference=None, teacher_schedule={"epochs": 1, "milestones": None})


def write_dist(site: Path, name: str, version: str, module: str, source: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[kdbench]\n{module} = {module}\n", encoding="utf-8")
    (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture
def workdir(tmp_path):
    site = tmp_path / "site"
    write_dist(site, DIST, VERSION, MODULE, PLUGIN)
    write_dist(site, BROKEN_DIST, "0.1", "kdbt_e2e_broken", "raise ImportError('no libfoo here')\n")
    write_tiny_recipe(tmp_path / "recipe.toml", **RECIPE)
    return tmp_path


def kdbench(workdir: Path, *args: str, dists: str = DIST) -> subprocess.CompletedProcess:
    """`kdbench ARGS` in ``workdir``, its site folder on PYTHONPATH, kdbench and ``dists`` loaded."""
    env = kdbench_env(dists=dists.split(","), pythonpath=[workdir / "site"])
    return run_kdbench(*args, cwd=workdir, env=env)


@pytest.mark.slow
def test_list_shows_the_third_party_method_and_the_broken_dist(workdir):
    res = kdbench(workdir, "list", dists=f"{DIST},{BROKEN_DIST}")
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if f" {METHOD} " in ln]
    assert len(rows) == 1, res.stdout
    assert f"{DIST} {VERSION}" in rows[0] and "scale=1.0" in rows[0]
    assert "MSE between logits" in rows[0]
    # The broken distribution is reported, not fatal.
    assert "Plugins that failed to load" in res.stdout
    broken = [ln for ln in res.stdout.splitlines() if BROKEN_DIST in ln]
    assert broken and "ImportError" in res.stdout and "no libfoo here" in res.stdout


@pytest.mark.slow
def test_recipe_trains_with_the_third_party_method(workdir):
    res = kdbench(workdir, "run", "recipe.toml", "--plain")
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "3 done" in res.stderr and "0 failed" in res.stderr  # one teacher, two students

    by_set = {r["meta"]["method_set"]: r for r in read_records(workdir / "runs", "students").values()}
    assert set(by_set) == {"bare", "qualified"}, res.stderr
    assert len(read_records(workdir / "runs", "teachers")) == 1  # both students share the one teacher

    bare, qualified = by_set["bare"], by_set["qualified"]
    for rec in (bare, qualified):
        assert rec["status"] == "done" and rec["kind"] == "student"
        assert rec["teacher_id"] is not None
        assert rec["provenance"]["plugins"].get(DIST) == VERSION
        (epoch,) = rec["epochs"]
        assert epoch["loss_logit_mse"] > 0 and epoch["loss_ce"] > 0
        assert 0 <= rec["final"]["top1"] <= 100
    assert bare["spec"]["methods"] == [
        {"name": "ce", "weight": 0.1, "params": {}},
        # the plugin's default_weight, and its parameters resolved with their defaults
        {"name": METHOD, "weight": 0.9, "params": {"scale": 1.0}},
    ]
    # The qualified name is recorded as the plain one (the only plugin of that name): written
    # either way, one method is one spec; these two sets differ in weight and scale.
    assert qualified["spec"]["methods"][1] == {
        "name": METHOD, "weight": 0.5, "params": {"scale": 2.0}}
    assert bare["id"] != qualified["id"]
    assert bare["teacher_id"] == qualified["teacher_id"]
