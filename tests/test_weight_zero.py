"""A method at weight 0 must leave the student exactly as the CE-only student ("Student" row).

Every registered method is built beside ``ce`` at weight 1 with its own weight 0, and trained for
an epoch of the engine's own steps (``train_step``, ``DeviceData.train_batches`` with the run's data
generator) next to a task of ``ce`` alone, from the same student initialisation. The method still
runs every step (its modules, memory banks, samplers, extra views, the teacher's forwards), but
none of its loss may reach the student: the student's trainable parameters must end bit-identical.

The one side effect allowed is in the student's BatchNorm running statistics, and only for a
method that asks for extra views (MLLD's strong view): forwarding the student on a second view
in train mode updates them, as in the method's reference. Everything else (its gradients, the
optimizer's updates) must be untouched. Extra views are drawn from the run's data generator after
each batch's crop and flip, so from the second step on such a method's student sees other
weak-view crops than the Student row of the same seed (a different augmentation stream, not a
different loss); its CE-only reference is therefore trained on batches drawn with the same views. This is what tells "a method
below the student alone" apart from a bug in how the engine runs it (leaderboard/README.md).

The initialisation stages of AB, FT and FSP train the student's features on purpose and are not
part of the main schedule's loss: they are not run here (tests/test_init_stage.py covers them).
"""
from __future__ import annotations

import pytest
import torch

from kdbench.engine.loop import make_optimizer, train_step
from kdbench.engine.reproducibility import data_generator
from kdbench.recipe import Schedule
from test_method_pairs import (BATCH, DEVICE, EPOCH, EPOCHS, METHODS, PRECISION, REFUSES,
                               build_student_task, build_teacher, model_spec, tiny_data)

PAIR = ("vgg13", "vgg8")  # BatchNorm after every conv: running statistics are compared too


def trained_student(registry, teacher, train, method_specs, views=None):
    """The student after one epoch of the engine's steps, from the seed-0 initialisation, on
    batches drawn with ``views`` (default: the ones the task asks for)."""
    torch.manual_seed(0)
    task = build_student_task(registry, model_spec(PAIR[1]), teacher, method_specs, train, DEVICE)
    params = [p for m in task.modules() for p in m.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(params, Schedule(epochs=EPOCHS, batch_size=BATCH, lr=0.05), DEVICE)
    for m in task.modules():
        m.train()
    views = task.views if views is None else views
    for batch in train.train_batches(BATCH, data_generator(0, DEVICE), views, EPOCH, EPOCHS):
        train_step(task, batch, optimizer, DEVICE, PRECISION)
    return task


@pytest.fixture(scope="module")
def setup(registry):
    train = tiny_data(32)
    torch.manual_seed(1)
    teacher = build_teacher(registry, PAIR[0], train).requires_grad_(False)
    references = {}

    def ce_alone(views):
        """The CE-only student trained on batches drawn with ``views`` (computed once each)."""
        if views not in references:
            task = trained_student(registry, teacher, train, [CE], views)
            references[views] = task.student.state_dict()
        return references[views]
    return train, teacher, ce_alone


CE = {"name": "ce", "weight": 1.0, "params": {}}


@pytest.mark.parametrize("method_name", [m for m in METHODS if PAIR not in REFUSES.get(m, ())])
def test_method_at_weight_zero_leaves_the_student_as_ce_alone(registry, setup, method_name):
    train, teacher, ce_alone = setup
    task = trained_student(registry, teacher, train,
                           [CE, {"name": method_name, "weight": 0.0, "params": {}}])
    reference = ce_alone(tuple(task.views))
    state = task.student.state_dict()
    trainable = {n for n, p in task.student.named_parameters()}
    changed = sorted(n for n in reference if not torch.equal(reference[n], state[n]))
    assert not [n for n in changed if n in trainable], (
        f"{method_name} at weight 0 changed the student's trainable parameters: {changed[:5]}")
    extra_views = bool(task.methods[-1][2].views)
    if extra_views:
        # Its extra views' forwards move the running statistics, and nothing else.
        assert changed and all(n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in changed), changed
    else:
        assert changed == [], f"{method_name} at weight 0 changed the student's buffers: {changed[:5]}"
