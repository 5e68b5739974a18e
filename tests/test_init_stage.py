"""A method's initialisation stage (issue 18, item 2): declared through the contract
(``StudentMethod.init_stage() -> InitStage``), run by the engine before distillation without
knowing the method, with checkpoints and an exact resume like any epoch.

The stand-in is shaped like RepDistiller's FT/AB init: a connector (student pooled → teacher
pooled) pre-trained on an MSE for ``init_epochs``, then used by the distillation loss."""
from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from conftest import add_plugin
from kdbench.api import InitStage, Params, StudentMethod
from kdbench.cli import main

INITIAL: dict[str, torch.Tensor] = {}  # the connector's weights when it was built (per run)


class ConnectParams(Params):
    init_epochs: int = Field(2, ge=0)


class PretrainedConnector(StudentMethod):
    def __init__(self, params, setup):
        super().__init__()
        self.init_epochs = params.init_epochs
        s, t = setup.student_out.pooled.shape[1], setup.teacher_out.pooled.shape[1]
        self.connector = nn.Linear(s, t)
        INITIAL["weight"] = self.connector.weight.detach().clone()

    def _mse(self, student, teacher, batch):
        return {"connect": F.mse_loss(self.connector(student.pooled), teacher.pooled)}

    def init_stage(self):
        if not self.init_epochs:
            return None
        return InitStage(epochs=self.init_epochs, modules=[self.connector], loss=self._mse)

    def forward(self, student, teacher, batch, extra):
        return self._mse(student, teacher, batch)


def _with_method(monkeypatch):
    add_plugin(monkeypatch, "student_method", "connect", PretrainedConnector, ConnectParams)


def _recipe(tiny_recipe, name, init_epochs):
    """The tiny recipe with its KD row's kd replaced by the stand-in, and no Student row."""
    recipe = tiny_recipe(name=name)
    text = recipe.read_text().replace('{ name = "kd", weight = 0.9 }', f'{{ name = "connect", init_epochs = {init_epochs} }}')
    text = text.replace('[[method_sets]]\nlabel = "Student"\nref_method = "student"\nmethods = [{ name = "ce" }]\n', "")
    assert "Student" not in text
    recipe.write_text(text.replace("seeds = [0]", "seeds = [0]\ncheckpoint_every_steps = 2"))
    return recipe


def _student(out):
    (rec,) = [json.loads(p.read_text()) for p in (out / "students").glob("*/record.json")
              if json.loads(p.read_text())["meta"]["method_set"] == "KD"]
    return rec


def test_the_stage_trains_its_modules_first_and_is_recorded(tiny_recipe, tmp_path, monkeypatch):
    _with_method(monkeypatch)
    recipe = _recipe(tiny_recipe, "init", 2)
    assert main(["run", str(recipe), "--plain"]) == 0
    rec = _student(tmp_path / "runs")
    stage = rec["init_stages"]["connect"]["epochs"]
    assert [e["epoch"] for e in stage] == [1, 2] and all("loss_connect" in e for e in stage)
    assert "test_top1" in stage[-1] and "test_top1" not in stage[0]  # evaluated after its last epoch only
    # The stage lowered the MSE it trains on, and the main schedule starts from the stage's end:
    # its first epoch's distillation term is below the stage's first epoch.
    assert stage[1]["loss_connect"] < stage[0]["loss_connect"]
    assert rec["epochs"][0]["loss_connect"] < stage[0]["loss_connect"]
    assert not list((tmp_path / "runs").rglob("ckpt-*.pt"))  # the stage's checkpoints go with the run's
    # Without a stage, the same set trains no init epochs (and is another run: init_epochs is a parameter)
    plain = _recipe(tiny_recipe, "plain", 0)
    plain.write_text(plain.read_text().replace((tmp_path / "runs").as_posix(), (tmp_path / "plain").as_posix()))
    assert main(["run", str(plain), "--plain"]) == 0
    other = _student(tmp_path / "plain")
    assert "init_stages" not in other and other["id"] != rec["id"]


@pytest.mark.slow
def test_a_run_stopped_inside_its_stage_resumes_bit_identical(tiny_recipe, tmp_path, monkeypatch, capsys):
    """SIGTERM at the student's step 3 (inside the 2-epoch stage of 2 × 2 batches: the teacher
    finished first, uninterrupted); the rerun resumes the stage from its step-2 checkpoint."""
    _with_method(monkeypatch)
    reference = _recipe(tiny_recipe, "reference", 2)
    assert main(["run", str(reference), "--plain"]) == 0
    expected = _student(tmp_path / "runs")
    stopped = _recipe(tiny_recipe, "stopped", 2)
    stopped.write_text(stopped.read_text().replace((tmp_path / "runs").as_posix(), (tmp_path / "again").as_posix()))
    # The teacher first, so that the signal hits the student's stage.
    teachers = tmp_path / "again" / "teachers"
    teachers.parent.mkdir(parents=True)
    shutil.copytree(tmp_path / "runs" / "teachers", teachers)
    monkeypatch.setenv("KDBENCH_TEST_KILL_AT_STEP", "3:TERM")
    assert main(["run", str(stopped), "--plain"]) == 128 + signal.SIGTERM
    assert list((tmp_path / "again" / "students").glob("*/init-connect/ckpt-*.pt"))
    monkeypatch.delenv("KDBENCH_TEST_KILL_AT_STEP")
    assert main(["run", str(stopped), "--plain"]) == 0
    got = _student(tmp_path / "again")
    assert got["id"] == expected["id"]
    for key in ("init_stages", "epochs", "final", "weights_sha256"):
        assert got[key] == expected[key], key
    err = capsys.readouterr().err
    assert "resuming from" in err and "initialisation stage of connect: epoch 2/2" in err
