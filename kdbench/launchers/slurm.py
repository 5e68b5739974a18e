"""The ``slurm`` launcher: the grid as Slurm job arrays, through submitit (``pip install
kdbench[slurm]``).

* One job per run: ``kdbench run <recipe> --launcher inline --run-id <id>`` in a child process,
  whose output goes to ``log.txt`` in the run's folder. submitit's own files (the pickled job, its
  stdout/stderr) are under ``<output>/slurm/<job id>/``.
* Two arrays: the teachers to train, then the students, which depend on the teacher array
  (``afterany``: a student whose teacher failed is then recorded as failed, with the reason, by
  the runner; ``afterok`` would leave it pending forever). ``--max-parallel N`` caps how many jobs
  of an array run at once (``slurm_array_parallelism``).
* Time limits and preemption: submitit signals the job (USR2, ``slurm_signal_delay_s`` before the
  limit) and calls :meth:`RunJob.checkpoint`, which sends SIGUSR1 to the run: it finishes its step,
  writes a checkpoint and records itself as ``interrupted``; the job is requeued and resumes from
  that checkpoint (at most ``slurm_max_num_timeout`` times, a submitit parameter).
* The per-run locks still apply, so a requeued job and another ``kdbench run`` never train one run
  twice, and submitting the same grid again only submits what is not finished.

On a real cluster the command returns once the arrays are submitted. With
``KDBENCH_SLURM_CLUSTER=local`` (or ``debug``) submitit's local executor runs the jobs on this
machine instead (for tests; no dependencies there, so the students are submitted once the
teachers are finished) and the command waits for them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kdbench.api import UserError
from kdbench.launchers import LAUNCHER_ENV, passthrough_args
from kdbench.launchers.local import FINAL, GridView

CLUSTER_ENV = "KDBENCH_SLURM_CLUSTER"  # submitit cluster: slurm (default when found), local, debug
STOP_WAIT_S = 120  # how long a signalled run may take to write its checkpoint
POLL_S = 0.2


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("the slurm launcher needs submitit: pip install 'kdbench[slurm]' "
                        "(or pip install submitit)") from None
    return submitit


def parse_params(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> submitit executor parameters (ints, floats, booleans parsed)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--slurm-param takes KEY=VALUE, got {item!r}")
        for parse in (int, float):
            try:
                value = parse(value)
                break
            except ValueError:
                pass
        else:
            value = {"true": True, "false": False}.get(value.lower(), value)
        params[key.strip()] = value
    return params


class RunJob:
    """One run of the grid as a submitit job (picklable: paths and strings only)."""

    def __init__(self, recipe: str, run_id: str, log: str, passthrough: list[str]):
        self.recipe, self.run_id, self.log, self.passthrough = recipe, run_id, log, passthrough
        self._proc = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "kdbench", "run", self.recipe, "--launcher", "inline",
                "--run-id", self.run_id, "--plain", *self.passthrough]

    def __call__(self) -> int:
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, LAUNCHER_ENV: "slurm"}
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # only checkpoint() signals it
            try:
                # Poll, not wait(): checkpoint() runs in a signal handler while this waits, and
                # a blocking wait() would hold the lock it needs to see the run stop.
                while self._proc.poll() is None:
                    time.sleep(POLL_S)
                return self._proc.returncode
            finally:
                self._proc = None

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before a time limit or on preemption: have the run write a
        checkpoint and stop, then requeue this job (the rerun resumes from that checkpoint)."""
        import submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + STOP_WAIT_S
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(POLL_S)  # (past the deadline: its last checkpoint is still good)
        return submitit.helpers.DelayedSubmission(RunJob(self.recipe, self.run_id, self.log,
                                                         self.passthrough))

    def __getstate__(self):
        return {**self.__dict__, "_proc": None}


def _submit(executor, jobs: list[RunJob]) -> list:
    if not jobs:
        return []
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    return submitted


def run_slurm(loaded, registry, args) -> int:
    submitit = _submitit()
    view = GridView(loaded, registry, args.retry_diverged, args.run_id)
    if not view.specs:
        print(f"kdbench: nothing to train; results in {loaded.output_dir}", file=sys.stderr)
        return 0
    if args.max_parallel is not None and args.max_parallel <= 0:
        raise UserError(f"--max-parallel must be a positive number, got {args.max_parallel}")
    folder = loaded.output_dir / "slurm"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=os.environ.get(CLUSTER_ENV))
    params = {"name": f"kdbench-{loaded.path.stem}", **parse_params(args.slurm_param)}
    if args.max_parallel:
        params["slurm_array_parallelism"] = args.max_parallel
    executor.update_parameters(**params)
    passthrough = passthrough_args(args)

    def jobs(kind: str) -> list[RunJob]:
        return [RunJob(str(loaded.path.resolve()), s.id,
                       str(view.store.run_dir(s.kind, s.id).resolve() / "log.txt"), passthrough)
                for s in view.specs if s.kind == kind]

    on_slurm = executor.cluster == "slurm"
    teachers = _submit(executor, jobs("teacher"))
    if teachers and on_slurm:
        array_ids = sorted({j.job_id.split("_")[0] for j in teachers})
        executor.update_parameters(slurm_additional_parameters={"dependency": "afterany:" + ":".join(array_ids)})
    elif teachers:
        for job in teachers:  # no dependencies outside Slurm: wait here
            job.wait()
    students = _submit(executor, jobs("student"))
    print(f"kdbench: submitted {len(teachers)} teacher job(s) and {len(students)} student job(s) "
          f"({executor.cluster}); submitit files in {folder}, each run's log in its folder",
          file=sys.stderr)
    for label, submitted in (("teachers", teachers), ("students", students)):
        if submitted:
            print(f"  {label}: job {submitted[0].job_id.split('_')[0]}", file=sys.stderr)
    if on_slurm:
        print("kdbench: when the jobs are done, `kdbench leaderboard` the output folder; "
              "submitting the same command again resubmits only what is not finished", file=sys.stderr)
        return 0
    for job in students:
        job.wait()
    counts: dict[str, int] = {}
    for spec in view.specs:
        status = view.status(spec) or "not finished"
        counts[status] = counts.get(status, 0) + 1
    print("kdbench: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f"; results in {loaded.output_dir}", file=sys.stderr)
    unfinished = sum(n for s, n in counts.items() if s not in FINAL)
    return 1 if unfinished or counts.get("failed") else 0
