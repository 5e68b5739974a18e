"""Training one run of the grid: its models and task, ``fit``, and the result record's body.

:class:`RunTrainer` knows how a teacher or a student run is trained (seeding, the task from
:mod:`kdbench.engine.tasks`, the teacher logit cache, ``fit``) and what its finished record holds
(results, the weights' fingerprint, a teacher's weights file and soft-label diagnostics, a
published teacher's provenance). Scheduling, locks and the outcome records of failed, diverged
or interrupted runs are elsewhere (:mod:`kdbench.engine.queue`, :mod:`kdbench.engine.recorder`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kdbench.api import UserError
from kdbench.data.loader import DeviceData, hold_out_per_class, subset_per_class
from kdbench.diagnostics import teacher_diagnostics
from kdbench.engine.checkpoint import Checkpointer
from kdbench.engine.logit_cache import LogitCacheKeeper
from kdbench.engine.loop import Evaluation, autocast, evaluate, fit
from kdbench.engine.reproducibility import data_generator, seed_everything, weights_sha256
from kdbench.engine.tasks import (InitTask, StudentTask, TeacherTask, build_model, build_student_task,
                                  build_teacher_task, place_model)
from kdbench.trackers import Trackers


@dataclass
class GridData:
    """A recipe's data on the device: what trains, what every epoch is evaluated on."""

    train: DeviceData
    test: DeviceData
    evaluation: Evaluation  # the validation split and the test subset for the epochs before the last


def load_data(loaded, registry, device: torch.device, view_makers=None) -> GridData:
    """The recipe's dataset on ``device``: the validation split held out of the training set
    first (``val_per_class``), then the per-class subsets of what is left and of the test set."""
    recipe = loaded.recipe
    ds = recipe.dataset
    plugin = registry.find("dataset", ds.name)
    params = loaded.plugin_params(registry)[("dataset",)]
    train, val = plugin.factory(params, "train"), None
    if ds.val_per_class is not None:
        try:
            train, val = hold_out_per_class(train, ds.val_per_class)
        except ValueError as exc:
            raise UserError(f"{loaded.path}: dataset.val_per_class = {ds.val_per_class!r}: {exc}; "
                            "hold out fewer samples per class") from None
    train = subset_per_class(train, ds.subset_per_class)
    test = subset_per_class(plugin.factory(params, "test"), ds.test_subset_per_class)
    on_device = lambda data: DeviceData(data, device, view_makers)  # noqa: E731
    during = (on_device(subset_per_class(test, recipe.eval_subset_per_class, seed=2))
              if recipe.eval_subset_per_class is not None else None)
    return GridData(on_device(train), on_device(test),
                    Evaluation(every=recipe.eval_every, val=on_device(val) if val is not None else None,
                               test_during=during))


class _StageProgress:
    """A run's progress during a method's initialisation stage: its epochs say whose they are."""

    def __init__(self, progress, what: str, epochs: int):
        self.progress, self.what, self.epochs = progress, what, epochs

    def log(self, text: str) -> None:
        self.progress.log(text)

    def batch(self) -> None:
        self.progress.batch()

    def epoch_done(self, epoch: int, metrics: dict) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.progress.log(f"  {self.what}: epoch {epoch + 1}/{self.epochs} {shown}")


