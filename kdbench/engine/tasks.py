"""What a training step computes, and the one place where tasks are built.

A *task* is what :func:`kdbench.engine.loop.fit` trains (the :class:`~kdbench.engine.loop.Task`
protocol): a teacher with its objective (:class:`TeacherTask`) or a student with its methods and
frozen teacher (:class:`StudentTask`). :func:`build_teacher_task` and :func:`build_student_task`
build them from registry plugins exactly as a run does — the sizing forward, the set-up the
plugins see, the plugins' factories, the teacher's one-time cast to the autocast dtype — and the
runner, ``--calibrate``, the benchmarks and the tests all call them, so every one of them
exercises the code a run executes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from kdbench.api import MethodSetup, ModelOutput, ObjectiveSetup, Params
from kdbench.data.loader import DeviceData
from kdbench.engine.loop import autocast, autocast_dtype
from kdbench.registry import Registry

# One method of a set as the builders take it: (plugin name, weight, parameters). Parameters are
# the plugin's validated Params object (what the recipe's grid carries) or a plain dict, which
# is validated here by the plugin's own model.
MethodTerm = tuple[str, float, "Params | dict[str, Any]"]


def _params(registry: Registry, kind: str, name: str, params) -> Params:
    if isinstance(params, Params):
        return params
    return registry.find(kind, name).params.model_validate(params or {})


def build_model(registry: Registry, model_spec: dict, num_classes: int,
                params: Params | None = None) -> nn.Module:
    """The model named by ``model_spec`` (``{"name", "params"}``); ``params``, if given, is its
    already validated parameter object."""
    plugin = registry.find("model", model_spec["name"])
    return plugin.factory(num_classes, params if params is not None
                          else plugin.params.model_validate(model_spec.get("params") or {}))


def place_model(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """``model`` on the training device: channels_last on CUDA (faster convolutions with cuDNN,
    and the device data is laid out to match); compiled in place if asked (state_dict keys stay
    those of the plain model)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model


@torch.no_grad()
def dummy_forward(model: nn.Module, data: DeviceData) -> ModelOutput:
    """An eval-mode forward of two training images, for sizing the plugins' modules. Runs in
    the model's own precision: fp64 models get fp64 images, and a model whose weights were cast
    to a reduced precision (a teacher after :func:`cast_teacher_once`) runs under autocast to
    that dtype, as the step runs it."""
    was = model.training
    model.eval()
    x = data.normalize(data.images[:2])
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    reduced = dtypes & {torch.bfloat16, torch.float16}
    if reduced:
        with torch.autocast(x.device.type, dtype=reduced.pop()):
            out = model(x)
    else:
        out = model(x.to(dtypes.pop()) if len(dtypes) == 1 else x)
    model.train(was)
    return out


def cast_teacher_once(teacher: nn.Module, data: DeviceData, device: torch.device, precision: str) -> bool:
    """Cast a frozen teacher's conv and linear weights to the autocast dtype once. Autocast
    re-casts weights at every forward unless they require grad, which a frozen teacher's do
    not; the cast rounds the same way, so the outputs are bit-identical. That is checked on
    two images (eval mode) and the cast undone if any output differs (e.g. a model reading a
    weight outside an autocast op). True if the teacher was cast."""
    dtype = autocast_dtype(device, precision)
    layers = [m for m in teacher.modules() if type(m) in (nn.Conv2d, nn.Linear)]  # not subclasses
    if dtype is None or not layers:
        return False
    was_training = teacher.training
    teacher.eval()
    x = data.normalize(data.images[:2])
    flat = lambda out: [out.logits, *out.feats, *out.preact_feats, out.pooled]  # noqa: E731
    original = [(m, name, p.data) for m in layers for name, p in m.named_parameters(recurse=False)]
    with torch.no_grad(), autocast(device, precision):
        before = flat(teacher(x))
        for m in layers:
            m.to(dtype)
        try:
            after = flat(teacher(x))
            same = all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(before, after))
        except Exception:
            same = False
    if not same:
        for m, name, data in original:
            getattr(m, name).data = data
    teacher.train(was_training)
    return same


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------
class TeacherTask:
    """A teacher and its objective: the objective's terms from the teacher's outputs for view 0
    and for each extra view the objective asks to have forwarded (``forward_views``, by default
    all its ``views``; an objective that only queues a view's images lists fewer)."""

    plans_epochs = False  # nothing to plan ahead

    def __init__(self, model: nn.Module, objective: nn.Module):
        self.model, self.objective = model, objective
        self.views = tuple(objective.views)
        self.forward_views = tuple(getattr(objective, "forward_views", self.views))
        # What the step calls; :meth:`distribute` replaces these with per-rank wrappers while
        # modules(), checkpoints and evaluation keep the plain modules.
        self.step_model, self.step_objective = model, objective

    def modules(self):
        return [self.model, self.objective]

    def stateful_modules(self):
        return self.modules()

    def start_epoch(self, plan) -> None:
        pass

    def distribute(self, wrap_net: Callable[[nn.Module], nn.Module],
                   wrap_module: Callable[[nn.Module], nn.Module]) -> "TeacherTask":
        """Run the step through ``wrap_net(model)`` and ``wrap_module(objective)`` (DDP)."""
        self.step_model, self.step_objective = wrap_net(self.model), wrap_module(self.objective)
        return self

    def loss_terms(self, batch):
        out = self.step_model(batch.x)
        extra = {v: self.step_model(batch.views[v]) for v in self.forward_views}
        return self.step_objective(out, batch, extra, self.step_model), out.logits

    def eval_model(self):
        return self.model

    def epoch_stats(self):
        return self.objective.epoch_stats()


