"""The queue of runs one process works through, shared with other processes by per-run locks.

Each run is trained under a lock (:mod:`kdbench.engine.locks`), so several processes can work on
one grid: a run locked by another process is left to it and retried later; a student whose
teacher another process is training waits for it (other work first, then with a message). A
run that another process finished since this one planned is that process's result: it is
counted, never trained again. A student whose teacher failed or diverged is recorded as failed
with that reason.
"""
from __future__ import annotations

import json
import time
from typing import Callable

from kdbench.engine.locks import RunLock
from kdbench.engine.recorder import RunRecorder, Summary
from kdbench.store import StoreError

WAIT_POLL_S = 2.0  # how often a process waiting for another one's run looks again


class RunQueue:
    def __init__(self, store, recorder: RunRecorder, progress, stop, finished: Callable[[str | None], bool],
                 run_one: Callable, fail_fast: bool = False):
        """``finished(status)``: whether a record of that status needs no training;
        ``run_one(spec, summary)``: trains a run this process holds the lock of."""
        self.store, self.recorder, self.progress, self.stop = store, recorder, progress, stop
        self.finished, self.run_one, self.fail_fast = finished, run_one, fail_fast
        self.snapshot: dict[str, object] = {}
        self.attempted: dict[str, str] = {}  # run id -> its outcome in this process
        self.pending_teachers: set[str] = set()  # teachers of our queue not attempted yet
        self.busy: dict[str, str] = {}  # run id -> why it had to wait

    def take_snapshot(self, specs) -> None:
        """What each record looked like before planning (taken first, so that a run finished by
        another process in between is noticed): a change means another process ran it."""
        self.snapshot = {s.id: self.record_key(s) for s in specs}

    def record_key(self, spec):
        rec = self.store.record(spec.kind, spec.id) or {}
        return (self.store.status(spec.kind, spec.id),
                json.dumps(rec.get("trained_by"), sort_keys=True, default=str))

    def lock(self, spec) -> RunLock:
        return RunLock(self.store.run_dir(spec.kind, spec.id))

    def locked(self, spec) -> bool:
        lock = self.lock(spec)
        if lock.try_acquire():
            lock.release()
            return False
        return True

    def clear_done_checkpoints(self, specs, make_checkpointer) -> None:
        """Delete leftover checkpoints of runs whose final record is written (done or diverged):
        a kill between that write and the deletion leaves them, and nothing else would remove
        them. Under each run's lock (a run another process holds is left alone)."""
        for spec in specs:
            if self.store.status(spec.kind, spec.id) not in ("done", "diverged"):
                continue
            ckpt = make_checkpointer(self.store.run_dir(spec.kind, spec.id))
            if not ckpt.has_checkpoints():
                continue
            lock = self.lock(spec)
            try:
                held = lock.try_acquire()
            except StoreError:  # a read-only teacher cache: its leftovers are not ours to tidy
                continue
            if held:
                with lock:
                    if self.store.status(spec.kind, spec.id) in ("done", "diverged"):
                        ckpt.clear()
                        self.progress.log(f"{spec.describe} ({spec.id}): removed the checkpoints "
                                          "left behind after its final record")

    def run(self, todo: list, summary: Summary) -> None:
        """Work through ``todo`` until every run is attempted (or a stop signal arrives)."""
        self.pending_teachers = {s.id for s in todo if s.kind == "teacher"}
        announced: set[str] = set()
        while todo:
            busy = []
            for spec in todo:
                if self.stop.signum is not None:
                    return
                outcome = self.attempt(spec, summary)
                if outcome != "busy":
                    self.pending_teachers.discard(spec.id)
                    self.attempted.setdefault(spec.id, outcome)
                if outcome == "busy":
                    busy.append(spec)
                elif outcome == "failed" and self.fail_fast:
                    return
            if busy and len(busy) == len(todo):  # nothing else to do: wait for the others
                waiting = [f"{s.id} ({self.busy[s.id]})" for s in busy if s.id not in announced]
                if waiting:
                    self.progress.log(f"waiting for {len(busy)} run(s) held up by other processes: "
                                      + ", ".join(waiting))
                    announced.update(s.id for s in busy)
                time.sleep(WAIT_POLL_S)
                if self.stop.signum is not None:
                    return
            todo = busy

    def attempt(self, spec, summary: Summary) -> str:
        """Run ``spec`` unless another process holds it: 'busy', or the run's outcome."""
        if spec.teacher is not None and self.store.status("teacher", spec.teacher.id) != "done":
            t = spec.teacher
            outcome = self.attempted.get(t.id)  # what became of it in this process, if tried
            if outcome is None and t.id in self.pending_teachers:
                self.busy[spec.id] = f"its teacher {t.id} is not trained yet"
                return "busy"  # we train it first (or wait for the process that trains it)
            if outcome is None and self.locked(t):
                self.busy[spec.id] = f"its teacher {t.id} is being trained by {self.lock(t).holder()}"
                return "busy"
            reason = outcome or self.store.status("teacher", t.id) or "not trained"
            hint = " (rerun with --retry-diverged to train it again)" if reason == "diverged" else ""
            self.recorder.record_failure(spec, f"teacher {t.id} {reason}{hint}", summary, started=False)
            return "failed"
        lock = self.lock(spec)
        if not lock.try_acquire():
            self.busy[spec.id] = f"being trained by {lock.holder()}"
            return "busy"
        with lock:
            # Someone else may have run it since we planned: then it is theirs.
            key = self.record_key(spec)
            status = key[0]
            by_other = key != self.snapshot.get(spec.id)
            if self.finished(status) or (by_other and status in ("diverged", "failed")):
                self.progress.log(f"{spec.describe} ({spec.id}): {status} by another process")
                (summary.skipped if status == "done" else
                 summary.diverged if status == "diverged" else summary.failed).append(spec.id)
                return status
            self.prepare(spec)
            return self.run_one(spec, summary)

    def prepare(self, spec) -> None:
        """Before training a run whose lock we hold: move its bad files aside (a record that
        cannot be used, a teacher's weights that are not the recorded ones), delete temp files
        of writes killed half-way, and count the attempt (persisted: a killed attempt writes
        no record)."""
        bad = self.store.set_aside_bad_files(spec.kind, spec.id)
        if bad:
            why, moved = bad
            self.progress.log(f"{spec.describe} ({spec.id}): {why}; kept as "
                              f"{', '.join(p.name for p in moved)}; training it again")
        self.store.remove_stale_temp_files(spec.kind, spec.id)
        self.store.start_attempt(spec.kind, spec.id)
