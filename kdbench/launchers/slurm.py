"""The ``slurm`` launcher: the grid as Slurm job arrays, through submitit (``pip install
kdbench[slurm]``).

* One job per run: ``kdbench run <recipe> --launcher inline --run-id <id>`` in a child process
  of submitit's task, whose output goes to ``log.txt`` in the run's folder. submitit's own files
  (the pickled job, its stdout/stderr) are under ``<output>/slurm/<job id>/``, and which job
  trains which run under ``<output>/slurm/jobs/``.
* Two arrays: the teachers to train, then the students, which depend on the teacher array
  (``afterany``: a student whose teacher failed is then recorded as failed, with the reason, by
  the runner; ``afterok`` would leave it pending forever). ``--max-parallel N`` caps how many jobs
  of an array run at once (``slurm_array_parallelism``).
* Time limits and preemption. Slurm sends its signal (submitit asks for USR2,
  ``slurm_signal_delay_s`` before the limit; a site may use USR1; TERM at the end or on
  preemption) to every process of the job step, the run included, and ``scancel --batch`` sends
  one to the job's script only, which passes it on to the step (the ``srun`` shell function in
  :data:`FORWARD_SETUP`). The run finishes its step, writes a checkpoint and records itself as
  ``interrupted`` (:mod:`kdbench.engine.signals`: a repeated signal does not stop it at once
  here). :class:`RunJob` then decides from the run's record: a finished run (the signal came
  too late) ends the job COMPLETED; after USR1/USR2 the job is requeued through submitit (at most
  ``slurm_max_num_timeout`` times) and the requeued job resumes from that checkpoint; after TERM
  requeueing is Slurm's call (preemption with ``PreemptMode=REQUEUE``), and the job ends FAILED
  otherwise (the checkpoint stays for a resubmit). A failed run ends its job FAILED.
* Each record's ``trained_by`` counts attempts (Slurm's restart count + 1, or more if earlier
  jobs tried) and lists the job of every attempt (:func:`attempt_info`).
* Submitting the same command again submits only the runs that are neither finished nor being
  trained (a held run lock) nor queued (a job of this grid still in ``squeue``), and says which
  it skipped and why. The per-run locks still apply, so two jobs never train one run twice.
* Every ``--slurm-param`` is checked before anything is submitted (one line naming the one that
  is wrong); the ones submitit takes when its executor is made (``slurm_max_num_timeout``, ...)
  go there.

On a real cluster the command returns once the arrays are submitted. With
``KDBENCH_SLURM_CLUSTER=local`` (or ``debug``) submitit's local executor runs the jobs on this
machine instead (for tests; no dependencies there, so the students are submitted once the
teachers are finished) and the command waits for them.

This module is imported by every job (to unpickle :class:`RunJob`): its top level stays light
(no torch), so a job starts quickly and a signal finds submitit's handlers installed.
"""
from __future__ import annotations

import contextlib
import getpass
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from kdbench.launchers import LAUNCHER_ENV, passthrough_args

CLUSTER_ENV = "KDBENCH_SLURM_CLUSTER"  # submitit cluster: slurm (default), local, debug
STOP_WAIT_S = 120  # how long a signalled run may take to write its checkpoint
POLL_S = 0.2
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)  # a time limit or preemption is coming: requeue
CAUGHT = (signal.SIGTERM, *WARNINGS)
FINISHED = ("done", "diverged")
CLIENTS = ("sbatch", "squeue", "scontrol", "srun")

# The job script's ``srun``, as a shell function: bash runs it in the background and waits, so
# that a signal sent to the script alone (``scancel --batch``, ``--signal=B:...``) is passed on
# to the job's steps (plain ``scancel --signal`` does not signal the script again) instead of
# killing the script (bash runs no trap while a foreground command runs).
FORWARD_SETUP = (
    'srun() { command srun "$@" & local pid=$! rc; '
    'for s in USR1 USR2 TERM; do trap "scancel --signal=$s $SLURM_JOB_ID" $s; done; '
    'while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || return $rc; done; }')


def _user_error(message: str) -> Exception:
    from kdbench.api import UserError

    return UserError(message)


def _submitit():
    try:
        import submitit
    except ImportError:
        raise _user_error("the slurm launcher needs submitit: pip install 'kdbench[slurm]' "
                          "(or pip install submitit)") from None
    return submitit


