"""DDP resume keeps each rank's RNG stream (issue 19, item 4): the checkpoint rank 0 writes holds
every rank's RNG state, and on resume each rank gets its own back. (Before, rank 0 saved its own
state and every rank resumed with it, so e.g. CRD's random negatives differed per rank after a
resume from what an uninterrupted run draws.) Two gloo ranks on the CPU."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdbench.engine.checkpoint import Checkpointer
from kdbench.engine.distributed import RankCheckpointer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1])
    return model, optimizer, scheduler, torch.Generator().manual_seed(0)


def _worker(rank, world, port, run_dir, out_dir, single_process_ckpt):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    warnings = []
    ckpt = RankCheckpointer(Path(run_dir), warn=warnings.append)
    model, optimizer, scheduler, gen = _state()
    torch.manual_seed(100 + rank)  # each rank's own stream, as the ranks' CUDA generators are
    if not single_process_ckpt:
        ckpt.save(modules=[model], optimizer=optimizer, scheduler=scheduler, epoch=1, batch=0, step=3,
                  epoch_gen_state=gen.get_state(), epochs=[], accum=None)
    dist.barrier()
    after_save = torch.rand(4)  # what this rank draws next in an uninterrupted run
    torch.manual_seed(999)  # the process restarts with some other state
    resume = ckpt.restore(modules=[model], optimizer=optimizer, scheduler=scheduler, generator=gen,
                          device=torch.device("cpu"))
    torch.save({"after_save": after_save, "after_resume": torch.rand(4), "resumed": resume is not None,
                "warnings": warnings, "files": sorted(p.name for p in Path(run_dir).iterdir())},
               Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")
def test_each_rank_resumes_its_own_rng_stream(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir(), out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(run_dir), str(out), False), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in range(2))
    assert r0["files"] == ["ckpt-000000003.pt"]  # one file, written by rank 0 only
    assert r0["resumed"] and r1["resumed"] and not r0["warnings"] and not r1["warnings"]
    assert torch.equal(r0["after_resume"], r0["after_save"])
    assert torch.equal(r1["after_resume"], r1["after_save"])
    assert not torch.equal(r1["after_resume"], r0["after_save"])  # not rank 0's stream


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")
def test_a_single_process_checkpoint_is_not_resumed_by_several_ranks(tmp_path):
    """A checkpoint holding one process's RNG cannot give each rank its own: every rank warns
    and starts over, identically (no rank silently reuses another's stream)."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir(), out.mkdir()
    model, optimizer, scheduler, gen = _state()
    Checkpointer(run_dir).save(modules=[model], optimizer=optimizer, scheduler=scheduler, epoch=1,
                               batch=0, step=3, epoch_gen_state=gen.get_state(), epochs=[], accum=None)
    mp.spawn(_worker, args=(2, _free_port(), str(run_dir), str(out), True), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(out / f"rank{r}.pt")
        assert not got["resumed"]
        assert any("one process's RNG state" in w for w in got["warnings"]), got["warnings"]
