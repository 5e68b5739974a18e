"""A run's outcome, recorded: done, diverged, interrupted or failed.

:meth:`RunRecorder.run` trains one run (a callable given the run's checkpointer) and writes the
record whatever happens: the finished record (then deletes the checkpoints: they are not needed
any more), a ``diverged`` record with the epoch and step of the first non-finite loss, an
``interrupted`` record (its checkpoint stays for the resume), or a ``failed`` record with the
traceback in ``error.txt``. Every record starts with :meth:`base_record`: the spec, labels,
who trained it (``trained_by``) and provenance.
"""
from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from kdbench.api import UserError
from kdbench.engine.checkpoint import Checkpointer
from kdbench.engine.loop import Diverged, Interrupted
from kdbench.store import atomic_write_bytes, git_state, provenance


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before (or by another process)
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    signal: int | None = None  # the stop signal that ended the grid, if one did


class RunRecorder:
    def __init__(self, loaded, registry, device, store, progress, world_size: int = 1):
        self.loaded, self.registry, self.device = loaded, registry, device
        self.store, self.progress, self.world_size = store, progress, world_size
        self.trained_by: dict | None = None  # who trains the current run (for its record)
        git_state()  # the code this process starts with is what its records name

    def base_record(self, spec, status: str) -> dict:
        recipe = self.loaded.recipe
        return {"id": spec.id, "kind": spec.kind, "status": status, "spec": spec.spec,
                "meta": spec.meta_dict(), "teacher_id": spec.teacher.id if spec.teacher else None,
                "recipe": str(self.loaded.path), "report": recipe.report,
                "deterministic": recipe.deterministic,  # applied by seed_everything
                "trained_by": self.trained_by,
                "provenance": provenance(self.device, self.registry.versions())}

    def run(self, spec, summary: Summary, checkpointer: Checkpointer,
            train: Callable[[Checkpointer], dict], resumed_from: Callable[[], dict | None]) -> str:
        """Train ``spec`` with ``train(checkpointer)`` and record the outcome; the status."""
        prev = self.store.record(spec.kind, spec.id) or {}
        # Attempts: one more than the last record's, or the persisted count of starts
        # (RunQueue.prepare), which also counts attempts killed before they wrote a record.
        attempt = max(int((prev.get("trained_by") or {}).get("attempt", 0)) + 1,
                      self.store.attempts(spec.kind, spec.id))
        self.trained_by = {"pid": os.getpid(), "host": socket.gethostname(),
                           "attempt": attempt,
                           "resumed_from": None,
                           "launcher": os.environ.get("KDBENCH_LAUNCHER", "inline")}
        if self.world_size > 1:
            self.trained_by["world_size"] = self.world_size
        if self.trained_by["launcher"] == "slurm":  # Slurm's restart count, every attempt's job
            from kdbench.launchers.slurm import attempt_info

            self.trained_by.update(attempt_info(prev.get("trained_by"), self.trained_by["attempt"]))
        t0 = time.perf_counter()
        try:
            record = train(checkpointer)
            # The record holds this same dict: it learns where the run resumed from.
            self.trained_by["resumed_from"] = resumed_from()
            return self._done(spec, record, t0, summary, checkpointer)
        except Diverged as exc:
            record = self.base_record(spec, "diverged")
            record["diverged"] = {"epoch": exc.epoch + 1, "step": exc.step, "terms": exc.terms}
            self.store.write_record(spec.kind, spec.id, record)
            checkpointer.clear()
            summary.diverged.append(spec.id)
            self.progress.run_done("diverged", str(exc))
            return "diverged"
        except Interrupted as exc:
            record = self.base_record(spec, "interrupted")
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
            self.record_failure(spec, traceback.format_exc(), summary)
            return "failed"
        finally:
            self.trained_by = None

    def _done(self, spec, record: dict, t0: float, summary: Summary, checkpointer: Checkpointer) -> str:
        record["wall_time_s"] = time.perf_counter() - t0
        self.store.write_record(spec.kind, spec.id, record)
        checkpointer.clear()  # the record is final: the checkpoints are not needed any more
        summary.done.append(spec.id)
        self.progress.run_done("done", f"top1={record['final']['top1']:.2f}")
        return "done"

    def record_failure(self, spec, tb: str, summary: Summary, started: bool = True) -> None:
        run_dir = self.store.run_dir(spec.kind, spec.id)
        atomic_write_bytes(run_dir / "error.txt", tb.encode())
        record = self.base_record(spec, "failed")
        record["error"] = tb.strip().splitlines()[-1]
        self.store.write_record(spec.kind, spec.id, record)
        summary.failed.append(spec.id)
        if not started:
            self.progress.log(f"{spec.describe} ({spec.id}): FAILED {record['error']}")
            return
        self.progress.run_done("FAILED", f"{record['error']} (traceback: {run_dir / 'error.txt'})")
