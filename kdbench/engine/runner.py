"""Runs a recipe's grid: teachers first (each once, cached by id), then the students.

Nothing here knows a method, objective, model or dataset by name: everything is looked up in
the registry from the run specs produced by :func:`kdbench.recipe.expand`.
"""
from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kdbench.api import MethodSetup, ModelOutput, ObjectiveSetup, UserError
from kdbench.data.loader import DeviceData, subset_per_class
from kdbench.diagnostics import teacher_diagnostics
from kdbench.engine.loop import Diverged, autocast, fit
from kdbench.recipe import LoadedRecipe, RunSpec, expand
from kdbench.registry import Registry
from kdbench.store import RunStore, atomic_write_bytes, provenance


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def data_generator(seed: int, device: torch.device) -> torch.Generator:
    """The data-order/augmentation generator, on the training device, separate from the one
    used for initialisation so that adding a method never changes the data stream."""
    return torch.Generator(device=device).manual_seed(seed + 7919)


def build_model(registry: Registry, model_spec: dict, num_classes: int) -> nn.Module:
    plugin = registry.find("model", model_spec["name"])
    return plugin.factory(num_classes, plugin.params.model_validate(model_spec["params"]))


@torch.no_grad()
def dummy_forward(model: nn.Module, data: DeviceData) -> ModelOutput:
    was = model.training
    model.eval()
    out = model(data.normalize(data.images[:2]))
    model.train(was)
    return out


# ------------------------------------------------------------------------------------------------
# Tasks: what a step computes for a teacher and for a student.
# ------------------------------------------------------------------------------------------------
class TeacherTask:
    def __init__(self, model, objective):
        self.model, self.objective = model, objective
        self.views = tuple(objective.views)

    def modules(self):
        return [self.model, self.objective]

    def loss_terms(self, batch):
        out = self.model(batch.x)
        extra = {v: self.model(batch.views[v]) for v in self.objective.views}
        return self.objective(out, batch, extra, self.model), out.logits

    def eval_model(self):
        return self.model

    def epoch_stats(self):
        return self.objective.epoch_stats()


class StudentTask:
    """One forward of each net per view; every method of the set shares those outputs."""

    def __init__(self, student, teacher, methods: list[tuple[str, float, nn.Module]]):
        self.student, self.teacher, self.methods = student, teacher, methods
        self.views = tuple(dict.fromkeys(v for _, _, m in methods for v in m.views))
        self.teacher_train_mode = any(m.teacher_train_mode for _, _, m in methods)

    def modules(self):
        return [self.student, *(m for _, _, m in self.methods)]

    def _teacher(self, x):
        if self.teacher is None:
            return None
        self.teacher.train(self.teacher_train_mode)
        with torch.no_grad():
            return self.teacher(x)

    def loss_terms(self, batch):
        s_out, t_out = self.student(batch.x), self._teacher(batch.x)
        extra = {v: (self.student(batch.views[v]), self._teacher(batch.views[v])) for v in self.views}
        terms = {}
        for name, weight, method in self.methods:
            for key, value in method(s_out, t_out, batch, extra).items():
                terms[key if key not in terms else f"{name}.{key}"] = weight * value
        return terms, s_out.logits

    def eval_model(self):
        return self.student

    def epoch_stats(self):
        stats = {}
        for _, _, m in self.methods:
            stats.update(m.epoch_stats())
        return stats


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)


