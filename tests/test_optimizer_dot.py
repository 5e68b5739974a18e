"""DOT (kdbench_plugins/optimizers/dot.py): the update against its equations written out here
parameter by parameter, Δ = 0 against torch's SGD, where the gradients go in a real student
step, the recipe key (ids, checks), an exact resume, and the refusal under torchrun."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from conftest import TINY_NET, read_records, run_kdbench, toml_value, write_tiny_recipe
from kdbench.cli import main
from kdbench.engine.estimate import cost_key
from kdbench.engine.loop import make_optimizer, train_step
from kdbench.recipe import RecipeError, Schedule, expand, load_recipe
from kdbench_plugins.optimizers.dot import DOT, DOTParams
from test_method_pairs import build_teacher, model_spec, tiny_data
from test_resume import _interrupt_and_resume

torch.set_num_threads(1)

SCHEDULE = Schedule(epochs=1, batch_size=4, lr=0.05, momentum=0.9, weight_decay=5e-4)


class ThreeKinds(nn.Module):
    """``shared`` gets both losses' gradients, ``task_only`` only the task loss's (a classifier
    a feature-only method never reaches), ``distill_only`` only the distillation loss's (a
    method's own head)."""

    def __init__(self):
        super().__init__()
        self.shared, self.task_only, self.distill_only = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 3)

    def losses(self, x, y, target):
        h = self.shared(x)
        task = nn.functional.cross_entropy(h + self.task_only(x), y)
        distill = ((h - target) ** 2).mean() + (self.distill_only(h) ** 2).mean()
        return task, distill


def _batches(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g),
             torch.randn(8, 4, generator=g, dtype=torch.float64)) for _ in range(steps)]


def _by_the_equations(model: ThreeKinds, batches, lr, mu, delta, decay):
    """The update written out per parameter, from the plugin's docstring: v_task ← (μ−Δ)·v_task
    + g_task + λθ, v_kd ← (μ+Δ)·v_kd + g_kd, θ ← θ − η·v_task − η·v_kd; a parameter one loss
    alone reaches uses μ for its buffer and takes the decay there, except at the first step of a
    distillation-only buffer (raw gradient: the reference's quirk); a buffer starts as its first
    value."""
    v_task, v_kd = {}, {}
    params = dict(model.named_parameters())
    for x, y, target in batches:
        task, distill = model.losses(x, y, target)
        g_task = dict(zip(params, torch.autograd.grad(task, list(params.values()), retain_graph=True,
                                                      allow_unused=True)))
        g_kd = dict(zip(params, torch.autograd.grad(distill, list(params.values()), allow_unused=True)))
        with torch.no_grad():
            for name, p in params.items():
                gt, gk = g_task[name], g_kd[name]
                if gt is not None:
                    d = gt + decay * p
                    m = mu - delta if gk is not None else mu
                    v_task[name] = d.clone() if name not in v_task else m * v_task[name] + d
                    p -= lr * v_task[name]
                if gk is not None:
                    if gt is not None:
                        v_kd[name] = gk.clone() if name not in v_kd else (mu + delta) * v_kd[name] + gk
                    else:
                        v_kd[name] = gk.clone() if name not in v_kd else mu * v_kd[name] + gk + decay * p
                    p -= lr * v_kd[name]
    return v_task, v_kd


def _with_dot(model: ThreeKinds, batches, schedule=SCHEDULE, delta=0.075):
    rule = DOT(DOTParams(delta=delta))
    optimizer = rule.build(list(model.parameters()), schedule, torch.device("cpu"))
    for x, y, target in batches:
        rule.step(optimizer, *model.losses(x, y, target))
    return optimizer


def test_the_update_is_its_equations_for_each_kind_of_parameter():
    torch.manual_seed(0)
    ours = ThreeKinds().double()
    start, written = copy.deepcopy(ours.state_dict()), copy.deepcopy(ours)
    batches = _batches(5)
    optimizer = _with_dot(ours, batches)
    v_task, v_kd = _by_the_equations(written, batches, SCHEDULE.lr, SCHEDULE.momentum, 0.075,
                                     SCHEDULE.weight_decay)
    for (name, p), q in zip(ours.named_parameters(), written.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13, msg=name)
    moved = min((p - start[name]).abs().max().item() for name, p in ours.named_parameters())
    assert moved > 1e-4  # every parameter did move
    # Which buffers exist says which loss reached which parameter.
    state = {n: set(optimizer.state[p]) for n, p in ours.named_parameters()}
    assert state["shared.weight"] == {"momentum_buffer", "distillation_momentum_buffer"}
    assert state["task_only.weight"] == {"momentum_buffer"}
    assert state["distill_only.weight"] == {"distillation_momentum_buffer"}
    assert set(v_task) == {n for n, s in state.items() if "momentum_buffer" in s}
    assert set(v_kd) == {n for n, s in state.items() if "distillation_momentum_buffer" in s}