# ------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------
def attempt_info(prev_trained_by: dict | None, attempt: int) -> dict:
    """For a run trained in a Slurm job: ``attempt`` (at least Slurm's restart count + 1: a
    killed attempt wrote no record) and ``slurm_jobs``, the earlier attempts' jobs and this one."""
    prev = prev_trained_by or {}
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    else:
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "?"
    jobs = [j for j in prev.get("slurm_jobs") or [] if isinstance(j, dict)]
    jobs.append({"job_id": job_id, "restart": restarts})
    return {"attempt": max(attempt, restarts + 1), "slurm_jobs": jobs}


def _submitit_signal() -> int:
    """The signal submitit's job handles by checkpointing and requeueing (USR2 by default)."""
    try:
        from submitit.core.job_environment import JobEnvironment

        return JobEnvironment._usr_sig()
    except Exception:  # (a submitit without it: its long-standing default)
        return signal.SIGUSR2


class RunStopped(RuntimeError):
    """The run was stopped by a signal and this job is not requeued by kdbench."""


class RunJob:
    """One run of the grid as a submitit job (picklable: paths and strings only)."""

    def __init__(self, recipe: str, run_id: str, log: str, passthrough: list[str]):
        self.recipe, self.run_id, self.log, self.passthrough = recipe, run_id, log, passthrough
        self._proc = None
        self._signals: list[int] = []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "kdbench", "run", self.recipe, "--launcher", "inline",
                "--run-id", self.run_id, "--plain", *self.passthrough]

    def _note(self, signum, frame) -> None:
        self._signals.append(signum)  # acted on by __call__'s loop

    def status(self) -> str | None:
        """The status in the run's record (None: no readable record)."""
        try:
            record = json.loads((Path(self.log).parent / "record.json").read_text())
        except (OSError, ValueError):
            return None
        return record.get("status") if isinstance(record, dict) else None

    def __call__(self) -> int:
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, LAUNCHER_ENV: "slurm"}
        # submitit's checkpoint-and-requeue handler: called below, once the run has stopped.
        requeue = signal.getsignal(_submitit_signal())
        self._signals = []
        for s in CAUGHT:  # kept to the end: a late signal must not requeue a finished run
            signal.signal(s, self._note)
        with open(self.log, "ab") as out:
            # The run starts with the stop signals blocked (inherited): one arriving while it
            # loads is held until its handlers are in place (kdbench.engine.signals).
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CAUGHT)
            try:
                self._proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            try:
                # Poll, not wait(): signal handlers run between polls.
                passed_on = False
                while self._proc.poll() is None:
                    if self._signals and not passed_on:  # the run may not have got it itself
                        self._proc.send_signal(self._signals[0])
                        passed_on = True
                    time.sleep(POLL_S)
                rc = self._proc.returncode
            finally:
                self._proc = None
        return self._outcome(rc, requeue)

    def _outcome(self, rc: int, requeue) -> int:
        status = self.status()
        if status in FINISHED:
            return 0  # the run is finished (a signal, if any, came too late): COMPLETED
        signum = self._signals[0] if self._signals else (
            rc - 128 if rc > 128 and status == "interrupted" else None)
        if signum is not None:
            name = signal.Signals(signum).name
            if signum in WARNINGS and callable(requeue):
                # submitit: checkpoint() (the run wrote its own checkpoint), requeue, exit.
                requeue(signum, None)
            raise RunStopped(f"run {self.run_id} stopped by {name} (status {status}); its checkpoint "
                             "is kept: it resumes when Slurm requeues this job, or when the same "
                             "`kdbench run ... --launcher slurm` is submitted again")
        if status == "failed":
            raise RuntimeError(f"run {self.run_id} failed; see {self.log} and the run's error.txt")
        if rc != 0:
            raise RuntimeError(f"`kdbench run --run-id {self.run_id}` exited with status {rc}; "
                               f"see {self.log}")
        return rc

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
        return {**self.__dict__, "_proc": None, "_signals": []}


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------
def _value(text: str):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text[:1] in "[{":
        try:
            return json.loads(text)  # slurm_setup=[...], slurm_additional_parameters={...}
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_params(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> submitit executor parameters (ints, floats, booleans, JSON lists
    and objects parsed)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _user_error(f"--slurm-param takes KEY=VALUE, got {item!r}")
        params[key.strip()] = _value(value.strip())
    return params


def constructor_params(submitit) -> set[str]:
    """The parameters submitit takes only when an AutoExecutor is made (``slurm_max_num_timeout``
    and the like): each executor's constructor arguments, prefixed by its name."""
    import inspect

    from submitit.core import plugins

    names = set(getattr(submitit.AutoExecutor, "_ctor_deprecated_args", {}))
    for ex_name, cls in plugins.get_executors().items():
        for arg in list(inspect.signature(cls.__init__).parameters)[2:]:  # self, folder
            names.add(f"{ex_name}_{arg}")
    return names


def make_executor(submitit, folder: Path, cluster: str, params: dict):
    """The AutoExecutor with ``params`` (constructor ones given to it, the others to
    update_parameters); a UserError naming the parameter submitit refused."""
    ctor_names = constructor_params(submitit)
    ctor = {k: v for k, v in params.items() if k in ctor_names}
    rest = {k: v for k, v in params.items() if k not in ctor_names}
    given = " ".join(f"{k}={v!r}" for k, v in ctor.items())
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **ctor)
    except (AssertionError, TypeError, ValueError, RuntimeError) as exc:
        raise _user_error(f"--slurm-param {given or '(none)'}: submitit refused it: "
                          f"{_first_line(exc)}") from None
    for key, value in rest.items():  # one at a time: the error names the culprit
        try:
            executor.update_parameters(**{key: value})
        except (NameError, AssertionError, TypeError, ValueError) as exc:
            raise _user_error(f"--slurm-param {key}={value!r}: submitit refused it: "
                              f"{_first_line(exc)} (the parameters of submitit's AutoExecutor, "
                              "e.g. timeout_min, slurm_partition, slurm_max_num_timeout)") from None
    return executor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


