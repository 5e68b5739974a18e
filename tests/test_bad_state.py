"""Bad state on disk (issue 14, items 7-10 and 12): an output that cannot be written, records
and teacher weights that are not what they should be, copies of runs, leftovers of killed
processes. Each case exits 2 with one line naming the file and the fix, or is repaired: the run
is trained again (bit-identical to the first time, the bad file kept aside) and the leaderboard
lists what it leaves out instead of dropping it."""
from __future__ import annotations

import copy
import html
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import kdbench_cmd, kdbench_env, read_records, run_kdbench
from kdbench.cli import main
from kdbench.engine.checkpoint import Checkpointer
from kdbench.engine.locks import RunLock
from kdbench.leaderboard import write_leaderboard
from kdbench.store import RunStore, StoreError, remove_stale_temp_files


def _fails(capsys, args, *needles: str) -> str:
    """``kdbench ARGS`` exits 2 with one 'kdbench: error:' line containing every needle."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("kdbench: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The tiny grid (1 teacher, 2 students) trained once: (recipe, runs folder, records)."""
    from conftest import write_tiny_recipe

    root = tmp_path_factory.mktemp("golden")
    recipe = write_tiny_recipe(root / "tiny.toml")
    assert main(["run", str(recipe), "--plain"]) == 0
    return recipe, root / "runs", read_records(root / "runs")


@pytest.fixture
def runs(golden, tmp_path):
    """A copy of the golden runs folder to damage: (recipe, runs folder)."""
    recipe, src, _ = golden
    dst = tmp_path / "runs"
    shutil.copytree(src, dst)
    return recipe, dst


def _kd(records: dict) -> str:
    return next(i for i, r in records.items() if r["kind"] == "student" and r["meta"]["method_set"] == "KD")


def _teacher(records: dict) -> str:
    return next(i for i, r in records.items() if r["kind"] == "teacher")