def test_with_delta_zero_it_is_sgd_on_the_summed_loss():
    """Every parameter in both losses, Δ = 0: v_task + v_kd follows SGD's momentum exactly."""
    torch.manual_seed(1)
    a = nn.Linear(6, 4).double()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    batches = _batches(6, seed=1)

    def losses(model, x, y, target):
        out = model(x)
        return nn.functional.cross_entropy(out, y), ((out - target) ** 2).mean()

    rule = DOT(DOTParams(delta=0.0))
    dot = rule.build(list(a.parameters()), SCHEDULE, torch.device("cpu"))
    sgd = torch.optim.SGD(b.parameters(), lr=SCHEDULE.lr, momentum=SCHEDULE.momentum,
                          weight_decay=SCHEDULE.weight_decay)
    for x, y, target in batches:
        rule.step(dot, *losses(a, x, y, target))
        sgd.zero_grad()
        sum(losses(b, x, y, target)).backward()
        sgd.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    # ... and with Δ = 0.075 it is not.
    rule = DOT(DOTParams())
    dot = rule.build(list(c.parameters()), SCHEDULE, torch.device("cpu"))
    for x, y, target in batches:
        rule.step(dot, *losses(c, x, y, target))
    assert (c.weight - b.weight).abs().max() > 1e-4