# ------------------------------------------------------------------------------------------------
# the cluster: what is queued
# ------------------------------------------------------------------------------------------------
def check_controller() -> None:
    """A UserError unless Slurm's commands are here and ``squeue`` reaches a controller."""
    absent = [c for c in CLIENTS if shutil.which(c) is None]
    if absent:
        raise _user_error(f"the slurm launcher needs Slurm, and {', '.join(absent)} is not on PATH "
                          f"here; run on a Slurm login node (or set {CLUSTER_ENV}=local to run the "
                          "jobs on this machine through submitit's local executor)")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # (Slurm's commands would retry it for a minute)
        raise _user_error(f"SLURM_CONF names {conf}, which is not a file: point it at the "
                          "cluster's slurm.conf, or unset it")
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i", "-u", getpass.getuser()],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise _user_error("the slurm launcher cannot reach the Slurm controller: squeue did not "
                          "answer in 60 s (is slurmctld running? SLURM_CONF?)") from None
    if proc.returncode:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise _user_error(f"the slurm launcher cannot reach the Slurm controller: {why} "
                          "(is slurmctld running? SLURM_CONF?)")


def queued_jobs() -> dict[str, tuple[str, str]]:
    """{job id: (state, job name)} of this user's jobs in ``squeue`` (array tasks one by one:
    ``12_3``)."""
    proc = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%j"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise _user_error(f"squeue failed: {why}")
    jobs = {}
    for line in proc.stdout.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, name = rest.partition("|")
        if job_id:
            jobs[job_id] = (state, name)
    return jobs


def _manifest_dir(folder: Path) -> Path:
    return folder / "jobs"


def write_manifest(folder: Path, jobs: list, runs: list) -> None:
    """Which job trains which run: ``<output>/slurm/jobs/<first job id>.json``."""
    if not jobs:
        return
    d = _manifest_dir(folder)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{jobs[0].job_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({j.job_id: r.id for j, r in zip(jobs, runs)}, indent=1))
    os.replace(tmp, path)


def queued_runs(folder: Path, name: str) -> dict[str, tuple[str, str]]:
    """{run id: (job id, state)} of the runs whose job (submitted from this output folder, named
    ``name``: a job id Slurm gave out again is not taken for ours) is still in ``squeue``."""
    d = _manifest_dir(folder)
    if not d.is_dir():
        return {}
    known: dict[str, str] = {}
    for path in sorted(d.glob("*.json")):
        try:
            known.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not known:
        return {}
    queued = queued_jobs()
    return {run_id: (job_id, queued[job_id][0]) for job_id, run_id in known.items()
            if job_id in queued and queued[job_id][1] == name}


# ------------------------------------------------------------------------------------------------
# submitting
# ------------------------------------------------------------------------------------------------
def _submit(submitit, executor, jobs: list[RunJob]) -> list:
    if not jobs:
        return []
    try:
        # Quiet: submitit echoes each sbatch command and sbatch's stderr (an error is one line below).
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with executor.batch():
                submitted = [executor.submit(job) for job in jobs]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError,
            subprocess.CalledProcessError, OSError) as exc:
        raise _user_error(f"sbatch refused the jobs: {_first_line(exc)}") from None
    return submitted


