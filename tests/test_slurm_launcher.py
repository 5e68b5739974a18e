"""The slurm launcher's pieces, without a cluster (tests/test_slurm_real.py runs a real one): what
a job does once its run has stopped, the stop signals under Slurm, attempts, the submitit
parameters, and what a resubmit leaves alone."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from kdbench.api import UserError
from kdbench.cli import main
from kdbench.engine.locks import RunLock
from kdbench.engine.signals import StopSignals
from kdbench.recipe import expand, load_recipe

submitit = pytest.importorskip("submitit")
from kdbench.launchers import slurm  # noqa: E402  (needs submitit only when used)
from kdbench.launchers.slurm import RunJob, RunStopped, attempt_info, make_executor, parse_params  # noqa: E402


def _job(tmp_path, status: str | None) -> RunJob:
    run_dir = tmp_path / f"t-{status}"
    run_dir.mkdir(exist_ok=True)
    if status is not None:
        (run_dir / "record.json").write_text(json.dumps({"status": status}))
    return RunJob("recipe.toml", run_dir.name, str(run_dir / "log.txt"), [])


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2])
def test_a_warning_signal_requeues_the_interrupted_run_through_submitit(tmp_path, signum):
    job, requeued = _job(tmp_path, "interrupted"), []
    job._signals = [signum]
    with pytest.raises(RunStopped):  # (submitit's real handler exits instead of returning)
        job._outcome(128 + signum, lambda s, frame: requeued.append(s))
    assert requeued == [signum]


def test_the_run_saw_the_signal_alone_the_job_still_requeues(tmp_path):
    job, requeued = _job(tmp_path, "interrupted"), []
    with pytest.raises(RunStopped):
        job._outcome(128 + signal.SIGUSR2, lambda s, frame: requeued.append(s))
    assert requeued == [signal.SIGUSR2]


def test_term_is_slurms_call_and_a_finished_run_completes_whatever_the_signal(tmp_path):
    requeued = []
    job = _job(tmp_path, "interrupted")
    job._signals = [signal.SIGTERM]
    with pytest.raises(RunStopped, match="SIGTERM"):
        job._outcome(128 + signal.SIGTERM, lambda s, frame: requeued.append(s))
    for status in ("done", "diverged"):  # the signal came after the run finished: COMPLETED
        job = _job(tmp_path, status)
        job._signals = [signal.SIGUSR2]
        assert job._outcome(128 + signal.SIGUSR2, lambda s, frame: requeued.append(s)) == 0
    assert requeued == []


def test_a_failed_run_fails_its_job(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        _job(tmp_path, "failed")._outcome(1, None)
    with pytest.raises(RuntimeError, match="exited with status 2"):
        _job(tmp_path, None)._outcome(2, None)
    assert _job(tmp_path, None)._outcome(0, None) == 0  # (nothing to do: e.g. done elsewhere)


def test_under_slurm_a_repeated_signal_does_not_stop_the_run_at_once(monkeypatch):
    monkeypatch.setenv("KDBENCH_LAUNCHER", "slurm")
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)  # the default action would end this process
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.signum == signal.SIGUSR2
    monkeypatch.setenv("KDBENCH_LAUNCHER", "local")
    assert StopSignals().escalate and not StopSignals(escalate=False).escalate


def test_a_signal_held_while_blocked_is_handled_once_the_handlers_are_in(monkeypatch):
    monkeypatch.setenv("KDBENCH_LAUNCHER", "slurm")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})  # as a job starts its run
    try:
        # Arrives while the run loads: held (sent to this thread: the others, started unblocked
        # by pytest and torch, would take it; a job's run starts all its threads blocked).
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
        with StopSignals() as stop:
            time.sleep(0.05)
            assert stop.signum == signal.SIGUSR2
        assert signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # blocked again
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_attempts_count_slurm_restarts_and_keep_every_job(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "44")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")  # earlier attempts were killed unrecorded
    prev = {"attempt": 1, "slurm_jobs": [{"job_id": "40", "restart": 0}]}
    assert attempt_info(prev, 2) == {"attempt": 4, "slurm_jobs": [{"job_id": "40", "restart": 0},
                                                                  {"job_id": "41_3", "restart": 3}]}
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert attempt_info(None, 5)["attempt"] == 5


def test_params_parse_and_constructor_ones_reach_the_executor(tmp_path):
    assert parse_params(["timeout_min=240", "slurm_partition=gpu", "mem_gb=7.5", "x=true",
                         'slurm_setup=["module load cuda"]']) == {
        "timeout_min": 240, "slurm_partition": "gpu", "mem_gb": 7.5, "x": True,
        "slurm_setup": ["module load cuda"]}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_params(["timeout_min"])
    assert {"slurm_max_num_timeout", "local_max_num_timeout"} <= slurm.constructor_params(submitit)
    executor = make_executor(submitit, tmp_path, "local", {"local_max_num_timeout": 7, "timeout_min": 3})
    assert executor._executor.max_num_timeout == 7
    for bad, says in (({"slurm_max_num_tmeout": 8}, "Unknown argument 'max_num_tmeout'"),
                      ({"timeout_min": "ten"}, "timeout_min")):
        with pytest.raises(UserError, match=says) as err:
            make_executor(submitit, tmp_path, "local", bad)
        assert "\n" not in str(err.value)


def test_no_slurm_here_is_one_line(tiny_recipe, tmp_path, monkeypatch, capsys):
    recipe = tiny_recipe(top={"launcher": "slurm"})  # the recipe's launcher, not the option
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))
    monkeypatch.delenv(slurm.CLUSTER_ENV, raising=False)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sbatch, squeue, scontrol, srun is not on PATH" in err, err
    monkeypatch.setenv(slurm.CLUSTER_ENV, "nosuch")
    assert main(["run", str(recipe)]) == 2
    assert "names no submitit executor" in capsys.readouterr().err


def test_a_resubmit_leaves_a_run_being_trained_alone(tiny_recipe, registry, monkeypatch, capsys):
    recipe = tiny_recipe()
    loaded = load_recipe(recipe, registry)
    teacher = expand(loaded, registry)[0][0]
    monkeypatch.setenv(slurm.CLUSTER_ENV, "local")
    lock = RunLock(loaded.output_dir / "teachers" / teacher.id)
    assert lock.try_acquire()  # another process trains it
    try:
        assert main(["run", str(recipe), "--launcher", "slurm", "--run-id", teacher.id]) == 0
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert f"not submitting 1 run(s) already queued or being trained: {teacher.id} (being trained by pid {os.getpid()}" in err
    assert "nothing to submit" in err and not list(loaded.output_dir.rglob("*.pkl"))  # no job


@pytest.mark.slow
def test_a_run_id_summary_counts_only_that_run(tiny_recipe, registry, capsys):
    recipe = tiny_recipe()
    assert main(["run", str(recipe), "--plain"]) == 0  # the whole grid: 1 teacher, 2 students
    capsys.readouterr()
    students = expand(load_recipe(recipe, registry), registry)[1]
    assert main(["run", str(recipe), "--plain", "--run-id", students[0].id]) == 0
    assert "0 done, 1 skipped (already done)" in capsys.readouterr().err


def test_queued_runs_are_this_folders_jobs_still_in_squeue(tmp_path, monkeypatch):
    class Job:
        def __init__(self, job_id):
            self.job_id = job_id

    class Spec:
        def __init__(self, run_id):
            self.id = run_id

    slurm.write_manifest(tmp_path, [Job("7_0"), Job("7_1")], [Spec("t-a"), Spec("t-b")])
    slurm.write_manifest(tmp_path, [Job("8")], [Spec("s-c")])
    monkeypatch.setattr(slurm, "queued_jobs", lambda: {
        "7_1": ("RUNNING", "kdbench-x"), "8": ("PENDING", "someone-else"), "9": ("PENDING", "kdbench-x")})
    # 7_0 left squeue; job 8 is another job that got the same id (not ours: its name differs).
    assert slurm.queued_runs(tmp_path, "kdbench-x") == {"t-b": ("7_1", "RUNNING")}
