"""Launchers: the local worker pool writes the same records as the inline launcher, trains each
run once, and survives a worker killed mid-run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import kdbench_cmd, kdbench_env, read_records, run_kdbench, write_tiny_recipe
from kdbench.api import UserError
from kdbench.cli import main
from kdbench.launchers.local import KILL_WORKER_ENV, parse_devices

DONE = re.compile(r"\(([ts]-[0-9a-f]{16})\): done top1=")
METRICS = ("epochs", "final", "best", "weights_sha256")


# Every process runs with kdbench_env()'s OMP_NUM_THREADS=1: same threads, bit-identical results.
def _recipe(folder: Path) -> Path:
    return write_tiny_recipe(folder / "tiny.toml", seeds=(0, 1))


@pytest.fixture(scope="module")
def inline_records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inline")
    proc = run_kdbench("run", _recipe(folder), "--plain", timeout=900)
    assert proc.returncode == 0, proc.stderr
    records = read_records(folder / "runs")
    assert len(records) == 6  # 2 teachers (one per seed), 4 students
    return records


def _same_metrics(records: dict, expected: dict) -> None:
    assert records.keys() == expected.keys()
    for run_id, rec in records.items():
        assert rec["status"] == "done", (run_id, rec.get("error"))
        for key in METRICS:
            assert rec[key] == expected[run_id][key], (run_id, key)


@pytest.mark.slow
def test_local_launcher_two_workers_matches_inline(tmp_path, inline_records):
    recipe = _recipe(tmp_path)
    proc = run_kdbench("run", recipe, "--launcher", "local", "--workers", "2", "--plain", timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[6/6\] finished", proc.stderr), proc.stderr
    records = read_records(tmp_path / "runs")
    _same_metrics(records, inline_records)
    assert {r["trained_by"]["launcher"] for r in records.values()} == {"local"}
    assert {r["trained_by"]["launcher"] for r in inline_records.values()} == {"inline"}
    # Each run (shared teachers included) trained exactly once, by one of the workers.
    logs = [p.read_text() for p in sorted((tmp_path / "runs" / "logs").glob("worker-*.log"))]
    assert len(logs) == 2
    trained = Counter(m for log in logs for m in DONE.findall(log))
    assert trained == Counter({run_id: 1 for run_id in records}), trained
    # Students start only once their teacher is done: each teacher's record was written first.
    for rec in records.values():
        if rec["kind"] == "student" and rec["teacher_id"]:
            teacher = tmp_path / "runs" / "teachers" / rec["teacher_id"] / "record.json"
            student = tmp_path / "runs" / "students" / rec["id"] / "record.json"
            assert teacher.stat().st_mtime <= student.stat().st_mtime


@pytest.mark.slow
def test_killed_worker_loses_only_its_run_and_a_rerun_completes(tmp_path, inline_records):
    recipe = _recipe(tmp_path)
    env = kdbench_env(**{KILL_WORKER_ENV: "0:2"})  # worker 0 SIGKILLs itself after step 2 of its first run
    proc = run_kdbench("run", recipe, "--launcher", "local", "--workers", "2", "--checkpoint-every", "1",
                       "--plain", env=env, timeout=900)
    assert "worker cpu#0" in proc.stderr and "exited with status -9" in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1), proc.stderr  # 0 if worker 1 finished the grid alone
    rerun = run_kdbench("run", recipe, "--launcher", "local", "--workers", "2", "--plain", timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    records = read_records(tmp_path / "runs")
    _same_metrics(records, inline_records)  # the killed run resumed exactly from its checkpoint
    resumed = [r for r in records.values() if r["trained_by"]["resumed_from"] is not None]
    assert len(resumed) == 1, [r["trained_by"] for r in records.values()]


def test_parse_devices():
    assert parse_devices(None, 3) == ["cpu", "cpu", "cpu"]
    assert parse_devices("cpu, cpu", None) == ["cpu", "cpu"]
    with pytest.raises(UserError, match="either"):
        parse_devices("cpu", 2)
    with pytest.raises(UserError, match="positive"):
        parse_devices(None, 0)
    with pytest.raises(UserError):
        parse_devices("tpu:0", None)


def test_workers_need_the_local_launcher(tiny_recipe, capsys):
    assert main(["run", str(tiny_recipe()), "--workers", "2"]) == 2
    assert "--launcher local" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# slurm launcher, through submitit's local executor (no Slurm cluster here)
# ------------------------------------------------------------------------------------------------
def _one_seed_recipe(folder: Path, teacher_epochs: int = 2) -> Path:
    return write_tiny_recipe(folder / "tiny.toml", teacher_schedule={"epochs": teacher_epochs})


@pytest.mark.slow
def test_slurm_launcher_local_executor_matches_inline(tmp_path, inline_records):
    pytest.importorskip("submitit")
    proc = run_kdbench("run", _one_seed_recipe(tmp_path), "--launcher", "slurm", "--max-parallel", "2",
                       "--slurm-param", "timeout_min=10", "--plain",
                       env=kdbench_env(KDBENCH_SLURM_CLUSTER="local"), timeout=900)
    assert proc.returncode == 0, proc.stderr
    records = read_records(tmp_path / "runs")
    assert len(records) == 3  # seed 0: one teacher, two students
    _same_metrics(records, {k: inline_records[k] for k in records})
    assert {r["trained_by"]["launcher"] for r in records.values()} == {"slurm"}
    for run_id, rec in records.items():  # each run's log in its folder
        folder = tmp_path / "runs" / ("teachers" if rec["kind"] == "teacher" else "students") / run_id
        assert "done top1=" in (folder / "log.txt").read_text()


@pytest.mark.slow
def test_slurm_job_checkpoints_and_requeues_on_timeout_signal(tmp_path, monkeypatch):
    """submitit's timeout/preemption signal -> RunJob.checkpoint(): the run writes a checkpoint
    and stops, the job is requeued and the run resumes from that checkpoint."""
    submitit = pytest.importorskip("submitit")
    import time

    from kdbench.launchers.slurm import RunJob

    recipe = _one_seed_recipe(tmp_path, teacher_epochs=30)
    dry = run_kdbench("run", recipe, "--dry-run", timeout=300)
    teacher_id = re.search(r"train  (t-[0-9a-f]{16})", dry.stdout).group(1)
    run_dir = tmp_path / "runs" / "teachers" / teacher_id
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=10)
    for key, value in kdbench_env().items():  # the local executor's job inherits this process's env
        if key in ("KDBENCH_ONLY_DISTS", "OMP_NUM_THREADS"):
            monkeypatch.setenv(key, value)
    job = executor.submit(RunJob(str(recipe), teacher_id, str(run_dir / "log.txt"),
                                 ["--checkpoint-every", "1"]))
    deadline = time.time() + 300
    while not list(run_dir.glob("ckpt-*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(run_dir.glob("ckpt-*.pt")), (run_dir / "log.txt").read_text()
    # What Slurm does before the time limit: USR2 to the job's task, the parent of the run's
    # process (whose pid is in the run's lock file). (LocalJob._interrupt signals the local
    # controller instead, which does not pass USR2 on.)
    run_pid = int((run_dir / ".lock").read_text().split()[1])
    task_pid = int(Path(f"/proc/{run_pid}/stat").read_text().rpartition(")")[2].split()[1])
    os.kill(task_pid, signal.SIGUSR2)
    assert job.result() == 0
    log = (run_dir / "log.txt").read_text()
    assert "interrupted at step" in log, log
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "done"
    assert record["trained_by"]["attempt"] == 2 and record["trained_by"]["resumed_from"] is not None


def test_slurm_params_parse():
    from kdbench.launchers.slurm import parse_params

    assert parse_params(["timeout_min=240", "slurm_partition=gpu", "mem_gb=7.5", "x=true"]) == {
        "timeout_min": 240, "slurm_partition": "gpu", "mem_gb": 7.5, "x": True}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_params(["timeout_min"])


@pytest.mark.slow
def test_usr2_reaches_the_workers_and_a_rerun_resumes(tmp_path):
    """A scheduler's warning sent to the pool's parent (inside a Slurm allocation, submitit's
    USR2) is passed on: the workers checkpoint and stop, the parent exits 128 + signal (not killed
    by it), and the same command resumes the interrupted runs and finishes the grid."""
    # Teachers long enough (120 steps) that the signal lands inside one.
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", seeds=(0, 1), teacher_schedule={"epochs": 40})
    proc = subprocess.Popen(kdbench_cmd("run", recipe, "--launcher", "local", "--workers", "2",
                                        "--checkpoint-every", "1", "--plain"),
                            stderr=subprocess.PIPE, text=True, env=kdbench_env())
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "cpu#0: teacher" in line or "cpu#1: teacher" in line:  # a worker is training one
            proc.send_signal(signal.SIGUSR2)
            break
    lines += proc.stderr.readlines()
    err = "".join(lines)
    assert proc.wait(timeout=600) == 128 + signal.SIGUSR2, err
    assert "got SIGUSR2: passing it on to the workers" in err, err
    assert "exited with status 140" in err and "run the same command again to resume" in err, err
    stopped = {i: r for i, r in read_records(tmp_path / "runs").items() if r["status"] == "interrupted"}
    assert stopped and {r["interrupted"]["signal"] for r in stopped.values()} == {"SIGUSR2"}, err
    rerun = run_kdbench("run", recipe, "--launcher", "local", "--workers", "2", "--plain", timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    records = read_records(tmp_path / "runs")
    assert len(records) == 6 and {r["status"] for r in records.values()} == {"done"}
    assert all(records[i]["trained_by"]["resumed_from"] is not None for i in stopped), stopped.keys()


@pytest.mark.slow
def test_a_signal_while_the_pool_starts_stops_it_cleanly(tmp_path):
    """SIGTERM to the parent after its first worker started and before the second one: the
    parent passes it on (it is not killed, which would leave the first worker training on its
    own), starts no more workers and exits 128 + signal; the same command then finishes."""
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", seeds=(0, 1), teacher_schedule={"epochs": 40})
    env = kdbench_env(KDBENCH_TEST_WORKER_START_DELAY=120)
    proc = subprocess.Popen(kdbench_cmd("run", recipe, "--launcher", "local", "--workers", "2",
                                        "--checkpoint-every", "1", "--plain"),
                            stderr=subprocess.PIPE, text=True, env=env)
    log0, log1 = tmp_path / "runs" / "logs" / "worker-0.log", tmp_path / "runs" / "logs" / "worker-1.log"
    try:
        deadline = time.monotonic() + 120
        while not (log0.exists() and "epochs ×" in log0.read_text()):  # worker 0 is training
            assert proc.poll() is None and time.monotonic() < deadline, "worker 0 never started a run"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "got SIGTERM: passing it on to the workers" in err, err
    assert "on 1 worker(s)" in err and "exited with status 143" in err, err
    assert not log1.exists(), "a worker was started after the signal"
    stopped = [r for r in read_records(tmp_path / "runs").values() if r["status"] == "interrupted"]
    assert [r["interrupted"]["signal"] for r in stopped] == ["SIGTERM"], err
    rerun = run_kdbench("run", recipe, "--launcher", "local", "--workers", "2", "--plain", timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    records = read_records(tmp_path / "runs")
    assert len(records) == 6 and {r["status"] for r in records.values()} == {"done"}