class StudentTask:
    """One forward of each net per view; every method of the set shares those outputs. With a
    teacher logit cache (:mod:`kdbench.engine.logit_cache`) the teacher's logits of view 0 come
    from the cache, filled at the start of each epoch from the epoch's planned draws."""

    def __init__(self, student, teacher, methods: list[tuple[str, float, nn.Module]],
                 update_rule=None):
        self.student, self.teacher, self.methods = student, teacher, methods
        # An optimizer plugin (kdbench.api.StudentOptimizer) in place of the schedule's SGD.
        self.update_rule = update_rule
        self._label_methods = {i for i, (_, _, m) in enumerate(methods) if not getattr(m, "needs_teacher", True)}
        self._label_keys: list[str] = []  # the label methods' terms in the last loss_terms
        self.views = tuple(dict.fromkeys(v for _, _, m in methods for v in m.views))
        # One mode for the whole set: a set mixing OFD (train-mode teacher, as its reference
        # code) with other methods gives them train-mode teacher outputs too.
        self.teacher_train_mode = any(m.teacher_train_mode for _, _, m in methods)
        if teacher is not None:
            teacher.train(self.teacher_train_mode)  # once: nothing else changes the teacher's mode
        self.logit_cache = None
        self.plans_epochs = False  # fit() plans each epoch ahead and calls start_epoch(plan)
        self.teacher_cast_once = False  # set by build_student_task
        self.step_student, self.step_methods = student, methods  # see distribute()

    def distribute(self, wrap_net: Callable[[nn.Module], nn.Module],
                   wrap_module: Callable[[nn.Module], nn.Module]) -> "StudentTask":
        """Run the step through ``wrap_net(student)`` and ``wrap_module(method)`` (DDP); the
        frozen teacher and everything fit() saves or evaluates stay the plain modules."""
        self.step_student = wrap_net(self.student)
        self.step_methods = [(n, w, wrap_module(m)) for n, w, m in self.methods]
        return self

    def logit_cache_blocker(self) -> str | None:
        """Why this step cannot take its teacher logits from a cache (None: it can)."""
        if self.teacher is None:
            return "no teacher"
        if self.views:
            return f"extra views {list(self.views)}"
        if self.teacher_train_mode:
            return "the teacher runs in train mode"
        reading = [name for name, _, m in self.methods if m.needs_teacher and not m.teacher_logits_only]
        return f"{', '.join(reading)} read(s) more than the teacher's logits" if reading else None

    def use_logit_cache(self, cache) -> None:
        self.logit_cache, self.plans_epochs = cache, True

    def start_epoch(self, plan) -> None:
        if self.logit_cache is not None:
            self.logit_cache.fill(plan)

    def modules(self):
        return [self.student, *(m for _, _, m in self.methods)]

    def stateful_modules(self):
        # A teacher run in train mode updates its BatchNorm statistics: checkpoint it too.
        extra = [self.teacher] if self.teacher is not None and self.teacher_train_mode else []
        return self.modules() + extra

    def _teacher(self, x):
        if self.teacher is None:
            return None
        # no_grad rather than inference_mode: methods save teacher tensors for their backward
        # (e.g. MSE targets), which inference tensors do not allow.
        with torch.no_grad():
            return self.teacher(x)

    def loss_terms(self, batch):
        s_out = self.step_student(batch.x)
        if self.logit_cache is not None:
            t_out = ModelOutput(self.logit_cache.logits(batch.index, batch.view_code), [], [], None)
        else:
            t_out = self._teacher(batch.x)
        extra = {v: (self.step_student(batch.views[v]), self._teacher(batch.views[v])) for v in self.views}
        terms, self._label_keys = {}, []
        for i, (name, weight, method) in enumerate(self.step_methods):
            for key, value in method(s_out, t_out, batch, extra).items():
                key = key if key not in terms else f"{name}.{key}"
                terms[key] = weight * value
                if i in self._label_methods:
                    self._label_keys.append(key)
        return terms, s_out.logits

    def split_terms(self, terms: dict) -> tuple:
        """(label loss, distillation loss): the sum of the terms of the methods that need no
        teacher, and of the others, for an ``update_rule`` (the recipe check makes sure a set
        with one has both)."""
        label = [v for k, v in terms.items() if k in self._label_keys]
        distill = [v for k, v in terms.items() if k not in self._label_keys]
        if not label or not distill:
            raise ValueError(f"the optimizer needs label and distillation terms; the terms are "
                             f"{sorted(terms)}, the label terms {self._label_keys}")
        return sum(label), sum(distill)

    def eval_model(self):
        return self.student

    def epoch_stats(self):
        stats = {}
        for _, _, m in self.methods:
            stats.update(m.epoch_stats())
        return stats