class GridRunner:
    def __init__(self, loaded: LoadedRecipe, registry: Registry, progress, device: str | None = None,
                 fail_fast: bool = False):
        self.loaded, self.registry, self.progress = loaded, registry, progress
        self.recipe = loaded.recipe
        self.device = resolve_device(device or self.recipe.device)
        self.store = RunStore(loaded.output_dir, loaded.teacher_dir)
        self.teachers, self.students = expand(loaded, registry)
        self.fail_fast = fail_fast
        self._data: tuple[DeviceData, DeviceData] | None = None

    # ------------------------------------------------------------------ planning
    def plan(self) -> dict:
        needed = {s.teacher.id for s in self.students if s.teacher and not self._done(s)}
        return {
            "teachers": [(t, self._done(t)) for t in self.teachers],
            "teachers_needed": [t for t in self.teachers if t.id in needed and not self._done(t)],
            "students": [(s, self._done(s)) for s in self.students],
        }

    def _done(self, spec: RunSpec) -> bool:
        return self.store.is_done(spec.kind, spec.id)

    # ------------------------------------------------------------------ data
    def data(self) -> tuple[DeviceData, DeviceData]:
        if self._data is None:
            ds = self.recipe.dataset
            plugin = self.registry.find("dataset", ds.name)
            params = plugin.params.model_validate(ds.params)
            train = subset_per_class(plugin.factory(params, "train"), ds.subset_per_class)
            test = subset_per_class(plugin.factory(params, "test"), ds.test_subset_per_class)
            self._data = (DeviceData(train, self.device), DeviceData(test, self.device))
        return self._data

    # ------------------------------------------------------------------ running
    def run(self) -> Summary:
        summary = Summary()
        plan = self.plan()
        todo_students = [s for s, done in plan["students"] if not done]
        summary.skipped += [s.id for s, done in plan["students"] if done]
        todo = plan["teachers_needed"] + todo_students
        self.progress.grid(len(todo))
        if not todo:
            return summary
        self.data()  # dataset errors surface before any training
        failed_teachers: set[str] = set()
        for spec in todo:
            if spec.teacher is not None and spec.teacher.id in failed_teachers:
                self._record_failure(spec, f"teacher {spec.teacher.id} failed", summary)
                continue
            status = self._run_one(spec, summary)
            if status != "done" and spec.kind == "teacher":
                failed_teachers.add(spec.id)
            if status == "failed" and self.fail_fast:
                break
        return summary

    def _run_one(self, spec: RunSpec, summary: Summary) -> str:
        train, test = self.data()
        sched = spec.spec["schedule"]
        self.progress.run_started(f"{spec.describe} ({spec.id})", sched["epochs"],
                                  train.num_batches(sched["batch_size"]))
        t0 = time.perf_counter()
        try:
            record = (self._train_teacher if spec.kind == "teacher" else self._train_student)(spec)
        except Diverged as exc:
            record = self._base_record(spec, "diverged")
            record["diverged"] = {"epoch": exc.epoch + 1, "terms": exc.terms}
            self.store.write_record(spec.kind, spec.id, record)
            summary.diverged.append(spec.id)
            self.progress.run_done("diverged", str(exc))
            return "diverged"
        except (KeyboardInterrupt, UserError):
            raise
        except Exception:
            self._record_failure(spec, traceback.format_exc(), summary)
            return "failed"
        record["wall_time_s"] = time.perf_counter() - t0
        self.store.write_record(spec.kind, spec.id, record)
        summary.done.append(spec.id)
        self.progress.run_done("done", f"top1={record['final']['top1']:.2f}")
        return "done"

    def _record_failure(self, spec: RunSpec, tb: str, summary: Summary) -> None:
        run_dir = self.store.run_dir(spec.kind, spec.id)
        atomic_write_bytes(run_dir / "error.txt", tb.encode())
        record = self._base_record(spec, "failed")
        record["error"] = tb.strip().splitlines()[-1]
        self.store.write_record(spec.kind, spec.id, record)
        summary.failed.append(spec.id)
        self.progress.run_done("FAILED", f"{record['error']} (traceback: {run_dir / 'error.txt'})")

    def _base_record(self, spec: RunSpec, status: str) -> dict:
        return {"id": spec.id, "kind": spec.kind, "status": status, "spec": spec.spec,
                "meta": spec.meta, "teacher_id": spec.teacher.id if spec.teacher else None,
                "recipe": str(self.loaded.path), "report": self.recipe.report,
                "provenance": provenance(self.device, self.registry.versions())}

    def _fit(self, task, spec: RunSpec):
        train, test = self.data()
        from kdbench.recipe import Schedule

        return fit(task, Schedule(**spec.spec["schedule"]), train, test, self.device,
                   self.recipe.precision, data_generator(spec.spec["seed"], self.device),
                   self.progress, self.recipe.eval_batch_size)

    def _train_teacher(self, spec: RunSpec) -> dict:
        train, test = self.data()
        seed_everything(spec.spec["seed"], self.recipe.deterministic)
        model = build_model(self.registry, spec.spec["model"], train.num_classes).to(self.device)
        obj = spec.spec["objective"]
        plugin = self.registry.find("teacher_objective", obj["name"])
        setup = ObjectiveSetup(model=model, model_out=dummy_forward(model, train),
                               num_classes=train.num_classes, num_train_samples=len(train),
                               image_size=int(train.images.shape[-1]), device=self.device)
        objective = plugin.factory(plugin.params.model_validate(obj["params"]), setup).to(self.device)
        result = self._fit(TeacherTask(model, objective), spec)
        self.store.save_weights(spec.id, model.state_dict())
        record = self._base_record(spec, "done")
        record.update(epochs=result.epochs, final=result.final, best=result.best)
        with autocast(self.device, self.recipe.precision):
            record["diagnostics"] = teacher_diagnostics(
                model, test.eval_batches(self.recipe.eval_batch_size),
                temperature=self.recipe.diagnostics_temperature)
        return record

    def load_teacher(self, spec: RunSpec) -> nn.Module:
        train, _ = self.data()
        model = build_model(self.registry, spec.spec["model"], train.num_classes).to(self.device)
        model.load_state_dict(self.store.load_weights(spec.id, self.device))
        model.eval()
        model.requires_grad_(False)
        return model

    def _train_student(self, spec: RunSpec) -> dict:
        train, _ = self.data()
        teacher = self.load_teacher(spec.teacher) if spec.teacher else None
        seed_everything(spec.spec["seed"], self.recipe.deterministic)
        student = build_model(self.registry, spec.spec["model"], train.num_classes).to(self.device)
        setup = MethodSetup(student=student, teacher=teacher, student_out=dummy_forward(student, train),
                            teacher_out=dummy_forward(teacher, train) if teacher is not None else None,
                            num_classes=train.num_classes, num_train_samples=len(train),
                            train_labels=train.labels, image_size=int(train.images.shape[-1]),
                            device=self.device)
        methods = []
        for term in spec.spec["methods"]:
            plugin = self.registry.find("student_method", term["name"])
            method = plugin.factory(plugin.params.model_validate(term["params"]), setup)
            methods.append((term["name"], term["weight"], method.to(self.device)))
        result = self._fit(StudentTask(student, teacher, methods), spec)
        record = self._base_record(spec, "done")
        record.update(epochs=result.epochs, final=result.final, best=result.best)
        if spec.teacher is not None:
            trec = self.store.record("teacher", spec.teacher.id) or {}
            record["teacher_final"] = trec.get("final")
        return record
