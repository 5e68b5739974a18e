"""Runs a recipe's grid: teachers first (each once, cached by id), then the students.

Nothing here knows a method, objective, model or dataset by name: everything is looked up in
the registry from the run specs produced by :func:`kdbench.recipe.expand`.

Reliability rules:

* Every run checkpoints (every epoch, and every ``checkpoint_every_steps`` steps if set) and a
  rerun of the same command continues an unfinished run exactly where its last checkpoint left
  off (see :mod:`kdbench.engine.checkpoint`). Checkpoints are deleted once the final record is
  written; those of failed and interrupted runs are kept, so their retry resumes.
* What a rerun does with each record status: ``done`` is skipped; ``diverged`` (NaN/inf loss) is
  a result and is kept unless ``retry_diverged``; ``failed`` (an exception) and ``interrupted``
  (SIGTERM, SIGINT or SIGUSR1) are run again (resuming from their checkpoint).
* A failing run does not stop the grid (unless ``fail_fast``); a student whose teacher failed or
  diverged is recorded as failed with that reason.
* SIGTERM/SIGINT/SIGUSR1 let the current step finish, write a checkpoint, record the run as
  ``interrupted`` and stop the grid (the CLI then exits 128 + signal number). A second signal
  stops the process at once (the last checkpoint is still good).
* Each run is trained under a lock (:mod:`kdbench.engine.locks`), so several processes can work
  on one grid: a run locked by another process is left to it and retried later; a student whose
  teacher another process is training waits for it (other work first, then with a message).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kdbench.api import MethodSetup, ModelOutput, ObjectiveSetup, UserError
from kdbench.data.augment import num_crop_flip_codes
from kdbench.data.loader import DeviceData, subset_per_class
from kdbench.diagnostics import teacher_diagnostics
from kdbench.engine.checkpoint import Checkpointer
from kdbench.engine.locks import RunLock
from kdbench.engine.loop import Diverged, Interrupted, autocast, autocast_dtype, evaluate, fit
from kdbench.engine.teacher_cache import TeacherLogitCache
from kdbench.recipe import LoadedRecipe, RunSpec, expand
from kdbench.registry import Registry
from kdbench.store import RunStore, atomic_write_bytes, provenance

WAIT_POLL_S = 2.0  # how often a process waiting for another one's run looks again


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device {name!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but no CUDA device is available; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA "
                            "device(s) exist")
    elif device.type != "cpu":
        raise UserError(f"device {name!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device
    if deterministic:
        # cuBLAS is only deterministic with a fixed workspace; read when cuBLAS initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def weights_sha256(state_dict: dict) -> str:
    """A fingerprint of the exact weights (names, dtypes, shapes and bytes), for the record:
    two runs with the same fingerprint ended with bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(state_dict[name].shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    """One forward of each net per view; every method of the set shares those outputs. With a
    teacher logit cache (:mod:`kdbench.engine.teacher_cache`) the teacher's logits of view 0 come
    from the cache, filled at the start of each epoch from the epoch's planned draws."""

    def __init__(self, student, teacher, methods: list[tuple[str, float, nn.Module]]):
        self.student, self.teacher, self.methods = student, teacher, methods
        self.views = tuple(dict.fromkeys(v for _, _, m in methods for v in m.views))
        # One mode for the whole set: a set mixing OFD (train-mode teacher, as its reference
        # code) with other methods gives them train-mode teacher outputs too.
        self.teacher_train_mode = any(m.teacher_train_mode for _, _, m in methods)
        if teacher is not None:
            teacher.train(self.teacher_train_mode)  # once: nothing else changes the teacher's mode
        self.logit_cache = None
        self.plans_epochs = False  # fit() plans each epoch ahead and calls start_epoch(plan)

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
        s_out = self.student(batch.x)
        if self.logit_cache is not None:
            t_out = ModelOutput(self.logit_cache.logits(batch.index, batch.view_code), [], [], None)
        else:
            t_out = self._teacher(batch.x)
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
# Stop signals
# ------------------------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """While active, SIGTERM/SIGINT/SIGUSR1 only set ``signum`` (the training loop polls it after
    each step); a second one restores the default action and re-sends itself (stops at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __call__(self) -> int | None:
        return self.signum

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\nkdbench: got {signal.Signals(signum).name}: finishing the current step, then "
              "writing a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before (or by another process)
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    signal: int | None = None  # the stop signal that ended the grid, if one did


class GridRunner:
    only: set[str] | None = None  # train only these run ids of the grid (kdbench run --run-id)

    def __init__(self, loaded: LoadedRecipe, registry: Registry, progress, device: str | None = None,
                 fail_fast: bool = False, checkpoint_every: int | None = None,
                 retry_diverged: bool = False):
        self.loaded, self.registry, self.progress = loaded, registry, progress
        self.recipe = loaded.recipe
        self.device = resolve_device(device or self.recipe.device)
        self.store = RunStore(loaded.output_dir, loaded.teacher_dir)
        self.teachers, self.students = expand(loaded, registry)
        self.fail_fast = fail_fast
        self.retry_diverged = retry_diverged
        self.checkpoint_every = checkpoint_every or getattr(self.recipe, "checkpoint_every_steps", None)
        self._data: tuple[DeviceData, DeviceData] | None = None
        self._stop = StopSignals()
        self._snapshot: dict[str, object] = {}
        self._trained_by: dict | None = None  # who trains the current run (for its record)
        self.attempted: dict[str, str] = {}  # run id -> its outcome in this process
        self._pending_teachers: set[str] = set()  # teachers of our queue not attempted yet
        self._busy: dict[str, str] = {}  # run id -> why it had to wait
        self._logit_cache: tuple[tuple, TeacherLogitCache] | None = None  # the current teacher's

    # ------------------------------------------------------------------ planning
    def plan(self) -> dict:
        needed = {s.teacher.id for s in self.students if s.teacher and not self._done(s)}
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

    def check_inputs(self, specs: list[RunSpec]) -> None:
        """Every model to train takes the dataset's images: its declared ``input_size`` (if the
        model has one: an int or (height, width)) matches, and a forward of two images works.
        Problems are UserErrors, raised before any training."""
        train, _ = self.data()
        c, h, w = (int(v) for v in train.images.shape[1:])
        seed_everything(0, self.recipe.deterministic)  # each run seeds again; this sets the mode
        checked = set()
        for spec in specs:
            model_spec = spec.spec["model"]
            key = json.dumps(model_spec, sort_keys=True, default=str)
            if key in checked:
                continue
            checked.add(key)
            role = (f"teacher of pair {spec.meta.get('pair')!r}" if spec.kind == "teacher"
                    else f"student of pair {spec.meta.get('pair')!r}")
            fields = self.registry.find("model", model_spec["name"]).params.model_fields
            defaults = {f.alias or k: f.get_default(call_default_factory=True)
                        for k, f in fields.items()}
            params = ", ".join(f"{k}={v!r}" for k, v in (model_spec.get("params") or {}).items()
                               if defaults.get(k, object()) != v)  # what the recipe set
            where = (f"{self.loaded.path}: {role}: model {model_spec['name']!r}"
                     + (f" ({params})" if params else ""))
            model = build_model(self.registry, model_spec, train.num_classes)
            size = getattr(model, "input_size", None)
            if size is not None:
                size = (size, size) if isinstance(size, int) else tuple(size)
                if size != (h, w):
                    raise UserError(f"{where} takes {size[0]}x{size[1]} images, but the dataset "
                                    f"{self.recipe.dataset.name!r} has {h}x{w} images; pair it with "
                                    "a dataset of that size or choose a model for this one")
            try:
                dummy_forward(model.to(self.device), train)
            except Exception as exc:
                msg = " ".join(str(exc).split())[:300].rstrip(".")
                raise UserError(f"{where} cannot take the dataset's images ({c} channels, {h}x{w}): "
                                f"{type(exc).__name__}: {msg}; choose a model or dataset that fit "
                                "together") from None
            if self.recipe.deterministic:
                self._check_deterministic(model, train, where)
            del model

    def _check_deterministic(self, model: nn.Module, train: DeviceData, where: str) -> None:
        """With deterministic = true, an op without a deterministic implementation raises at
        its first use (on CUDA e.g. the backward of non-global adaptive pooling or of upsampling):
        find that out for the model before training, with one forward and backward of two
        images. Ops used only by a method are not covered: they fail the run, with the op named."""
        model.train()
        try:
            model(train.normalize(train.images[:2])).logits.float().sum().backward()
        except Exception as exc:
            text = " ".join(str(exc).split())
            if "deterministic" in text:
                raise UserError(f"{where}: deterministic = true, but {text.split('. ')[0]} on "
                                f"{self.device}; set deterministic = false in the recipe (or "
                                "train on the CPU)") from None
            raise UserError(f"{where} cannot train on the dataset's images: "
                            f"{type(exc).__name__}: {text[:300]}") from None

    # ------------------------------------------------------------------ running
    def run(self) -> Summary:
        summary = Summary()
        # What each record looked like before we planned (taken first, so that a run finished
        # by another process in between is noticed): a change means another process ran it.
        self._snapshot = {s.id: self._record_key(s) for s in self.teachers + self.students}
        plan = self.plan()
        todo_students = [s for s, done in plan["students"] if not done]
        if self.recipe.teacher_logit_cache:  # students of a teacher back to back share its cache
            first: dict[str, int] = {}
            todo_students.sort(key=lambda s: (first.setdefault(s.teacher.id if s.teacher else "", len(first)),
                                              s.spec["schedule"]["batch_size"]))
        summary.skipped += [s.id for s, done in plan["students"] if done]
        todo = plan["teachers_needed"] + todo_students
        if self.only is not None:
            todo = [s for s in todo if s.id in self.only]
        self.progress.grid(len(todo))
        if not todo:
            return summary
        self.data()  # dataset errors surface before any training
        self.check_inputs(todo)
        self._pending_teachers = {s.id for s in todo if s.kind == "teacher"}
        with self._stop:
            self._run_queue(list(todo), summary)
        summary.signal = self._stop.signum
        return summary

    def _run_queue(self, todo: list[RunSpec], summary: Summary) -> None:
        announced: set[str] = set()
        while todo:
            busy = []
            for spec in todo:
                if self._stop.signum is not None:
                    return
                outcome = self._attempt(spec, summary)
                if outcome != "busy":
                    self._pending_teachers.discard(spec.id)
                    self.attempted.setdefault(spec.id, outcome)
                if outcome == "busy":
                    busy.append(spec)
                elif outcome == "failed" and self.fail_fast:
                    return
            if busy and len(busy) == len(todo):  # nothing else to do: wait for the others
                waiting = [f"{s.id} ({self._busy[s.id]})" for s in busy if s.id not in announced]
                if waiting:
                    self.progress.log(f"waiting for {len(busy)} run(s) held up by other processes: "
                                      + ", ".join(waiting))
                    announced.update(s.id for s in busy)
                time.sleep(WAIT_POLL_S)
                if self._stop.signum is not None:
                    return
            todo = busy

    def _lock(self, spec: RunSpec) -> RunLock:
        return RunLock(self.store.run_dir(spec.kind, spec.id))

    def _record_key(self, spec: RunSpec):
        rec = self.store.record(spec.kind, spec.id) or {}
        return (self.store.status(spec.kind, spec.id),
                json.dumps(rec.get("trained_by"), sort_keys=True, default=str))

    def _attempt(self, spec: RunSpec, summary: Summary) -> str:
        """Run ``spec`` unless another process holds it: 'busy', or the run's outcome."""
        if spec.teacher is not None and self.store.status("teacher", spec.teacher.id) != "done":
            t = spec.teacher
            outcome = self.attempted.get(t.id)  # what became of it in this process, if tried
            if outcome is None and t.id in self._pending_teachers:
                self._busy[spec.id] = f"its teacher {t.id} is not trained yet"
                return "busy"  # we train it first (or wait for the process that trains it)
            if outcome is None and self._locked(t):
                self._busy[spec.id] = f"its teacher {t.id} is being trained by {self._lock(t).holder()}"
                return "busy"
            reason = outcome or self.store.status("teacher", t.id) or "not trained"
            hint = " (rerun with --retry-diverged to train it again)" if reason == "diverged" else ""
            self._record_failure(spec, f"teacher {t.id} {reason}{hint}", summary, started=False)
            return "failed"
        lock = self._lock(spec)
        if not lock.try_acquire():
            self._busy[spec.id] = f"being trained by {lock.holder()}"
            return "busy"
        with lock:
            # Someone else may have run it since we planned: then it is theirs.
            key = self._record_key(spec)
            status = key[0]
            by_other = key != self._snapshot.get(spec.id)
            if self._finished(status) or (by_other and status in ("diverged", "failed")):
                self.progress.log(f"{spec.describe} ({spec.id}): {status} by another process")
                (summary.skipped if status == "done" else
                 summary.diverged if status == "diverged" else summary.failed).append(spec.id)
                return status
            return self._run_one(spec, summary)

    def _locked(self, spec: RunSpec) -> bool:
        lock = self._lock(spec)
        if lock.try_acquire():
            lock.release()
            return False
        return True

    def _run_one(self, spec: RunSpec, summary: Summary) -> str:
        train, test = self.data()
        sched = spec.spec.get("schedule", {"epochs": 0, "batch_size": 1})  # none: published teacher
        self.progress.run_started(f"{spec.describe} ({spec.id})", sched["epochs"],
                                  train.num_batches(sched["batch_size"]))
        prev = self.store.record(spec.kind, spec.id) or {}
        self._trained_by = {"pid": os.getpid(), "host": socket.gethostname(),
                            "attempt": int((prev.get("trained_by") or {}).get("attempt", 0)) + 1,
                            "resumed_from": None,
                            "launcher": os.environ.get("KDBENCH_LAUNCHER", "inline")}
        checkpointer = Checkpointer(self.store.run_dir(spec.kind, spec.id), self.checkpoint_every,
                                    warn=lambda msg: self.progress.log(f"  warning: {msg}"))
        try:
            return self._train_and_record(spec, summary, checkpointer)
        finally:
            self._trained_by = None

    def _train_and_record(self, spec: RunSpec, summary: Summary, checkpointer: Checkpointer) -> str:
        t0 = time.perf_counter()
        try:
            record = (self._train_teacher if spec.kind == "teacher" else self._train_student)(spec, checkpointer)
        except Diverged as exc:
            record = self._base_record(spec, "diverged")
            record["diverged"] = {"epoch": exc.epoch + 1, "step": exc.step, "terms": exc.terms}
            self.store.write_record(spec.kind, spec.id, record)
            checkpointer.clear()
            summary.diverged.append(spec.id)
            self.progress.run_done("diverged", str(exc))
            return "diverged"
        except Interrupted as exc:
            record = self._base_record(spec, "interrupted")
            record["interrupted"] = {"signal": signal.Signals(exc.signum).name,
                                     "epoch": exc.epoch + 1, "step": exc.step}
            self.store.write_record(spec.kind, spec.id, record)
            summary.interrupted.append(spec.id)
            self.progress.run_done("interrupted", f"at step {exc.step}; checkpoint in "
                                   f"{checkpointer.dir}")
            return "interrupted"
        except (KeyboardInterrupt, UserError):
            raise
        except Exception:
            self._record_failure(spec, traceback.format_exc(), summary)
            return "failed"
        record["wall_time_s"] = time.perf_counter() - t0
        self.store.write_record(spec.kind, spec.id, record)
        checkpointer.clear()  # the record is final: the checkpoints are not needed any more
        summary.done.append(spec.id)
        self.progress.run_done("done", f"top1={record['final']['top1']:.2f}")
        return "done"

    def _record_failure(self, spec: RunSpec, tb: str, summary: Summary, started: bool = True) -> None:
        run_dir = self.store.run_dir(spec.kind, spec.id)
        atomic_write_bytes(run_dir / "error.txt", tb.encode())
        record = self._base_record(spec, "failed")
        record["error"] = tb.strip().splitlines()[-1]
        self.store.write_record(spec.kind, spec.id, record)
        summary.failed.append(spec.id)
        if not started:
            self.progress.log(f"{spec.describe} ({spec.id}): FAILED {record['error']}")
            return
        self.progress.run_done("FAILED", f"{record['error']} (traceback: {run_dir / 'error.txt'})")

    def _base_record(self, spec: RunSpec, status: str) -> dict:
        return {"id": spec.id, "kind": spec.kind, "status": status, "spec": spec.spec,
                "meta": spec.meta, "teacher_id": spec.teacher.id if spec.teacher else None,
                "recipe": str(self.loaded.path), "report": self.recipe.report,
                "deterministic": self.recipe.deterministic,  # applied by seed_everything
                "trained_by": self._trained_by,
                "provenance": provenance(self.device, self.registry.versions())}

    def _fit(self, task, spec: RunSpec, checkpointer: Checkpointer):
        train, test = self.data()
        from kdbench.recipe import Schedule

        result = fit(task, Schedule(**spec.spec["schedule"]), train, test, self.device,
                     self.recipe.precision, data_generator(spec.spec["seed"], self.device),
                     self.progress, self.recipe.eval_batch_size, checkpointer=checkpointer,
                     stop_requested=self._stop)
        self._trained_by["resumed_from"] = result.resumed_from
        return result

    def _build(self, model_spec: dict) -> nn.Module:
        """A model on the training device; channels_last on CUDA (faster convolutions with
        cuDNN, and the device data is laid out to match); compiled if the recipe asks."""
        train, _ = self.data()
        model = build_model(self.registry, model_spec, train.num_classes).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if self.recipe.compile:
            model.compile()  # in place: state_dict keys stay those of the plain model
        return model

    def _published_teacher(self, spec: RunSpec) -> dict:
        """A teacher loaded from a checkpoint file: nothing is trained; its accuracy is measured
        here, not taken from the file."""
        from kdbench.published import checkpoint_metadata, load_published_teacher

        _, test = self.data()
        model = self._build(spec.spec["model"])
        path = spec.spec["checkpoint"]["path"]
        load_published_teacher(path, model)
        metrics = evaluate(model, test, self.recipe.eval_batch_size, self.device, self.recipe.precision)
        result = {"top1": metrics["test_top1"], "top5": metrics["test_top5"], "epoch": 0}
        record = self._finished_teacher(spec, model, epochs=[], final=result, best=result)
        record["published"] = checkpoint_metadata(path)
        return record

    def _finished_teacher(self, spec: RunSpec, model: nn.Module, **results) -> dict:
        """Save a finished teacher's weights; its record, with the soft-label diagnostics."""
        _, test = self.data()
        self.store.save_weights(spec.id, model.state_dict())
        record = self._base_record(spec, "done")
        record.update(**results, weights_sha256=weights_sha256(model.state_dict()))
        with autocast(self.device, self.recipe.precision):
            record["diagnostics"] = teacher_diagnostics(
                model, test.eval_batches(self.recipe.eval_batch_size),
                temperature=self.recipe.diagnostics_temperature)
        return record

    def teacher_task(self, spec: RunSpec) -> TeacherTask:
        """The teacher and its objective, built as training uses them (also for calibration)."""
        train, _ = self.data()
        model = self._build(spec.spec["model"])
        obj = spec.spec["objective"]
        plugin = self.registry.find("teacher_objective", obj["name"])
        setup = ObjectiveSetup(model=model, model_out=dummy_forward(model, train),
                               num_classes=train.num_classes, num_train_samples=len(train),
                               image_size=int(train.images.shape[-1]), device=self.device)
        objective = plugin.factory(plugin.params.model_validate(obj["params"]), setup).to(self.device)
        return TeacherTask(model, objective)

    def student_task(self, spec: RunSpec, teacher: nn.Module | None) -> StudentTask:
        """The student, its methods (built from the real shapes) and the frozen teacher."""
        train, _ = self.data()
        student = self._build(spec.spec["model"])
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
        return StudentTask(student, teacher, methods)

    def _train_teacher(self, spec: RunSpec, checkpointer: Checkpointer) -> dict:
        if "checkpoint" in spec.spec:
            return self._published_teacher(spec)
        seed_everything(spec.spec["seed"], self.recipe.deterministic)
        task = self.teacher_task(spec)
        result = self._fit(task, spec, checkpointer)
        return self._finished_teacher(spec, task.model, epochs=result.epochs, final=result.final,
                                      best=result.best)

    def load_teacher(self, spec: RunSpec) -> nn.Module:
        model = self._build(spec.spec["model"])
        model.load_state_dict(self.store.load_weights(spec.id, self.device))
        model.eval()
        model.requires_grad_(False)
        return model

    def _train_student(self, spec: RunSpec, checkpointer: Checkpointer) -> dict:
        teacher = self.load_teacher(spec.teacher) if spec.teacher else None
        seed_everything(spec.spec["seed"], self.recipe.deterministic)
        task = self.student_task(spec, teacher)
        # After student_task (the methods' sizing forward ran in fp32). Not with compile: the
        # check's extra graphs would use up dynamo's recompile budget of the shared forward.
        cast = (teacher is not None and not self.recipe.compile
                and cast_teacher_once(teacher, self.data()[0], self.device, self.recipe.precision))
        cache_report = self._attach_logit_cache(spec, task)
        student = task.student
        try:
            result = self._fit(task, spec, checkpointer)
        finally:
            if self._logit_cache is not None:
                self._logit_cache[1].teacher = None  # the table stays; this teacher can go
        record = self._base_record(spec, "done")
        record.update(epochs=result.epochs, final=result.final, best=result.best,
                      weights_sha256=weights_sha256(student.state_dict()))
        if teacher is not None:
            record["teacher_cast_once"] = bool(cast)
        if cache_report is not None:
            record["teacher_logit_cache"] = cache_report()
        if spec.teacher is not None:
            trec = self.store.record("teacher", spec.teacher.id) or {}
            record["teacher_final"] = trec.get("final")
        return record

    def _attach_logit_cache(self, spec: RunSpec, task: StudentTask):
        """Give ``task`` the teacher logit cache if the recipe asks for it and the method set
        allows it. One table is kept: that of the current student's teacher (and batch size);
        a student of another teacher frees it. Returns a callable giving the record's
        ``teacher_logit_cache`` entry, or None."""
        if not self.recipe.teacher_logit_cache or spec.teacher is None:
            return None
        batch_size = spec.spec["schedule"]["batch_size"]
        key = (spec.teacher.id, batch_size)  # chunks have the step's batch shape
        shared = self._logit_cache is not None and self._logit_cache[0] == key
        if not shared:
            self._logit_cache = None  # free the previous teacher's table first
        blocker = task.logit_cache_blocker()
        if blocker is None and not shared:
            train, _ = self.data()
            dtype = autocast_dtype(self.device, self.recipe.precision) or torch.float32
            try:
                cache = TeacherLogitCache(train, train.num_classes, dtype, batch_size,
                                          lambda: autocast(self.device, self.recipe.precision))
                self._logit_cache = (key, cache)
            except (torch.OutOfMemoryError, RuntimeError) as exc:  # the CPU's is a RuntimeError
                if not isinstance(exc, torch.OutOfMemoryError) and "alloc" not in str(exc):
                    raise
                size = num_crop_flip_codes() * len(train) * train.num_classes * dtype.itemsize
                blocker = f"no room on {self.device} for the table ({size / 2**30:.1f} GiB)"
        if blocker is not None:
            return lambda: {"used": False, "why_not": blocker}
        cache = self._logit_cache[1]
        cache.teacher = task.teacher  # the same weights, loaded for this student
        before = cache.stats()
        task.use_logit_cache(cache)

        def report() -> dict:
            after = cache.stats()
            computed = after["entries_computed"] - before["entries_computed"]
            served = after["entries_served"] - before["entries_served"]
            return {"used": True, "shared_with_earlier_student": shared, "table_bytes": cache.nbytes,
                    "entries_computed": computed, "entries_served": served,
                    "teacher_forwards_saved": round(1 - computed / served, 6) if served else 0.0}
        return report