class InitTask:
    """A method's initialisation stage (:class:`kdbench.api.InitStage`) as a task: the stage's
    modules train on its loss of both nets' view-0 outputs; the frozen teacher runs in eval
    mode, the student in the stage's mode."""

    views: tuple[str, ...] = ()
    plans_epochs = False

    def __init__(self, student: nn.Module, teacher: nn.Module, stage):
        self.student, self.teacher, self.stage = student, teacher, stage
        # Once, not per step: fit() puts modules() (the stage's) in train mode at every epoch's
        # start, after this; evaluation restores the student's mode as it found it.
        student.train(stage.student_train_mode)

    def modules(self):
        return list(self.stage.modules)

    def stateful_modules(self):
        return self.modules()

    def start_epoch(self, plan) -> None:
        pass

    def distribute(self, wrap_net, wrap_module):
        raise NotImplementedError("a method's initialisation stage does not run under torchrun "
                                  "yet (its modules may be parts of the student); train this run "
                                  "in one process")

    def loss_terms(self, batch):
        s_out = self.student(batch.x)
        with torch.no_grad():
            t_out = self.teacher(batch.x)
        return self.stage.loss(s_out, t_out, batch), s_out.logits

    def eval_model(self):
        return self.student

    def epoch_stats(self):
        return {}


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------
def method_setup(student: nn.Module | None, teacher: nn.Module | None, student_out: ModelOutput | None,
                 teacher_out: ModelOutput | None, train_labels: torch.Tensor, num_classes: int,
                 image_size: int, device: torch.device) -> MethodSetup:
    """What a student method sees when it is built (:class:`kdbench.api.MethodSetup`); the
    outputs are normally a :func:`dummy_forward` of each net (unit tests pass their own)."""
    return MethodSetup(student=student, teacher=teacher, student_out=student_out,
                       teacher_out=teacher_out, num_classes=num_classes,
                       num_train_samples=int(train_labels.shape[0]), train_labels=train_labels,
                       image_size=image_size, device=device)


def objective_setup(model: nn.Module, model_out: ModelOutput, num_classes: int, num_train_samples: int,
                    image_size: int, device: torch.device) -> ObjectiveSetup:
    """What a teacher objective sees when it is built (:class:`kdbench.api.ObjectiveSetup`)."""
    return ObjectiveSetup(model=model, model_out=model_out, num_classes=num_classes,
                          num_train_samples=num_train_samples, image_size=image_size, device=device)


def build_teacher_task(registry: Registry, objective: tuple[str, "Params | dict"], model: nn.Module,
                       train: DeviceData, device: torch.device) -> TeacherTask:
    """``model`` (built and placed by the caller, after seeding) with the teacher objective
    ``(name, params)``, built from the real output shapes."""
    name, params = objective
    plugin = registry.find("teacher_objective", name)
    setup = objective_setup(model, dummy_forward(model, train), train.num_classes, len(train),
                            int(train.images.shape[-1]), device)
    built = plugin.factory(_params(registry, "teacher_objective", name, params), setup)
    return TeacherTask(model, built.to(device))


def build_student_task(registry: Registry, methods: Sequence[MethodTerm], student: nn.Module,
                       teacher: nn.Module | None, train: DeviceData, device: torch.device,
                       precision: str = "fp32", cast_teacher: bool = True,
                       optimizer: "tuple[str, Params | dict] | None" = None) -> StudentTask:
    """``student`` (built and placed by the caller, after seeding) with the method set
    ``methods``, each built from the real shapes of both nets, and the frozen ``teacher``.

    After the methods are built (their sizing forward ran in the teacher's own precision) the
    teacher's weights are cast to the autocast dtype of ``precision`` once, if ``cast_teacher``
    (:func:`cast_teacher_once`; ``task.teacher_cast_once`` says whether it was). Leave
    ``cast_teacher`` off with ``torch.compile``: the check's extra graphs would use up dynamo's
    recompile budget of the shared forward. ``optimizer``: (name, parameters) of an optimizer
    plugin that trains the student instead of the schedule's SGD (the task's ``update_rule``)."""
    setup = method_setup(student, teacher, dummy_forward(student, train),
                         dummy_forward(teacher, train) if teacher is not None else None,
                         train.labels, train.num_classes, int(train.images.shape[-1]), device)
    built = []
    for name, weight, params in methods:
        plugin = registry.find("student_method", name)
        method = plugin.factory(_params(registry, "student_method", name, params), setup)
        built.append((name, weight, method.to(device)))
    rule = None
    if optimizer is not None:
        name, params = optimizer
        rule = registry.find("optimizer", name).factory(_params(registry, "optimizer", name, params))
    task = StudentTask(student, teacher, built, update_rule=rule)
    if teacher is not None and cast_teacher:
        task.teacher_cast_once = cast_teacher_once(teacher, train, device, precision)
    return task