def test_a_student_step_trains_the_student_and_the_methods_modules_not_the_teacher(registry):
    """A real KD + FitNet task through the engine's builders and train_step: the task loss is
    the ce term, the distillation loss the others; the student gets both buffers, FitNet's
    regressor (no label gradient) only the distillation one, the teacher nothing."""
    from kdbench.engine import tasks

    torch.manual_seed(0)
    train = tiny_data(32)
    teacher = build_teacher(registry, "wrn_40_2", train)
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student = tasks.build_model(registry, model_spec("wrn_16_2"), train.num_classes)
    task = tasks.build_student_task(
        registry, [("ce", 0.1, {}), ("kd", 0.9, {}), ("fitnet", 100.0, {})],
        student, teacher, train, torch.device("cpu"), optimizer=("dot", {}))
    assert isinstance(task.update_rule, DOT)
    params = [p for m in task.modules() for p in m.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(params, SCHEDULE, torch.device("cpu"), task.update_rule)
    before = {id(p): p.detach().clone() for p in params}
    gen = torch.Generator().manual_seed(0)
    batch = next(train.train_batches(4, gen, task.views))
    for m in task.modules():
        m.train()
    loss, terms, _ = train_step(task, batch, optimizer, torch.device("cpu"), "fp32")
    label, distill = task.split_terms(terms)
    assert set(terms) == {"ce", "kd", "fitnet"}
    torch.testing.assert_close(label, terms["ce"])
    torch.testing.assert_close(distill, terms["kd"] + terms["fitnet"])
    torch.testing.assert_close(loss, label + distill)
    regressor = {id(p) for _, _, m in task.methods for p in m.parameters()}
    for p in params:
        keys = set(optimizer.state[p])
        assert not torch.equal(p, before[id(p)]), "every trained parameter moved"
        if id(p) in regressor:
            assert keys == {"distillation_momentum_buffer"}
        else:
            assert keys == {"momentum_buffer", "distillation_momentum_buffer"}
    for n, p in teacher.named_parameters():
        assert p.grad is None and torch.equal(p, teacher_before[n]), n


# ------------------------------------------------------------------------------------- recipes
DOT_SET = {"label": "DOT", "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
           "optimizer": "dot"}


def _recipe_with(tiny_recipe, *sets, **overrides):
    """The tiny recipe (Student, KD) with ``sets`` added after them."""
    extra = "".join("\n[[method_sets]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in s.items()) for s in sets)
    return tiny_recipe(extra=extra, **overrides)


def test_the_recipe_key_enters_only_the_ids_of_its_sets(tiny_recipe, registry, tmp_path):
    plain = expand(load_recipe(tiny_recipe(name="plain"), registry), registry)[1]
    with_dot = expand(load_recipe(_recipe_with(tiny_recipe, DOT_SET, name="plain", file="d.toml"),
                                  registry), registry)[1]
    by_set = {s.meta.method_set: s for s in with_dot}
    # The sets without an optimizer keep their ids (and have no optimizer in their spec).
    assert [s.id for s in plain] == [by_set["Student"].id, by_set["KD"].id]
    assert all("optimizer" not in s.spec for s in plain)
    dot = by_set["DOT"]
    assert dot.spec["optimizer"] == {"name": "dot", "params": {"delta": 0.075}}
    assert {k: v for k, v in dot.spec.items() if k != "optimizer"} == by_set["KD"].spec
    assert dot.id != by_set["KD"].id and dot.optimizer_term()[0] == "dot"
    assert cost_key(dot) != cost_key(by_set["KD"])  # two backward passes cost more
    other = expand(load_recipe(_recipe_with(tiny_recipe, {**DOT_SET, "optimizer": {"name": "dot", "delta": 0.05}},
                                            name="plain", file="e.toml"), registry), registry)[1]
    assert other[-1].id != dot.id  # another Δ, another run


@pytest.mark.parametrize("dot_set,overrides,needle", [
    ({**DOT_SET, "optimizer": "dto"}, {}, "method_sets[2].optimizer.name: unknown optimizer 'dto' (did you mean 'dot'?)"),
    ({**DOT_SET, "optimizer": "sgd"}, {}, "leave optimizer out for the student schedule's SGD"),
    ({**DOT_SET, "methods": [{"name": "kd"}]}, {}, "method set 'DOT' has no label term; add { name = \"ce\" }"),
    ({**DOT_SET, "methods": [{"name": "ce"}]}, {}, "method set 'DOT' has no distillation term"),
    ({**DOT_SET, "optimizer": {"name": "dot", "delta": 0.2}}, {}, "momentum 0.9 ± delta 0.2 must stay in [0, 1)"),
    ({**DOT_SET, "optimizer": {"name": "dot", "delta": -1}}, {}, "method_sets[2].optimizer.delta"),
    ({**DOT_SET, "optimizer": {"name": "dot", "beta": 1}}, {}, "method_sets[2].optimizer.beta"),
    (DOT_SET, {"student_schedule": {"nesterov": True}}, "'dot' cannot use student_schedule: nesterov = true"),
    (DOT_SET, {"pairs": [{"teacher": TINY_NET, "student": TINY_NET, "student_schedule": {"nesterov": True}}]},
     "'dot' cannot use pairs[0].student_schedule: nesterov = true"),
])
def test_a_bad_optimizer_is_a_problem_with_its_key(tiny_recipe, registry, capsys, dot_set, overrides, needle):
    recipe = _recipe_with(tiny_recipe, dot_set, **overrides)
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, registry)
    text = str(err.value)
    assert needle in text and "line " in text and len(text.splitlines()) == 2, text
    assert main(["validate", str(recipe)]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_dot_run_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    """DOT with CRD (its embeddings and memory get distillation gradients only): stopped by
    SIGTERM after step 5 with a checkpoint every 2 steps, resumed, equal to an uninterrupted
    run — so both momentum buffers are checkpointed."""
    def recipe(where):
        return write_tiny_recipe(
            where / "dot.toml", name="dot", output=where / "runs",
            top={"deterministic": True, "checkpoint_every_steps": 2},
            pairs=[{"teacher": TINY_NET, "student": TINY_NET}],
            method_sets=[{"label": "CRD+DOT", "optimizer": "dot",
                          "methods": [{"name": "ce", "weight": 0.1}, {"name": "crd", "nce_k": 8, "feat_dim": 16}]}],
            reference=None, student_schedule={"epochs": 2, "milestones": [1]})

    whole = tmp_path / "whole"
    assert main(["run", str(recipe(whole)), "--plain"]) == 0
    reference = read_records(whole / "runs", "students")
    parts = tmp_path / "parts"
    err = _interrupt_and_resume(recipe(parts), monkeypatch, capsys)
    assert "resuming from" in err
    resumed = read_records(parts / "runs", "students")
    assert resumed.keys() == reference.keys() and len(resumed) == 1
    for run_id, rec in resumed.items():
        assert rec["status"] == "done" and rec["trained_by"]["resumed_from"] is not None
        for key in ("epochs", "final", "weights_sha256"):
            assert rec[key] == reference[run_id][key], key


@pytest.mark.slow
def test_torchrun_refuses_a_dot_set_before_training(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "dot.toml", name="dot", method_sets=[DOT_SET], reference=None)
    proc = run_kdbench("run", recipe, "--plain", torchrun=["--nproc-per-node", "2", "--standalone"],
                       timeout=300)
    assert proc.returncode != 0
    # Each rank says it in one line and exits 2; the traceback torchrun then prints is its own
    # (it reports any child that failed), with no frame of kdbench's.
    assert proc.stderr.count("trains with optimizer 'dot', which takes more than one backward pass") == 2
    assert "exitcode: 2" in proc.stderr or "exitcode  : 2" in proc.stderr
    assert not re.search(r'File ".*/kdbench/(cli|engine|recipe|registry|__main__)', proc.stderr)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
