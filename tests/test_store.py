"""The run store and checkpoint files: a full disk leaves the previous good files intact with a
clear error; checkpoint files detect damage, keep the last two and restore every RNG."""
from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import kdbench.store as store
from kdbench.cli import main
from kdbench.engine.checkpoint import Checkpointer, capture_rng, decode, encode, restore_rng
from kdbench.store import RunStore, StoreError, atomic_write_bytes


def _disk_full_after(monkeypatch, nbytes: int, match: str = ""):
    """Writes to temp files of names containing ``match`` write ``nbytes`` bytes, then fail
    with ENOSPC (as a full disk does, midway)."""
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:nbytes])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        return HalfWriter(f) if match in os.path.basename(path) else f

    monkeypatch.setattr(store.os, "fdopen", fdopen)


def test_disk_full_while_writing_a_record_keeps_the_old_one(tmp_path, monkeypatch):
    runs = RunStore(tmp_path / "out", tmp_path / "out" / "teachers")
    path = runs.write_record("student", "s-1", {"status": "done", "final": {"top1": 50.0}})
    before = path.read_bytes()
    _disk_full_after(monkeypatch, 10)
    with pytest.raises(StoreError) as info:
        runs.write_record("student", "s-1", {"status": "failed", "error": "x" * 1000})
    msg = str(info.value)
    assert str(path) in msg and "No space left on device" in msg
    assert "previous version is intact" in msg and "free some disk space" in msg
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temp file left


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1])
    gen = torch.Generator().manual_seed(1)
    ck = Checkpointer(tmp_path)
    args = dict(modules=[model], optimizer=opt, scheduler=sched, epoch=1, batch=0,
                epoch_gen_state=gen.get_state(), epochs=[{"epoch": 1}], accum=None)
    ck.save(step=3, **args)
    good = (tmp_path / "ckpt-000000003.pt").read_bytes()
    _disk_full_after(monkeypatch, 100)
    with pytest.raises(StoreError, match="ckpt-000000004.pt: No space left on device"):
        ck.save(step=4, **args)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000003.pt"]
    assert (tmp_path / "ckpt-000000003.pt").read_bytes() == good
    assert decode(good)["step"] == 3


def test_disk_full_during_a_run_is_a_clean_error(tiny_recipe, tmp_path, monkeypatch, capsys):
    """Through the CLI: exit 2, one message naming the file, no traceback; the records of earlier
    runs are intact, and once there is space again the same command finishes the grid."""
    recipe = tiny_recipe(seeds=(0,))
    assert main(["run", str(recipe), "--plain"]) == 0
    records = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("record.json")}
    recipe = tiny_recipe(seeds=(0, 1))
    with monkeypatch.context() as m:
        _disk_full_after(m, 100, match="ckpt-")
        assert main(["run", str(recipe), "--plain"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdbench: error: cannot write ") and "ckpt-000000003.pt: No space left on device" in last
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in records} == records
    assert main(["run", str(recipe), "--plain"]) == 0
    assert "3 done, 2 skipped" in capsys.readouterr().err


def test_atomic_write_to_a_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=f"cannot write {blocker / 'sub' / 'record.json'}"):
        atomic_write_bytes(blocker / "sub" / "record.json", b"{}")


def test_result_files_are_readable_by_others(tmp_path):
    path = tmp_path / "record.json"
    atomic_write_bytes(path, b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------------
# Checkpoint files
# ------------------------------------------------------------------------------------------------
def test_checkpoint_file_detects_damage():
    data = encode({"format": 1, "x": torch.arange(4)})
    assert decode(data)["x"].tolist() == [0, 1, 2, 3]
    flipped = bytearray(data)
    flipped[-10] ^= 1
    for bad, why in ((data[:-7], "checksum"), (bytes(flipped), "checksum"), (b"PK\x03\x04junk", "header"),
                     (b"", "header")):
        with pytest.raises(ValueError, match=why):
            decode(bad)


def test_checkpoint_loads_weights_only_and_keeps_the_last_two(tmp_path):
    model = nn.BatchNorm1d(3)  # has buffers
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1, 2])
    gen = torch.Generator().manual_seed(0)
    ck = Checkpointer(tmp_path)
    for step in (1, 2, 3):
        model.scratch.fill_(step)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        ck.save(modules=[model], optimizer=opt, scheduler=sched, epoch=step, batch=0, step=step,
                epoch_gen_state=gen.get_state(), epochs=[], accum=None)
    assert [p.name for p in ck.paths()] == ["ckpt-000000003.pt", "ckpt-000000002.pt"]
    # weights_only: the payload is plain tensors and containers (decode uses weights_only=True).
    payload = (tmp_path / "ckpt-000000003.pt").read_bytes().partition(b"\n")[2]
    import io

    torch.load(io.BytesIO(payload), weights_only=True)

    fresh = nn.BatchNorm1d(3)
    fresh.register_buffer("scratch", torch.zeros(2), persistent=False)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, [1, 2])
    resume = ck.restore(modules=[fresh], optimizer=opt2, scheduler=sched2,
                        generator=torch.Generator(), device=torch.device("cpu"))
    assert resume.step == 3 and resume.epoch == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.scratch.tolist() == [3.0, 3.0]  # non-persistent buffers too
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_checkpoint_that_does_not_fit_leaves_the_fresh_state(tmp_path):
    """A checkpoint of another architecture fails to load half-way: the run starts over from
    its fresh state, not from a half-loaded one."""
    big = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 5))
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1])
    Checkpointer(tmp_path).save(modules=[big], optimizer=opt, scheduler=sched, epoch=1, batch=0,
                                step=1, epoch_gen_state=torch.Generator().get_state(), epochs=[],
                                accum=None)
    small = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    before = {k: v.clone() for k, v in small.state_dict().items()}
    opt2 = torch.optim.SGD(small.parameters(), lr=0.1)
    warnings = []
    resume = Checkpointer(tmp_path, warn=warnings.append).restore(
        modules=[small], optimizer=opt2, scheduler=torch.optim.lr_scheduler.MultiStepLR(opt2, [1]),
        generator=torch.Generator(), device=torch.device("cpu"))
    assert resume is None
    assert "unusable" in warnings[0] and "starting the run over" in warnings[-1]
    for k, v in small.state_dict().items():
        assert torch.equal(v, before[k])


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.rand(1)
    state = capture_rng()
    expected = (random.random(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(decode(encode({"format": 1, "rng": state}))["rng"])
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
