"""Exact resume after a crash or a stop signal, corrupt checkpoints, and failures that stay local.

The grid: one teacher with the margin-gated objective (its per-class pipeline is state: δ = −1
so every sample passes and the pipeline fills) and one CRD student (memory banks, negatives
from the global torch RNG), 2 epochs × 3 batches each, a checkpoint every 2 steps. A process
killed after step 5 resumes from the step-4 checkpoint, i.e. mid-epoch. The reference is the
same grid run once without interruption; every comparison is exact (epoch metrics and a sha256
of the final weights).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY_NET, kdbench_cmd, kdbench_env, read_records, run_kdbench, write_tiny_recipe
from kdbench.api import NoParams, StudentMethod
from kdbench.cli import main

CRD = [{"name": "ce", "weight": 0.1}, {"name": "crd", "nce_k": 8, "feat_dim": 16}]


def _write_recipe(path: Path, output: Path, methods: list[dict] = CRD, **top) -> Path:
    """The grid above: the tiny recipe, deterministic, a checkpoint every 2 steps, with the one
    teacher objective and one method set (``methods``), student epochs 2; ``top``: more
    top-level keys."""
    return write_tiny_recipe(
        path, name="resume", output=output,
        top={"deterministic": True, "checkpoint_every_steps": 2, **top},
        pairs=[{"teacher": TINY_NET, "student": TINY_NET}],
        teacher_objectives=[{"name": "margin_intra", "delta": -1.0, "pipeline_size": 4}],
        method_sets=[{"label": "CRD", "methods": methods}],
        reference=None, student_schedule={"epochs": 2, "milestones": [1]})


COMPARED = ("epochs", "final", "best", "weights_sha256")


def _assert_same(records: dict, reference: dict) -> None:
    assert records.keys() == reference.keys()
    for run_id, ref in reference.items():
        rec = records[run_id]
        assert rec["status"] == "done", rec.get("error")
        for key in COMPARED:
            assert rec[key] == ref[key], f"{run_id}: {key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The grid run once, uninterrupted (in this process)."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = _write_recipe(tmp / "resume.toml", tmp / "runs")
    assert main(["run", str(recipe), "--plain"]) == 0
    records = read_records(tmp / "runs")
    assert len(records) == 2
    for rec in records.values():
        assert rec["deterministic"] is True  # deterministic = true is recorded
        assert rec["trained_by"]["resumed_from"] is None
        assert not list((tmp / "runs").rglob("ckpt-*.pt")), "checkpoints are deleted once done"
    return {"records": records, "dir": tmp / "runs"}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_is_bit_identical(reference, tmp_path):
    """Each fresh run is SIGKILLed after step 5; the same command, run again, resumes it from
    its step-4 checkpoint (mid-epoch 2): teacher killed, resumed; student killed, resumed."""
    out = tmp_path / "runs"
    recipe = _write_recipe(tmp_path / "resume.toml", out)
    codes = []
    for _ in range(4):
        # Same intra-op thread count as this process: CPU results are bit-identical only then.
        env = kdbench_env(threads=torch.get_num_threads(), KDBENCH_TEST_KILL_AT_STEP="5")
        proc = run_kdbench("run", recipe, "--plain", env=env)
        codes.append(proc.returncode)
        assert "Traceback" not in proc.stderr, proc.stderr
        if proc.returncode == 0:
            break
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]
    records = read_records(out)
    _assert_same(records, reference["records"])
    for rec in records.values():
        assert rec["trained_by"]["resumed_from"] == {"epochs_done": 1, "batches_done": 1, "step": 4}
    assert not list(out.rglob("ckpt-*.pt"))


def _interrupt_and_resume(recipe: Path, monkeypatch, capsys, signame="TERM", omit="",
                          between=None) -> str:
    """In this process: the first run gets SIG<signame> after step 5 (the test hook), stops with a
    checkpoint and exit 128 + signal; then the same command again until done. Returns stderr."""
    monkeypatch.setenv("KDBENCH_TEST_KILL_AT_STEP", f"5:{signame}")
    if omit:
        monkeypatch.setenv("KDBENCH_TEST_CKPT_OMIT", omit)
    signum = getattr(signal, f"SIG{signame}")
    assert main(["run", str(recipe), "--plain"]) == 128 + signum
    err = capsys.readouterr().err
    assert f"got SIG{signame}" in err and "run the same command again to resume" in err
    if between is not None:
        between()
    for _ in range(3):
        code = main(["run", str(recipe), "--plain"])
        err += capsys.readouterr().err
        assert code in (0, 128 + signum)
        if code == 0:
            return err
    raise AssertionError("never finished")


def _with_cached_teacher(reference, tmp_path) -> Path:
    """A copy of the reference's teacher cache, so only the student trains."""
    out = tmp_path / "runs"
    shutil.copytree(reference["dir"] / "teachers", out / "teachers")
    return _write_recipe(tmp_path / "resume.toml", out)


