"""Runs a recipe's grid: teachers first (each once, cached by id), then the students.

Nothing here knows a method, objective, model or dataset by name: everything is looked up in
the registry from the run specs produced by :func:`kdbench.recipe.expand`. :class:`GridRunner`
walks the grid; the pieces it walks with live in their own modules:

* :mod:`kdbench.engine.queue` — the runs this process works through, the per-run locks that
  share a grid between processes, and waiting for another process's teacher;
* :mod:`kdbench.engine.trainer` — training one run (its task from :mod:`kdbench.engine.tasks`,
  ``fit``, the teacher logit cache's lifetime) and its finished record;
* :mod:`kdbench.engine.recorder` — the outcome records (done, diverged, interrupted, failed);
* :mod:`kdbench.engine.inputs` — the checks before any training.

Reliability rules:

* Every run checkpoints (every epoch, and every ``checkpoint_every_steps`` steps if set) and a
  rerun of the same command continues an unfinished run exactly where its last checkpoint left
  off (see :mod:`kdbench.engine.checkpoint`). Checkpoints are deleted once the final record is
  written; those of failed and interrupted runs are kept, so their retry resumes.
* What a rerun does with each record status: ``done`` is skipped; ``diverged`` (NaN/inf loss) is
  a result and is kept unless ``retry_diverged``; ``failed`` (an exception) and ``interrupted``
  (SIGTERM, SIGINT, SIGUSR1 or SIGUSR2) are run again (resuming from their checkpoint).
* A failing run does not stop the grid (unless ``fail_fast``); a student whose teacher failed or
  diverged is recorded as failed with that reason.
* SIGTERM/SIGINT/SIGUSR1/SIGUSR2 let the current step finish, write a checkpoint, record the
  run as ``interrupted`` and stop the grid (the CLI then exits 128 + signal number). A second
  signal stops the process at once (the last checkpoint is still good), except under the slurm
  launcher (:mod:`kdbench.engine.signals`).

A distributed runner (:mod:`kdbench.engine.distributed`) gives each rank its own store,
checkpointer, progress, stop signals and step wrapper through the constructor.
"""
from __future__ import annotations

from typing import Callable

from kdbench.engine.checkpoint import Checkpointer
from kdbench.engine.device import resolve_device
from kdbench.engine.inputs import check_inputs
from kdbench.engine.queue import RunQueue
from kdbench.engine.recorder import RunRecorder, Summary
from kdbench.engine.signals import StopSignals
from kdbench.engine.trainer import RunTrainer
from kdbench.recipe import LoadedRecipe, RunSpec, expand
from kdbench.registry import Registry
from kdbench.store import RunStore

__all__ = ["GridRunner", "Summary"]


class GridRunner:
    only: set[str] | None = None  # train only these run ids of the grid (kdbench run --run-id)

    def __init__(self, loaded: LoadedRecipe, registry: Registry, progress, device: str | None = None,
                 fail_fast: bool = False, checkpoint_every: int | None = None,
                 retry_diverged: bool = False, *, store: RunStore | None = None,
                 checkpointer: Callable[..., Checkpointer] = Checkpointer, stop=None,
                 wrap_task: Callable = lambda task: task, world_size: int = 1):
        self.loaded, self.registry, self.progress = loaded, registry, progress
        self.recipe = loaded.recipe
        self.device = resolve_device(device or self.recipe.device)
        self.store = store or RunStore(loaded.output_dir, loaded.teacher_dir)
        self.teachers, self.students = expand(loaded, registry)
        self.retry_diverged = retry_diverged
        self.checkpoint_every = checkpoint_every or self.recipe.checkpoint_every_steps
        self.make_checkpointer = checkpointer
        self.stop = stop or StopSignals()
        self.recorder = RunRecorder(loaded, registry, self.device, self.store, progress, world_size)
        self.trainer = RunTrainer(loaded, registry, self.device, self.store, progress, self.stop,
                                  self.recorder.base_record, wrap_task)
        self.queue = RunQueue(self.store, self.recorder, progress, self.stop, self._finished,
                              self.run_one, fail_fast)

    def data(self):
        return self.trainer.data()

    # ------------------------------------------------------------------ planning
    def plan(self) -> dict:
        # A teacher named by --run-id is trained even if its students are done (its record
        # was deleted: the leaderboard's teacher row needs it).
        needed = {s.teacher.id for s in self.students if s.teacher and not self._done(s)} | (self.only or set())
        return {
            "teachers": [(t, self._done(t)) for t in self.teachers],
            "teachers_needed": [t for t in self.teachers if t.id in needed and not self._done(t)],
            "students": [(s, self._done(s)) for s in self.students],
        }

    def _finished(self, status: str | None) -> bool:
        return status == "done" or (status == "diverged" and not self.retry_diverged)

    def _done(self, spec: RunSpec) -> bool:
        """Nothing to do for this run: done, or diverged (a result) unless retrying those."""
        return self._finished(self.store.status(spec.kind, spec.id))

    def todo(self) -> list[RunSpec]:
        """The runs still to do, in the order they run: teachers, then students (a teacher's
        students back to back when they share its logit cache)."""
        plan = self.plan()
        students = [s for s, done in plan["students"] if not done]
        if self.recipe.teacher_logit_cache:
            first: dict[str, int] = {}
            students.sort(key=lambda s: (first.setdefault(s.teacher.id if s.teacher else "", len(first)),
                                         s.spec["schedule"]["batch_size"]))
        todo = plan["teachers_needed"] + students
        return todo if self.only is None else [s for s in todo if s.id in self.only]

    # ------------------------------------------------------------------ running
    def run(self) -> Summary:
        summary = Summary()
        self.queue.take_snapshot(self.teachers + self.students)
        self.queue.clear_done_checkpoints([s for s in self.teachers + self.students
                                           if self.only is None or s.id in self.only],
                                          self.make_checkpointer)
        # Done before: the grid's students, or with --run-id only the runs asked for.
        summary.skipped += [s.id for s in (self.students if self.only is None else self.teachers + self.students)
                            if (self.only is None or s.id in self.only) and self._done(s)]
        todo = self.todo()
        self.progress.grid(len(todo))
        if not todo:
            return summary
        train, _ = self.data()  # dataset errors surface before any training
        check_inputs(todo, train, self.registry, self.loaded.path, self.recipe.dataset.name,
                     self.device, self.recipe.deterministic)
        with self.stop:
            self.queue.run(list(todo), summary)
        summary.signal = self.stop.signum
        return summary

    def run_one(self, spec: RunSpec, summary: Summary) -> str:
        """Train ``spec`` (this process holds its lock) and record the outcome."""
        train, _ = self.data()
        sched = spec.spec.get("schedule", {"epochs": 0, "batch_size": 1})  # none: published teacher
        self.progress.run_started(f"{spec.describe} ({spec.id})", sched["epochs"],
                                  train.num_batches(sched["batch_size"]))
        checkpointer = self.make_checkpointer(self.store.run_dir(spec.kind, spec.id), self.checkpoint_every,
                                              warn=lambda msg: self.progress.log(f"  warning: {msg}"))
        return self.recorder.run(spec, summary, checkpointer,
                                 lambda ckpt: self.trainer.train(spec, ckpt),
                                 lambda: self.trainer.resumed_from)