def _run(capsys, recipe, out, *extra) -> str:
    code = main(["run", str(recipe), "--plain", "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    return err


def _dry_run_line(capsys, recipe, out, run_id) -> str:
    """The line `kdbench run --dry-run` prints for the run."""
    assert main(["run", str(recipe), "--dry-run", "--output", str(out)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"  train  {run_id}")]
    return line


# ------------------------------------------------------------------------------------------------
# 7. An output that cannot be written: one line naming the folder and the key, before training
# ------------------------------------------------------------------------------------------------
def test_unwritable_output_is_one_line_naming_the_folder_and_the_key(tiny_recipe, tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe()
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    _fails(capsys, ["run", str(recipe), "--output", "/proc/kdbench-x"], "output folder /proc/kdbench-x",
           "choose a writable folder with --output")
    _fails(capsys, ["run", str(recipe), "--output", "/sys/kdbench-x"], "/sys/kdbench-x", "--output")
    _fails(capsys, ["run", str(recipe), "--output", str(afile)], f"output folder {afile}: it is a file",
           "--output")
    _fails(capsys, ["run", str(recipe), "--output", str(afile / "sub")], f"{afile} is a file, not a folder")
    in_recipe = tiny_recipe(name="proc", output="/proc/kdbench-x")
    _fails(capsys, ["run", str(in_recipe)], "/proc/kdbench-x", f"with output in {in_recipe}")
    cache = tiny_recipe(name="cache", top={"teacher_cache": afile.as_posix()})
    _fails(capsys, ["run", str(cache)], f"teacher folder {afile}: it is a file",
           f"with teacher_cache in {cache}")
    # a read-only file system (root may write anywhere else: simulated where the check writes)
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("kdbench.store.tempfile.mkstemp", read_only)
    _fails(capsys, ["run", str(recipe)], "output folder", "Read-only file system", "choose a writable folder")
    assert not list(tmp_path.rglob("record.json")), "nothing may train"


def test_a_run_lock_that_cannot_be_created_is_a_store_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match=re.escape(str(afile / "run" / ".lock"))):
        RunLock(afile / "run").try_acquire()


# ------------------------------------------------------------------------------------------------
# 8. Records that are not what they should be
# ------------------------------------------------------------------------------------------------
def _no_meta(rec):
    del rec["meta"]
    return json.dumps(rec)


def _final_null(rec):
    rec["final"] = None
    return json.dumps(rec)


BAD_RECORDS = {
    "not an object": (lambda rec: json.dumps([rec]), "it holds a JSON list, not an object"),
    "no meta": (_no_meta, "it has no 'meta'"),
    "final null": (_final_null, "a done record without a number in final.top1"),
    "truncated": (lambda rec: json.dumps(rec)[:300], "it is not valid JSON (truncated?)"),
    "empty": (lambda rec: "", "it is empty"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_is_listed_by_the_leaderboard_and_trained_again(runs, golden, case, capsys):
    recipe, out = runs
    records = golden[2]
    kd = _kd(records)
    damage, why = BAD_RECORDS[case]
    path = out / "students" / kd / "record.json"
    path.write_text(damage(json.loads(path.read_text())))

    write_leaderboard(out, out.parent / "lb", plot=False)
    err = capsys.readouterr().err
    md = (out.parent / "lb" / "leaderboard.md").read_text()
    assert f"left out {path}: {why}" in err and "Traceback" not in err
    assert f"`students/{kd}/record.json`: {why}" in md
    assert re.search(r"^\| KD \|", md, re.M) is None, "the bad record is not counted"
    page = (out.parent / "lb" / "index.html").read_text()
    assert f"<code>students/{kd}/record.json</code>: {html.escape(why)}" in page  # and on the page

    assert f"(again, its bad files set aside first: {path}: {why}" in _dry_run_line(capsys, recipe, out, kd)
    err = _run(capsys, recipe, out)
    assert f"{path}: {why}" in err and "training it again" in err
    (aside,) = path.parent.glob("record.json.corrupt-*")
    assert aside.read_text() == damage(copy.deepcopy(records[kd]))
    rec = json.loads(path.read_text())
    assert rec["status"] == "done" and rec["weights_sha256"] == records[kd]["weights_sha256"]
    assert _run(capsys, recipe, out).count("training it again") == 0  # repaired once, then done


def test_a_folder_of_bad_records_only_names_them(runs, golden):
    _, out = runs
    for p in (out / "students").glob("*/record.json"):
        p.write_text("{")
    from kdbench.api import UserError

    with pytest.raises(UserError, match=r"no student records found \(2 record\(s\) that cannot be used: .*"
                                        r"record\.json: it is not valid JSON"):
        write_leaderboard(out, out.parent / "lb", plot=False)


# ------------------------------------------------------------------------------------------------
# 9. Teacher weights: truncated, swapped, deleted
# ------------------------------------------------------------------------------------------------
def _swap(model_pt: Path) -> None:
    """Replace the weights with other ones (as if another teacher's file were copied in)."""
    state = torch.load(model_pt, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1
    torch.save(state, model_pt)


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(p.read_bytes()[:5000]), "cannot be loaded (truncated or corrupt"),
    (_swap, "does not hold the recorded weights (weights_sha256 differs"),
])
def test_bad_teacher_weights_are_never_used_the_teacher_is_trained_again(runs, golden, capsys, damage, why):
    recipe, out = runs
    records = golden[2]
    tid, kd = _teacher(records), _kd(records)
    model_pt = out / "teachers" / tid / "model.pt"
    damage(model_pt)
    store = RunStore(out, out / "teachers")
    assert store.status("teacher", tid) is None  # not done: its students cannot use it
    (out / "students" / kd / "record.json").unlink()  # a student that needs it

    assert f"its weights file {model_pt} {why}" in _dry_run_line(capsys, recipe, out, tid)
    err = _run(capsys, recipe, out)
    assert f"its weights file {model_pt} {why}" in err and "training it again" in err
    assert len(list(model_pt.parent.glob("model.pt.corrupt-*"))) == 1
    assert len(list(model_pt.parent.glob("record.json.corrupt-*"))) == 1
    now = read_records(out)
    assert now[tid]["weights_sha256"] == records[tid]["weights_sha256"]
    assert now[kd]["weights_sha256"] == records[kd]["weights_sha256"]


def test_weights_that_go_bad_after_the_check_name_the_file_when_loaded(tmp_path):
    store = RunStore(tmp_path, tmp_path / "teachers")
    path = store.run_dir("teacher", "t-x") / "model.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*run the same command again"):
        store.load_weights("t-x", torch.device("cpu"))


def test_a_deleted_teacher_is_said_missing_and_trained_again_when_asked(runs, golden, capsys):
    recipe, out = runs
    records = golden[2]
    tid, kd = _teacher(records), _kd(records)
    shutil.rmtree(out / "teachers" / tid)
    write_leaderboard(out, out.parent / "lb", plot=False)
    md = (out.parent / "lb" / "leaderboard.md").read_text()
    assert re.search(r"^\| Teacher \(ce\) \|", md, re.M) is None
    assert f"{tid} (pair T→S, objective ce): no usable record" in md
    assert f"--run-id {tid}` trains it again" in md
    _run(capsys, recipe, out, "--run-id", tid)
    assert read_records(out, "teachers")[tid]["weights_sha256"] == records[tid]["weights_sha256"]
    write_leaderboard(out, out.parent / "lb", plot=False)
    md = (out.parent / "lb" / "leaderboard.md").read_text()
    assert re.search(r"^\| Teacher \(ce\) \|", md, re.M) and "no usable record" not in md
    # and when a student needs it, without being asked
    (out / "teachers" / tid / "model.pt").unlink()  # the record stays: the plan says why
    (out / "students" / kd / "record.json").unlink()
    assert _dry_run_line(capsys, recipe, out, tid).endswith(
        f"(again: its weights file {out / 'teachers' / tid / 'model.pt'} is missing)")
    _run(capsys, recipe, out)
    assert read_records(out, "teachers")[tid]["weights_sha256"] == records[tid]["weights_sha256"]


# ------------------------------------------------------------------------------------------------
# 10. Wrong n: copies of a run are one run
# ------------------------------------------------------------------------------------------------
def test_one_run_id_in_several_folders_is_counted_once(golden, tmp_path):
    _, src, records = golden
    for copy in ("a", "b"):
        shutil.copytree(src, tmp_path / "parent" / copy)
    write_leaderboard(tmp_path / "parent", tmp_path / "lb", plot=False)
    import pandas as pd

    csv = pd.read_csv(tmp_path / "lb" / "leaderboard.csv")
    assert set(csv["n"]) == {1}, csv[["row", "n"]]
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "Run ids found in several folders" in md and f"{_kd(records)}: 2 records" in md


# ------------------------------------------------------------------------------------------------
# 12. Leftovers of killed processes; labels with a `|`; checkpoint-like folders
# ------------------------------------------------------------------------------------------------
def test_checkpoints_left_by_a_kill_after_the_record_are_removed_by_a_later_run(runs, golden, capsys):
    recipe, out = runs
    kd, tid = _kd(golden[2]), _teacher(golden[2])
    left = [out / "students" / kd / "ckpt-000000003.pt", out / "students" / kd / "init-x" / "ckpt-000000001.pt",
            out / "teachers" / tid / "ckpt-000000006.pt"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"KDBCKPT1 left behind")
    err = _run(capsys, recipe, out)
    assert not any(p.exists() for p in left), err
    assert f"({kd}): removed the checkpoints left behind" in err
    assert read_records(out) == golden[2]  # nothing retrained


def test_stale_temp_files_are_removed_but_not_a_live_writers(runs, golden, capsys, tmp_path):
    recipe, out = runs
    kd = _kd(golden[2])
    folder = out / "students" / kd
    (folder / "record.json").unlink()
    stale, live = folder / ".record.json.abc123.tmp", folder / ".record.json.def456.tmp"
    stale.write_text("half a record")
    live.write_text("being written")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    _run(capsys, recipe, out)
    assert not stale.exists() and live.exists()
    # the function alone, in a nested folder (an initialisation stage's checkpoints)
    nested = tmp_path / "run" / "init-x" / ".ckpt-000000001.pt.x.tmp"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"x")
    os.utime(nested, (an_hour_ago, an_hour_ago))
    assert remove_stale_temp_files(tmp_path / "run") == [nested] and not nested.exists()