@pytest.mark.parametrize("omit", ["", "buffers", "rng"])
def test_resume_detects_missing_state(reference, tmp_path, monkeypatch, capsys, omit):
    """Positive control (full checkpoints: identical) and negative controls: checkpoints without
    the module buffers (CRD's memory banks) or without the global RNG (CRD's negatives) give a
    different student, so the comparison above would catch a checkpoint missing either."""
    recipe = _with_cached_teacher(reference, tmp_path)
    _interrupt_and_resume(recipe, monkeypatch, capsys, omit=omit)
    records = read_records(tmp_path / "runs")
    student = next(r for r in records.values() if r["kind"] == "student")
    ref = reference["records"][student["id"]]
    assert student["trained_by"]["resumed_from"] == {"epochs_done": 1, "batches_done": 2, "step": 5}
    if omit:
        assert student["weights_sha256"] != ref["weights_sha256"]
        assert student["epochs"][-1] != ref["epochs"][-1]
    else:
        _assert_same(records, reference["records"])


@pytest.mark.parametrize("signame", ["INT", "USR1"])
def test_stop_signal_records_interrupted_and_resumes(reference, tmp_path, monkeypatch, capsys, signame):
    recipe = _with_cached_teacher(reference, tmp_path)
    out = tmp_path / "runs"

    def check_interrupted():
        student = next(r for r in read_records(out).values() if r["kind"] == "student")
        assert student["status"] == "interrupted"
        assert student["interrupted"] == {"signal": f"SIG{signame}", "epoch": 2, "step": 5}
        assert len(list(out.rglob("ckpt-*.pt"))) == 2  # the last two
        assert main(["run", str(recipe), "--dry-run"]) == 0  # and the plan says so
        plan = capsys.readouterr().out
        assert f"train  {student['id']}" in plan and "(interrupted: resumes from its last checkpoint)" in plan

    err = _interrupt_and_resume(recipe, monkeypatch, capsys, signame=signame, between=check_interrupted)
    assert "resuming from ckpt-000000005.pt" in err
    _assert_same(read_records(out), reference["records"])


@pytest.mark.slow
def test_external_sigterm_stops_cleanly_and_rerun_finishes(reference, tmp_path):
    """A real SIGTERM from outside while the teacher trains: exit 143 with a clear message,
    an interrupted record with a checkpoint; the same command again finishes identically."""
    out = tmp_path / "runs"
    recipe = _write_recipe(tmp_path / "resume.toml", out)
    proc = subprocess.Popen(kdbench_cmd("run", recipe, "--plain"), stderr=subprocess.PIPE, text=True,
                            env=kdbench_env(threads=torch.get_num_threads()))  # threads: as above
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "epoch 1/2" in line:  # the teacher is in its second epoch now
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    err = "".join(lines)
    assert proc.wait(timeout=600) == 128 + signal.SIGTERM, err
    assert "got SIGTERM" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    interrupted = [r for r in read_records(out).values() if r["status"] == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0]["interrupted"]["signal"] == "SIGTERM"
    assert list(out.rglob("ckpt-*.pt"))
    assert main(["run", str(recipe), "--plain"]) == 0
    _assert_same(read_records(out), reference["records"])


