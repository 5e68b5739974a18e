"""The slurm launcher on a real Slurm (munged, slurmctld and slurmd on localhost, started by
tests/slurm_cluster.py): a timeout signal mid-epoch checkpoints the run, the job is requeued and
resumes from that step, and every record ends bit-identical to an inline run; a resubmit while
the grid is queued or training submits nothing; bad parameters and a missing controller are one
line, exit 2, before anything is submitted.

Needs Debian's slurm-wlm and munge and root (.ci/run installs them): without them these tests
fail, they do not skip (``-m "not slurm"`` leaves them out).
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import kdbench_cmd, kdbench_env, read_records, run_kdbench, write_tiny_recipe
from slurm_cluster import missing, slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TEACHER_STEPS_PER_EPOCH = 60  # 4 classes x 240 images / batch 16
# The tiny recipe with more training images (a 60-step epoch: room to stop mid-epoch) and KD alone.
TRAIN_PER_CLASS = 240
KD_ONLY = [{"label": "KD", "ref_method": "KD",
            "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}]}]
SUBMIT = ("--launcher", "slurm", "--checkpoint-every", "10", "--plain",
          "--slurm-param", "timeout_min=10", "--slurm-param", "slurm_max_num_timeout=5")


@pytest.fixture(scope="module")
def cluster():
    why = missing()
    if why:
        pytest.fail(f"this test needs a real Slurm: {why}")
    with slurm_cluster() as c:
        yield c


def _recipe(folder: Path) -> Path:
    return write_tiny_recipe(folder / "recipe.toml", name="slurm-real", output=folder / "runs",
                             dataset={"train_per_class": TRAIN_PER_CLASS}, method_sets=KD_ONLY)


def _wait(what: str, cond, cluster, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{cluster.cmd('squeue', check=False)}\n{cluster.logs()}")


def _job(cluster, job_id: str) -> dict:
    return next(j for j in cluster.jobs() if j["JobId"] == job_id)


def test_timeout_signal_requeues_resumes_and_matches_inline(cluster, tmp_path):
    t0 = time.monotonic()
    recipe = _recipe(tmp_path)
    env = kdbench_env(SLURM_CONF=cluster.conf)
    # The reference, trained meanwhile (same OMP_NUM_THREADS=1 as the jobs: bit for bit).
    inline = subprocess.Popen(kdbench_cmd("run", recipe, "--output", tmp_path / "inline", "--plain"),
                              env=kdbench_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    submit = run_kdbench("run", recipe, *SUBMIT, env=env)
    assert submit.returncode == 0, submit.stderr
    teacher_job = re.search(r"teachers: job (\d+)", submit.stderr).group(1)
    student_job = re.search(r"students: job (\d+)", submit.stderr).group(1)
    # The job makes the run's folder when it starts (the submitter creates no run folder).
    teachers = tmp_path / "runs" / "teachers"
    teacher_dir = _wait("the teacher's job to start", lambda: teachers.is_dir() and next(teachers.iterdir(), None),
                        cluster)
    log = teacher_dir / "log.txt"

    # A timeout signal mid-epoch, to the job's script only (the hardest path: bash must pass
    # it on to the job's steps), once the run has written its step-10 checkpoint.
    _wait("the teacher's first checkpoint", lambda: list(teacher_dir.glob("ckpt-*.pt")), cluster)
    cluster.cmd("scancel", "--batch", "--signal=USR2", teacher_job)
    _wait("the teacher's job to be requeued", lambda: _job(cluster, teacher_job)["Restarts"] == "1", cluster)

    # Resubmitting now (the teacher requeued or training again, its student waiting on it)
    # submits nothing and says why.
    before = {j["JobId"] for j in cluster.jobs()}
    again = run_kdbench("run", recipe, *SUBMIT, env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing to submit" in again.stderr, again.stderr
    skipped = re.search(r"not submitting 2 run\(s\) already queued or being trained: (.*)", again.stderr)
    assert skipped and teacher_dir.name in skipped.group(1), again.stderr
    assert {j["JobId"] for j in cluster.jobs()} == before

    _wait("both jobs to end", lambda: all(_job(cluster, j)["JobState"] not in
                                          ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")
                                          for j in (teacher_job, student_job)), cluster)
    states = {j: (_job(cluster, j)["JobState"], _job(cluster, j)["Restarts"]) for j in (teacher_job, student_job)}
    assert states == {teacher_job: ("COMPLETED", "1"), student_job: ("COMPLETED", "0")}, (
        states, log.read_text())

    text = log.read_text()
    assert "got SIGUSR2" in text, text
    stopped = int(re.search(r"interrupted at step (\d+)", text).group(1))
    resumed = int(re.search(r"resuming from ckpt-\d+\.pt: epoch 1, batch \d+ of \d+, step (\d+)", text).group(1))
    records = read_records(tmp_path / "runs")
    teacher = records[teacher_dir.name]
    assert teacher["trained_by"]["resumed_from"]["step"] == stopped == resumed
    assert 10 <= stopped < TEACHER_STEPS_PER_EPOCH, stopped  # mid-epoch 1, after the first checkpoint
    assert teacher["trained_by"]["attempt"] == 2
    assert teacher["trained_by"]["slurm_jobs"] == [{"job_id": teacher_job, "restart": 0},
                                                  {"job_id": teacher_job, "restart": 1}]
    assert {r["trained_by"]["launcher"] for r in records.values()} == {"slurm"}

    assert inline.wait(timeout=600) == 0, inline.stderr.read()
    expected = read_records(tmp_path / "inline")
    assert records.keys() == expected.keys() and len(records) == 2
    for run_id, rec in records.items():
        assert rec["status"] == "done", (run_id, rec.get("error"))
        for key in ("epochs", "final", "weights_sha256"):
            assert rec[key] == expected[run_id][key], (run_id, key)
    print(f"\nslurm timeout test: stopped at step {stopped}, resumed from step {resumed}, "
          f"attempts {teacher['trained_by']['attempt']} ({teacher['trained_by']['slurm_jobs']}), "
          f"weights_sha256 {teacher['weights_sha256'][:12]} == inline; {time.monotonic() - t0:.0f} s")


def test_bad_params_and_missing_controller_are_one_line_before_submitting(cluster, tmp_path, monkeypatch, capsys):
    from kdbench.cli import main

    recipe = _recipe(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    before = len(cluster.jobs())
    for param, says in (("slurm_max_num_tmeout=8", "Unknown argument 'max_num_tmeout'"),
                        ("timeout_min=ten", 'Parameter "timeout_min" expected type'),
                        ("slurm_partition=nosuchpartition", "sbatch refused the jobs"),
                        ("timeout_min", "KEY=VALUE")):
        assert main(["run", str(recipe), "--launcher", "slurm", "--slurm-param", param]) == 2, param
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (param, err)
    assert len(cluster.jobs()) == before  # nothing submitted

    dead = tmp_path / "dead.conf"  # the same cluster on a port nothing listens on
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=1", cluster.conf.read_text()))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    assert main(["run", str(recipe), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the Slurm controller" in err, err
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    assert main(["run", str(recipe), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.conf, which is not a file" in err, err
