"""A tiny real run of a two-stage method (AB, FT, FSP): the tiny recipe with its KD set replaced
by ``ce`` + the method, for the method tests' engine checks (the stage runs before the main
schedule, is recorded, checkpoints and resumes). Imported as ``from stage_runs import ...``."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from kdbench.cli import main


def pair_outputs(student, teacher, x):
    """The student's outputs in train mode and the teacher's in eval mode without gradient, as a
    training step makes them."""
    student.train(), teacher.eval()
    s_out = student(x)
    with torch.no_grad():
        t_out = teacher(x)
    return s_out, t_out


def stage_recipe(tiny_recipe, name: str, method: str, output: Path, checkpoint_every_steps: int = 0):
    """The tiny recipe (teacher = student = thin WRN-16-2) with one set, ``ce`` + ``method`` (a
    TOML inline table), its runs under ``output``."""
    recipe = tiny_recipe(name=name, output=output)
    text = recipe.read_text().replace('{ name = "kd", weight = 0.9 }', method)
    text = text.replace('[[method_sets]]\nlabel = "Student"\nref_method = "student"\nmethods = [{ name = "ce" }]\n', "")
    assert method in text and "Student" not in text
    if checkpoint_every_steps:
        text = text.replace("seeds = [0]", f"seeds = [0]\ncheckpoint_every_steps = {checkpoint_every_steps}")
    recipe.write_text(text)
    return recipe


def student_record(output: Path) -> dict:
    (rec,) = [json.loads(p.read_text()) for p in (output / "students").glob("*/record.json")]
    return rec


def run(recipe: Path) -> int:
    return main(["run", str(recipe), "--plain"])