@pytest.mark.parametrize("damage", ["newest", "all"])
def test_corrupt_checkpoints_fall_back_with_a_warning(reference, tmp_path, monkeypatch, capsys, damage):
    """The newest checkpoint truncated: the previous one is used; every checkpoint bad: the run
    starts over. Either way a warning, no crash, and the same final result."""
    recipe = _with_cached_teacher(reference, tmp_path)
    out = tmp_path / "runs"

    def corrupt():
        ckpts = sorted(out.rglob("ckpt-*.pt"))
        assert [p.name for p in ckpts] == ["ckpt-000000004.pt", "ckpt-000000005.pt"]
        for p in ckpts[-1:] if damage == "newest" else ckpts:
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])

    err = _interrupt_and_resume(recipe, monkeypatch, capsys, between=corrupt)
    assert "ckpt-000000005.pt is unusable" in err
    if damage == "newest":
        assert "resuming from ckpt-000000004.pt" in err
    else:
        assert "no usable checkpoint" in err and "starting the run over" in err
    _assert_same(read_records(out), reference["records"])


# ------------------------------------------------------------------------------------------------
# Failures stay local
# ------------------------------------------------------------------------------------------------
class Explode(StudentMethod):
    """Raises in its step: a bug in one method must not stop the grid."""

    def __init__(self, params, setup):
        super().__init__()

    def forward(self, student, teacher, batch, extra):
        raise RuntimeError("boom from a test plugin")


def _add_plugin(monkeypatch, kind, name, factory):
    import kdbench.registry as registry
    from kdbench.registry import Plugin

    original = registry.load_registry

    def load(*args, **kwargs):
        reg = original(*args, **kwargs)
        reg.plugins[kind][name] = [Plugin(kind, name, factory, NoParams, "test", "kdbench-tests",
                                          "0", __name__)]
        return reg

    monkeypatch.setattr(registry, "load_registry", load)


FAILURES = """
[[method_sets]]
label = "Explode"
methods = [{ name = "explode" }]

[[method_sets]]
label = "Boom"
methods = [{ name = "ce", weight = 0.1 }, { name = "kd", weight = 1e30 }]
"""


def test_failed_and_diverged_runs_stay_local(tiny_recipe, tmp_path, monkeypatch, capsys):
    """One run raises, one diverges (KD weight 1e30: NaN after a step); the others finish; the
    summary lists them, exit status 1, the leaderboard marks the cells. A rerun retries the
    failed run only; --retry-diverged also trains the diverged one again."""
    _add_plugin(monkeypatch, "student_method", "explode", Explode)
    recipe = tiny_recipe(extra=FAILURES)
    runs = tmp_path / "runs"
    assert main(["run", str(recipe), "--plain"]) == 1
    err = capsys.readouterr().err
    records = {r["meta"].get("method_set", "teacher"): r for r in read_records(runs).values()}
    assert {k: r["status"] for k, r in records.items()} == {
        "teacher": "done", "Student": "done", "KD": "done", "Boom": "diverged", "Explode": "failed"}
    boom, explode = records["Boom"], records["Explode"]
    assert boom["diverged"]["epoch"] == 1 and boom["diverged"]["step"] >= 1
    assert explode["error"] == "RuntimeError: boom from a test plugin"
    assert "boom from a test plugin" in (runs / "students" / explode["id"] / "error.txt").read_text()
    assert "kdbench: 3 done, 0 skipped (already done), 1 failed, 1 diverged, 0 interrupted" in err
    assert f"failed: {explode['id']}" in err and f"diverged: {boom['id']}" in err

    assert main(["leaderboard", str(runs), "-o", str(tmp_path / "lb")]) == 0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    row = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "(1 diverged)" in row["Boom"] and "(1 failed)" in row["Explode"]

    assert main(["run", str(recipe), "--plain"]) == 1  # failed: retried (and fails again)
    assert "0 done, 3 skipped (already done), 1 failed, 0 diverged" in capsys.readouterr().err
    assert main(["run", str(recipe), "--plain", "--retry-diverged"]) == 1
    assert "0 done, 2 skipped (already done), 1 failed, 1 diverged" in capsys.readouterr().err

    assert main(["run", str(recipe), "--plain", "--fail-fast", "--retry-diverged"]) == 1
    assert "1 failed, 0 diverged" in capsys.readouterr().err  # stopped before Boom