def test_a_folder_named_like_a_checkpoint_is_left_alone(tmp_path):
    ckpt = Checkpointer(tmp_path)
    (tmp_path / "ckpt-000000001.pt").mkdir()
    (tmp_path / "ckpt-000000002.pt").write_bytes(b"x")
    assert ckpt.paths() == [tmp_path / "ckpt-000000002.pt"]
    ckpt.clear()
    assert (tmp_path / "ckpt-000000001.pt").is_dir() and not (tmp_path / "ckpt-000000002.pt").exists()


def test_a_pipe_in_a_label_does_not_break_the_markdown_table(runs, golden):
    _, out = runs
    for p in out.rglob("record.json"):
        rec = json.loads(p.read_text())
        rec["meta"]["pair"] = "T|S"
        if rec["kind"] == "student":
            rec["meta"]["method_set"] += " | T=4"
        p.write_text(json.dumps(rec))
    write_leaderboard(out, out.parent / "lb", plot=False)
    md = (out.parent / "lb" / "leaderboard.md").read_text()
    assert r"| KD \| T=4 |" in md and r"| Method | T\|S |" in md
    tables = [block.splitlines() for block in re.findall(r"(?:^\|.*\n)+", md, re.M)]
    assert len(tables) >= 1 and tables[0][0].startswith("| Method |")
    for table in tables:  # every row of a table has its header's number of cells
        widths = {len(re.split(r"(?<!\\)\|", ln)) for ln in table}
        assert len(widths) == 1, table
    assert len(re.split(r"(?<!\\)\|", tables[0][0])) == 4  # Method and one column: T|S


