"""With ``deterministic = true`` the pre-check runs one step of each student's whole method set,
so an op without a deterministic implementation that only a method uses (on CUDA the backward of
non-global adaptive pooling in ReviewKD and VID) is found before any training, with the recipe,
the pair and the methods named (issue 19, item 6).

On the CPU ReviewKD's and VID's pooling is deterministic, so the failing case is a stand-in
method that uses ``put_`` (no deterministic implementation on any device) only in training.
"""
import json

import torch

from conftest import add_plugin
from kdbench.api import StudentMethod
from kdbench.cli import main


class NonDeterministicMethod(StudentMethod):
    """A logit-MSE method whose step also calls ``put_``, which has no deterministic version."""

    def __init__(self, params, setup):
        super().__init__()

    def forward(self, student, teacher, batch, extra):
        if torch.is_grad_enabled():
            x = student.logits
            torch.zeros(2, device=x.device).put_(torch.tensor([0, 0], device=x.device),
                                                 torch.ones(2, device=x.device))
        return {"mse": (student.logits - teacher.logits).pow(2).mean()}


def _with_method(monkeypatch):
    add_plugin(monkeypatch, "student_method", "nondet", NonDeterministicMethod)


def _deterministic(recipe, methods: str):
    text = recipe.read_text().replace('device = "cpu"', 'device = "cpu"\ndeterministic = true')
    text = text.replace('methods = [{ name = "ce", weight = 0.1 }, { name = "kd", weight = 0.9 }]', methods)
    assert "deterministic = true" in text and methods in text
    recipe.write_text(text)
    return recipe


def test_a_method_without_a_deterministic_op_is_found_before_training(tiny_recipe, tmp_path,
                                                                        monkeypatch, capsys):
    _with_method(monkeypatch)
    recipe = _deterministic(tiny_recipe(), 'methods = [{ name = "ce" }, { name = "nondet" }]')
    assert main(["run", str(recipe), "--plain"]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "student of pair 'T→S'" in err and "with methods ce+nondet" in err
    assert "deterministic = true, but put_ does not have a deterministic implementation" in err
    assert "set deterministic = false" in err and "Traceback" not in err
    assert not list((tmp_path / "runs").glob("*/*/record.json"))  # nothing trained


def test_methods_with_pooling_pass_the_check_on_the_cpu(tiny_recipe, tmp_path, capsys):
    """ReviewKD and VID pool feature maps adaptively; on the CPU that is deterministic, so the
    same check lets their runs train (and records them as deterministic)."""
    recipe = _deterministic(tiny_recipe(), 'methods = [{ name = "ce" }, { name = "reviewkd" }, { name = "vid" }]')
    assert main(["run", str(recipe), "--plain"]) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "students").glob("*/record.json")]
    kd_row = [r for r in records if r["meta"]["method_set"] == "KD"]
    assert len(kd_row) == 1 and kd_row[0]["status"] == "done" and kd_row[0]["deterministic"] is True
    assert [m["name"] for m in kd_row[0]["spec"]["methods"]] == ["ce", "reviewkd", "vid"]
