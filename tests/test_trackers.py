"""Experiment trackers (kdbench/trackers.py, the kdbench_register_trackers hook): a tracker sees
every run's start, each epoch's metrics (the very numbers its record holds) and its end with
the run's status; one that raises is reported and switched off while the grid trains on; only
rank 0 tracks; a --tracker the registry does not know is one line and exit status 2. The shipped
TensorBoard tracker (plugins/trackers/tensorboard.py) is checked by reading its event files
back with TensorBoard's own EventAccumulator."""
from __future__ import annotations

import math

import pytest
from conftest import add_plugin, read_records

from kdbench.cli import main
from kdbench.trackers import TRACKERS_ENV, Tracker, Trackers

# The student alone and a diverging row (KD weight 1e30: a non-finite loss in the first step,
# as in test_resume), with the teacher: done and diverged runs, three runs in all.
SETS = [{"label": "Student", "methods": [{"name": "ce"}]},
        {"label": "Boom", "methods": [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 1e30}]}]


@pytest.fixture(autouse=True)
def no_trackers_after(monkeypatch):
    """`kdbench run --tracker` sets KDBENCH_TRACKERS for its children: gone after each test."""
    monkeypatch.setenv(TRACKERS_ENV, "")


class Recorder(Tracker):
    calls: list = []

    def __init__(self, params, output_dir):
        Recorder.calls.append(("built", str(output_dir)))

    def start(self, run):
        self.calls.append(("start", run.id, run.kind))

    def epoch(self, run, metrics):
        self.calls.append(("epoch", run.id, dict(metrics)))

    def end(self, run, status, result):
        self.calls.append(("end", run.id, status, result))


class Broken(Tracker):
    def __init__(self, params, output_dir):
        pass

    def epoch(self, run, metrics):
        raise RuntimeError("tracker bug")


def test_a_tracker_sees_every_run_and_a_broken_one_is_reported(tiny_recipe, tmp_path, monkeypatch, capsys):
    Recorder.calls = []
    add_plugin(monkeypatch, "tracker", "recorder", Recorder)
    add_plugin(monkeypatch, "tracker", "broken", Broken)
    recipe = tiny_recipe(method_sets=SETS)
    assert main(["run", str(recipe), "--plain", "--tracker", "broken", "--tracker", "recorder"]) == 0
    out = capsys.readouterr()
    records = read_records(tmp_path / "runs")
    assert {r["meta"].get("method_set", "teacher"): r["status"] for r in records.values()} == {
        "teacher": "done", "Student": "done", "Boom": "diverged"}
    # Reported once, with its error, and switched off: every run trained all the same.
    warnings = [ln for ln in (out.out + out.err).splitlines() if "tracker broken" in ln]
    assert len(warnings) == 1 and "failed in epoch()" in warnings[0] and "RuntimeError: tracker bug" in warnings[0]

    calls = Recorder.calls
    assert calls[0] == ("built", str(tmp_path / "runs")) and sum(c[0] == "built" for c in calls) == 1
    order = [c[1] for c in calls if c[0] == "start"]
    assert sorted(order) == sorted(records) and len(order) == len(set(order))
    for run_id in order:
        rec = records[run_id]
        mine = [c for c in calls[1:] if c[1] == run_id]
        assert mine[0] == ("start", run_id, rec["kind"])
        epochs = [c[2] for c in mine if c[0] == "epoch"]
        end = mine[-1]
        assert end[:3] == ("end", run_id, rec["status"])
        if rec["status"] == "done":
            # Every epoch's numbers, exactly as the record has them.
            assert epochs == [{k: v for k, v in e.items() if isinstance(v, (int, float))}
                              for e in rec["epochs"]]
            assert end[3] == {"final": rec["final"], "best": rec["best"]}
        else:  # diverged in its first epoch: no epoch was complete
            assert epochs == [] and end[3] == {}
        # start, epochs, end: nothing else, in this order, before the next run starts.
        first = calls.index(mine[0])
        assert calls[first: first + len(mine)] == mine


def test_only_rank_zero_tracks(monkeypatch):
    import torch.distributed as dist

    built = []
    add_plugin(monkeypatch, "tracker", "recorder", lambda params, out: built.append(out) or Tracker())
    from kdbench.registry import load_registry

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    trackers = Trackers(load_registry(), ".", print, options=["recorder"])

    class Spec:
        id, kind, describe, spec = "s-1", "student", "a run", {}

        def meta_dict(self):
            return {}

    with trackers.run(Spec(), ".") as session:
        assert session.on_epoch is None
    assert built == []
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    with trackers.run(Spec(), ".") as session:
        session.on_epoch({"epoch": 1, "train_loss": 0.5})
    assert len(built) == 1


def test_unknown_tracker_or_bad_parameter_is_one_line(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    for option, says in (("nope", "unknown experiment tracker 'nope'"),
                         ("tensorboard:flush_secs=0", "flush_secs"),
                         ("tensorboard:log_dir", "is not key=value")):
        assert main(["run", str(recipe), "--tracker", option]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kdbench: error: --tracker") and says in err[0]
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_tensorboard_event_files_hold_the_records_numbers(tiny_recipe, tmp_path):
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe()
    tb = tmp_path / "tb"
    assert main(["run", str(recipe), "--plain", "--tracker", f"tensorboard:log_dir={tb},flush_secs=1"]) == 0
    records = read_records(tmp_path / "runs")
    assert sorted(p.name for p in tb.iterdir()) == sorted(records)
    for run_id, rec in records.items():
        acc = EventAccumulator(str(tb / run_id), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for key, tag in (("test_top1", "top1/test"), ("train_loss", "loss/train"),
                         ("train_top1", "top1/train"), ("test_loss", "loss/test"), ("lr", "lr")):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == [e["epoch"] for e in rec["epochs"]]
            for event, epoch in zip(events, rec["epochs"]):  # stored as float32
                assert math.isclose(event.value, epoch[key], rel_tol=1e-6, abs_tol=1e-6)
        terms = sorted(k[5:] for k in rec["epochs"][0] if k.startswith("loss_"))
        assert sorted(t.split("/", 1)[1] for t in acc.Tags()["scalars"] if t.startswith("loss_terms/")) == terms
        final = acc.Scalars("result/final_top1")
        assert [(e.step, round(e.value, 4)) for e in final] == [(rec["final"]["epoch"], round(rec["final"]["top1"], 4))]
        status = acc.Tensors("status/text_summary")[0].tensor_proto.string_val
        assert status == [b"done"]


def test_no_tracker_by_default(monkeypatch, registry):
    monkeypatch.delenv(TRACKERS_ENV, raising=False)
    assert Trackers(registry, ".", print).options == []
    monkeypatch.setenv(TRACKERS_ENV, "tensorboard;tensorboard:log_dir=x")  # set by hand
    assert Trackers(registry, ".", print).options == ["tensorboard", "tensorboard:log_dir=x"]