class RunTrainer:
    """Trains runs of one recipe on one device. ``base_record(spec, status)`` (from the
    recorder) starts each record; ``store`` keeps teachers' weights; ``wrap_task`` lets a
    distributed runner share each step between ranks."""

    def __init__(self, loaded, registry, device: torch.device, store, progress, stop_requested,
                 base_record: Callable[..., dict],
                 wrap_task: Callable[[object], object] = lambda task: task,
                 data: GridData | None = None):
        """``data``: the grid's data if the caller has it already (a benchmark's synthetic
        data); by default the recipe's dataset, loaded on first use."""
        self.loaded, self.recipe, self.registry = loaded, loaded.recipe, registry
        self.device, self.store, self.progress = device, store, progress
        self.stop_requested, self.base_record, self.wrap_task = stop_requested, base_record, wrap_task
        self.logit_cache = LogitCacheKeeper(device, self.recipe.precision)
        self._data: GridData | None = data
        self.resumed_from: dict | None = None  # where the last fit() resumed (for trained_by)
        # Experiment trackers (kdbench run --tracker): none unless asked for.
        self.trackers = Trackers(registry, loaded.output_dir, lambda text: self.progress.log(text))
        self._tracked = None  # the current run's tracker session

    # ------------------------------------------------------------------ data and models
    def grid_data(self) -> GridData:
        if self._data is None:
            self._data = load_data(self.loaded, self.registry, self.device,
                                   self.registry.view_makers())
        return self._data

    def data(self) -> tuple[DeviceData, DeviceData]:
        """(train, test)."""
        return self.grid_data().train, self.grid_data().test

    def build_for(self, spec) -> nn.Module:
        """``spec``'s model on the training device (channels_last on CUDA, compiled if the
        recipe asks), from its validated parameters."""
        train, _ = self.data()
        model = build_model(self.registry, spec.spec["model"], train.num_classes, spec.params.get("model"))
        return place_model(model, self.device, self.recipe.compile)

    def teacher_task(self, spec) -> TeacherTask:
        """The teacher and its objective, built as training uses them (also for calibration)."""
        train, _ = self.data()
        return build_teacher_task(self.registry, spec.objective_term(), self.build_for(spec),
                                  train, self.device)

    def student_task(self, spec, teacher: nn.Module | None) -> StudentTask:
        """The student, its methods (built from the real shapes) and the frozen teacher, cast
        once to the autocast dtype (not with compile)."""
        train, _ = self.data()
        return build_student_task(self.registry, spec.method_terms(), self.build_for(spec), teacher,
                                  train, self.device, self.recipe.precision,
                                  cast_teacher=not self.recipe.compile, optimizer=spec.optimizer_term())

    def load_teacher(self, spec) -> nn.Module:
        model = self.build_for(spec)
        model.load_state_dict(self.store.load_weights(spec.id, self.device))
        model.eval()
        model.requires_grad_(False)
        return model

    # ------------------------------------------------------------------ training
    def train(self, spec, checkpointer: Checkpointer) -> dict:
        """Train ``spec`` (resuming from ``checkpointer``); its finished record. The trackers
        see its start, each epoch (fit's on_epoch) and its end."""
        self.resumed_from = None
        with self.trackers.run(spec, self.store.run_dir(spec.kind, spec.id)) as self._tracked:
            if spec.kind == "teacher":
                record = (self._published_teacher(spec) if "checkpoint" in spec.spec
                          else self._train_teacher(spec, checkpointer))
            else:
                record = self._train_student(spec, checkpointer)
            self._tracked.done(record)
        return record

    def _fit(self, task, spec, checkpointer: Checkpointer):
        from kdbench.recipe import Schedule

        data = self.grid_data()
        result = fit(self.wrap_task(task), Schedule(**spec.spec["schedule"]), data.train, data.test,
                     self.device, self.recipe.precision, data_generator(spec.spec["seed"], self.device),
                     self.progress, self.recipe.eval_batch_size, checkpointer=checkpointer,
                     stop_requested=self.stop_requested, evaluation=data.evaluation,
                     on_epoch=self._tracked.on_epoch if self._tracked else None)
        self.resumed_from = result.resumed_from
        return result

    def _train_teacher(self, spec, checkpointer: Checkpointer) -> dict:
        seed_everything(spec.spec["seed"], self.recipe.deterministic)
        task = self.teacher_task(spec)
        result = self._fit(task, spec, checkpointer)
        return self._finished_teacher(spec, task.model, epochs=result.epochs, final=result.final,
                                      best=result.best, objective=task.objective)

    def _published_teacher(self, spec) -> dict:
        """A teacher loaded from a checkpoint file: nothing is trained; its accuracy is measured
        here, not taken from the file."""
        from kdbench.published import checkpoint_metadata, load_published_teacher

        _, test = self.data()
        model = self.build_for(spec)
        path = spec.spec["checkpoint"]["path"]
        load_published_teacher(path, model)
        metrics = evaluate(model, test, self.recipe.eval_batch_size, self.device, self.recipe.precision)
        result = {"top1": metrics["test_top1"], "top5": metrics["test_top5"], "epoch": 0}
        record = self._finished_teacher(spec, model, epochs=[], final=result, best=result)
        record["published"] = checkpoint_metadata(path)
        return record

    def _finished_teacher(self, spec, model: nn.Module, objective: nn.Module | None = None,
                          **results) -> dict:
        """Save a finished teacher's weights; its record, with the soft-label diagnostics (and
        Section 4's pair statistics for the representation ``objective`` trained, if it names
        one: ``objective.representation``)."""
        _, test = self.data()
        self.store.save_weights(spec.id, model.state_dict())
        record = self.base_record(spec, "done")
        record.update(**results, weights_sha256=weights_sha256(model.state_dict()),
                      evaluation=self.grid_data().evaluation.describe(test))
        with autocast(self.device, self.recipe.precision):
            record["diagnostics"] = teacher_diagnostics(
                model, test.eval_batches(self.recipe.eval_batch_size),
                temperature=self.recipe.diagnostics_temperature,
                representation=getattr(objective, "representation", None),
                representation_name=getattr(objective, "representation_name", None))
        return record

    def _init_stages(self, task: StudentTask, spec, checkpointer: Checkpointer) -> dict:
        """Run each method's initialisation stage (kdbench.api.InitStage) before distillation,
        each with its own checkpoints (``<run>/init-<method>/``, resumed like any epoch; cleared
        with the run's). Skipped once the main schedule has a checkpoint: it holds the state the
        stages left. Their epochs, for the record."""
        from kdbench.recipe import Schedule

        stages = [(name, stage) for name, _, m in task.methods if (stage := m.init_stage()) is not None]
        if not stages or checkpointer.paths():
            return {}
        data, out = self.grid_data(), {}
        for i, (name, stage) in enumerate(stages):
            sched = Schedule(epochs=stage.epochs, batch_size=spec.spec["schedule"]["batch_size"],
                             lr=stage.lr if stage.lr is not None else spec.spec["schedule"]["lr"],
                             momentum=stage.momentum, weight_decay=stage.weight_decay)
            ckpt = type(checkpointer)(checkpointer.dir / f"init-{name}", checkpointer.every_steps,
                                      warn=checkpointer.warn)
            # Its own data order: the main schedule's stream is the same with or without it.
            generator = data_generator(spec.spec["seed"] + 104729 * (i + 1), self.device)
            progress = _StageProgress(self.progress, f"initialisation stage of {name}", stage.epochs)
            result = fit(self.wrap_task(InitTask(task.student, task.teacher, stage)), sched, data.train,
                         data.test, self.device, self.recipe.precision, generator, progress,
                         self.recipe.eval_batch_size, checkpointer=ckpt, stop_requested=self.stop_requested,
                         evaluation=Evaluation(every=stage.epochs))
            out[name] = {"epochs": result.epochs}
        return out

    def _train_student(self, spec, checkpointer: Checkpointer) -> dict:
        teacher = self.load_teacher(spec.teacher) if spec.teacher else None
        seed_everything(spec.spec["seed"], self.recipe.deterministic)
        task = self.student_task(spec, teacher)
        cache_report = None
        if self.recipe.teacher_logit_cache and spec.teacher is not None:
            cache_report = self.logit_cache.attach(spec.teacher.id, spec.spec["schedule"]["batch_size"],
                                                   task, self.data()[0])
        init_stages = self._init_stages(task, spec, checkpointer)
        try:
            result = self._fit(task, spec, checkpointer)
        finally:
            self.logit_cache.release()
        record = self.base_record(spec, "done")
        if init_stages:
            record["init_stages"] = init_stages
        record.update(epochs=result.epochs, final=result.final, best=result.best,
                      weights_sha256=weights_sha256(task.student.state_dict()),
                      evaluation=self.grid_data().evaluation.describe(self.data()[1]))
        if teacher is not None:
            record["teacher_cast_once"] = bool(task.teacher_cast_once)
        if cache_report is not None:
            record["teacher_logit_cache"] = cache_report()
        if spec.teacher is not None:
            trec = self.store.record("teacher", spec.teacher.id) or {}
            record["teacher_final"] = trec.get("final")
        return record