def test_a_killed_attempt_is_counted(tiny_recipe, tmp_path):
    """SIGKILL in the first run's third step: it wrote no record, yet the record of the run
    that finishes it says attempt 2."""
    recipe = tiny_recipe()
    killed = run_kdbench("run", recipe, "--plain", env=kdbench_env(KDBENCH_TEST_KILL_AT_STEP=3))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (teacher_dir,) = (tmp_path / "runs" / "teachers").iterdir()
    assert not (teacher_dir / "record.json").exists() and (teacher_dir / "attempts").read_text() == "1\n"
    done = run_kdbench("run", recipe, "--plain")
    assert done.returncode == 0, done.stderr
    teacher = read_records(tmp_path / "runs", "teachers")[teacher_dir.name]
    assert teacher["trained_by"]["attempt"] == 2
    assert all(r["trained_by"]["attempt"] == 1 for r in read_records(tmp_path / "runs", "students").values())


def test_ctrl_c_while_starting_up_is_one_line_and_exit_130(tiny_recipe):
    """SIGINT while kdbench is still importing torch (its first second or so).

    The child starts with SIGINT at its default, as under a terminal: a suite started in the
    background (``cmd &`` in a script) passes SIGINT on ignored, and kdbench keeps an ignored
    SIGINT ignored (checked last)."""
    recipe = tiny_recipe()

    def start(sigint=signal.SIG_DFL):
        return subprocess.Popen(kdbench_cmd("run", recipe), env=kdbench_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))

    for delay in (0.3, 0.9):
        proc = start()
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and err == "kdbench: interrupted\n", (delay, proc.returncode, err)
    proc = start(signal.SIG_IGN)  # a background job: Ctrl-C is not for it
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "kdbench: interrupted" not in err and "3 done" in err, err
