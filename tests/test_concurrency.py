"""Several `kdbench run` processes on one grid: each run is trained exactly once, no record or
cached teacher is corrupted, and a student whose teacher another process holds waits for it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import kdbench_cmd, kdbench_env, read_records
from kdbench.cli import main
from kdbench.engine import queue, runner
from kdbench.engine.locks import RunLock

DONE = re.compile(r"\(([ts]-[0-9a-f]{16})\): done top1=")  # a run this process trained


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kdbench.engine.locks import RunLock
    lock = RunLock(Path(sys.argv[1]))
    assert lock.try_acquire()
    print("locked", flush=True)
    # Hold it until a record appears under argv[2], then argv[3] seconds longer.
    until = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    deadline = time.time() + 300  # never hang the test suite
    while until is not None and not list(until.glob("*/record.json")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 3600)
""")


def _holder(run_dir: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), *args], env=kdbench_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        lock = RunLock(tmp_path / "run")
        assert not lock.try_acquire()
        assert lock.holder().startswith(f"pid {holder.pid} on ")
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        holder.wait()
    assert lock.try_acquire()
    assert lock.holder().startswith(f"pid {os.getpid()} on ")
    lock.release()


@pytest.mark.slow
def test_two_processes_share_a_grid_and_train_each_run_once(tiny_recipe, tmp_path):
    """2 seeds: 2 teachers and 4 students, two processes started together."""
    recipe = tiny_recipe(seeds=(0, 1))
    cmd = kdbench_cmd("run", recipe, "--plain")
    # OMP_NUM_THREADS=1 (kdbench_env's default): the two processes share the CPUs.
    procs = [subprocess.Popen(cmd, env=kdbench_env(), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    runs = tmp_path / "runs"
    records = read_records(runs)
    assert len(records) == 6
    trained = Counter(m for err in errs for m in DONE.findall(err))
    assert trained == Counter({run_id: 1 for run_id in records}), trained
    pids = {p.pid for p in procs}
    for run_id, rec in records.items():
        assert rec["status"] == "done"
        assert rec["trained_by"]["pid"] in pids and rec["trained_by"]["attempt"] == 1
    for tid in (r for r in records if r.startswith("t-")):
        state = torch.load(runs / "teachers" / tid / "model.pt", weights_only=True)
        from kdbench.engine.reproducibility import weights_sha256

        assert weights_sha256(state) == records[tid]["weights_sha256"]


def test_student_waits_for_a_teacher_held_by_another_process(tiny_recipe, tmp_path, monkeypatch,
                                                             capsys):
    """Another process holds the teacher: the vanilla student (no teacher) runs first, then
    this process waits with a message, then trains the teacher (the other process left no
    record) and the KD student."""
    monkeypatch.setattr(queue, "WAIT_POLL_S", 0.2)
    recipe = tiny_recipe()
    main(["run", str(recipe), "--dry-run"])
    teacher_id = re.search(r"train  (t-[0-9a-f]{16})", capsys.readouterr().out).group(1)
    runs = tmp_path / "runs"
    holder = _holder(runs / "teachers" / teacher_id, str(runs / "students"), "1.5")
    try:
        assert main(["run", str(recipe), "--plain"]) == 0
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"{teacher_id} (being trained by pid {holder.pid} on " in err
    assert f"its teacher {teacher_id} is not trained yet" in err
    order = [m for m in DONE.findall(err)]
    assert len(order) == 3 and order[1] == teacher_id  # the teacherless student went first
    assert err.index("[Student]") < err.index("waiting for 2 run(s)") < err.index(f"({teacher_id}): done")


def test_a_run_finished_elsewhere_after_planning_is_not_trained_again(tiny_recipe, tmp_path,
                                                                       monkeypatch, capsys):
    """Another process finishes the teacher after this one planned the grid (while it checks
    the models): this process takes the finished teacher and trains only the students."""
    import shutil

    recipe = tiny_recipe()
    assert main(["run", str(recipe), "--plain", "--output", str(tmp_path / "elsewhere")]) == 0
    capsys.readouterr()
    check = runner.check_inputs

    def check_while_the_other_process_finishes(*args, **kwargs):
        check(*args, **kwargs)
        shutil.copytree(tmp_path / "elsewhere" / "teachers", tmp_path / "runs" / "teachers")

    monkeypatch.setattr(runner, "check_inputs", check_while_the_other_process_finishes)
    assert main(["run", str(recipe), "--plain"]) == 0
    err = capsys.readouterr().err
    assert "[ce] seed 0" in err and "done by another process" in err
    assert [m for m in DONE.findall(err) if m.startswith("t-")] == []
    assert "kdbench: 2 done, 1 skipped (already done)" in err