def _held(view, spec) -> str | None:
    from kdbench.engine.locks import RunLock
    from kdbench.launchers.local import lock_holder_pid

    run_dir = view.store.run_dir(spec.kind, spec.id)
    if lock_holder_pid(run_dir) is None:
        return None
    return f"being trained by {RunLock(run_dir).holder()}"


def run_slurm(loaded, registry, args) -> int:
    from kdbench.api import UserError
    from kdbench.launchers.local import FINAL, GridView

    submitit = _submitit()
    if args.max_parallel is not None and args.max_parallel <= 0:
        raise UserError(f"--max-parallel must be a positive number, got {args.max_parallel}")
    cluster = os.environ.get(CLUSTER_ENV) or "slurm"
    known = sorted(submitit.core.plugins.get_executors())
    if cluster not in known:
        raise UserError(f"{CLUSTER_ENV}={cluster!r} names no submitit executor; use one of "
                        f"{', '.join(known)} (or unset it for Slurm)")
    on_slurm = cluster == "slurm"
    folder = loaded.output_dir / "slurm"
    params = {"name": f"kdbench-{loaded.path.stem}", **parse_params(args.slurm_param)}
    if args.max_parallel:
        params["slurm_array_parallelism"] = args.max_parallel
    if on_slurm:
        check_controller()
        setup = params.get("slurm_setup") or []
        if not isinstance(setup, list):
            raise UserError(f"--slurm-param slurm_setup takes a JSON list of shell lines, got {setup!r}")
        params["slurm_setup"] = [*setup, FORWARD_SETUP]
    executor = make_executor(submitit, folder / "%j", cluster, params)  # checked before submitting

    view = GridView(loaded, registry, args.retry_diverged, args.run_id)
    queued = queued_runs(folder, str(params["name"])) if on_slurm else {}
    skipped: list[tuple[object, str]] = []
    todo = []
    for spec in view.specs:
        why = (f"job {queued[spec.id][0]} {queued[spec.id][1]}" if spec.id in queued
               else _held(view, spec))
        (skipped.append((spec, why)) if why else todo.append(spec))
    if skipped:
        print(f"kdbench: not submitting {len(skipped)} run(s) already queued or being trained: "
              + ", ".join(f"{s.id} ({why})" for s, why in skipped), file=sys.stderr)
    if not todo:
        print(f"kdbench: nothing to submit; results in {loaded.output_dir}", file=sys.stderr)
        return 0
    passthrough = passthrough_args(args)

    def jobs(specs) -> list[RunJob]:
        return [RunJob(str(loaded.path.resolve()), s.id,
                       str(view.store.run_dir(s.kind, s.id).resolve() / "log.txt"), passthrough)
                for s in specs]

    teacher_specs = [s for s in todo if s.kind == "teacher"]
    student_specs = [s for s in todo if s.kind == "student"]
    teachers = _submit(submitit, executor, jobs(teacher_specs))
    write_manifest(folder, teachers, teacher_specs)
    if on_slurm:
        # The students wait for the teachers submitted now and for those still queued.
        needed = {s.teacher.id for s in student_specs if s.teacher}
        after = sorted({j.job_id.split("_")[0] for j in teachers}
                       | {queued[t][0] for t in needed if t in queued})
        if after:
            extra = dict(executor.parameters.get("additional_parameters") or {})
            dependency = "afterany:" + ":".join(after)
            extra["dependency"] = ",".join(filter(None, [extra.get("dependency"), dependency]))
            executor.update_parameters(slurm_additional_parameters=extra)
    else:
        for job in teachers:  # no dependencies outside Slurm: wait here
            job.wait()
    students = _submit(submitit, executor, jobs(student_specs))
    write_manifest(folder, students, student_specs)
    print(f"kdbench: submitted {len(teachers)} teacher job(s) and {len(students)} student job(s) "
          f"({executor.cluster}); submitit files in {folder}, each run's log in its folder",
          file=sys.stderr)
    for label, submitted in (("teachers", teachers), ("students", students)):
        if submitted:
            print(f"  {label}: job {submitted[0].job_id.split('_')[0]}", file=sys.stderr)
    if on_slurm:
        print("kdbench: when the jobs are done, `kdbench leaderboard` the output folder; "
              "submitting the same command again submits only what is neither finished nor "
              "queued", file=sys.stderr)
        return 0
    for job in students:
        job.wait()
    counts: dict[str, int] = {}
    for spec in todo:
        status = view.status(spec) or "not finished"
        counts[status] = counts.get(status, 0) + 1
    print("kdbench: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f"; results in {loaded.output_dir}", file=sys.stderr)
    unfinished = sum(n for s, n in counts.items() if s not in FINAL)
    return 1 if unfinished or counts.get("failed") else 0
