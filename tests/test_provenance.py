"""Provenance in every record: enough to tell why two runs of the same spec differ (thread
count, CPU model, CUDA/cuDNN versions, GPU name), with the older keys unchanged."""
from __future__ import annotations

import json
import platform

import pytest
import torch

from kdbench import store
from kdbench.cli import main
from kdbench.store import provenance


@pytest.fixture
def one_thread():
    """torch at 1 intra-op thread (the suite runs at 2), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(before)


def test_record_holds_thread_count_and_cpu_model(tiny_recipe, tmp_path, one_thread):
    recipe = tiny_recipe()
    assert main(["run", str(recipe), "--plain"]) == 0
    runs = tmp_path / "runs"
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("*/*/record.json"))]
    folders = sorted(p.parent.parent.name for p in runs.glob("*/*/record.json"))
    assert folders == ["students", "students", "teachers"]  # Student and KD, one ce teacher
    for rec in records:
        prov = rec["provenance"]
        assert prov["threads"] == one_thread == torch.get_num_threads()
        assert isinstance(prov["cpu"], str) and prov["cpu"].strip()
        # The older keys keep their meaning.
        assert prov["device"] == (platform.processor() or platform.machine() or "cpu")
        assert prov["torch"] == torch.__version__
        assert prov["cuda"] == torch.version.cuda
        assert prov["gpu"] is None  # a CPU run
        if not torch.cuda.is_available():
            assert prov["cudnn"] is None


def test_cpu_model_read_from_cpuinfo_with_fallback(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\n"
                    "model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\n\n"
                    "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\n")
    assert store._cpu_model(str(info)) == "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"
    info.write_text("processor\t: 0\nBogoMIPS\t: 108.00\nModel\t\t: Raspberry Pi 4 Model B\n")
    assert store._cpu_model(str(info)) == "Raspberry Pi 4 Model B"
    monkeypatch.setattr(platform, "processor", lambda: "arm64")
    assert store._cpu_model(str(tmp_path / "no-such-file")) == "arm64"
    info.write_text("processor\t: 0\nBogoMIPS\t: 108.00\n")  # no model line at all
    assert store._cpu_model(str(info)) == "arm64"
    info.write_text("processor\t: 0\nmodel\t\t: 85\n")  # x86's model number is no name
    assert store._cpu_model(str(info)) == "arm64"


def test_cuda_device_records_gpu_and_cudnn(monkeypatch, one_thread):
    """The CUDA branch, with torch's CUDA queries stood in for (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    prov = provenance(torch.device("cuda", 0), {"kdbench": "0.1.0"})
    assert prov["gpu"] == prov["device"] == "NVIDIA Test GPU"
    assert prov["cudnn"] == 91002 and prov["cuda"] == torch.version.cuda
    assert prov["threads"] == 1 and prov["plugins"] == {"kdbench": "0.1.0"}
    cpu = provenance(torch.device("cpu"), {})
    assert cpu["gpu"] is None and cpu["cudnn"] == 91002  # CUDA is there, the run is not on it


def test_git_state_is_the_one_the_process_started_with(tmp_path):
    """A commit made in the checkout while a grid trains does not change what later records
    say trained them; uncommitted changes to tracked files are said (git_dirty)."""
    import subprocess

    repo = tmp_path / "checkout"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                               *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "first")
    first = git("rev-parse", "HEAD")
    assert store.git_state(repo) == (first, False)
    (repo / "a.py").write_text("x = 2\n")
    git("commit", "-qam", "second")  # while the grid trains
    assert store.git_state(repo) == (first, False)  # still the code it started with
    store._GIT_STATE.clear()  # a new process
    assert store.git_state(repo) == (git("rev-parse", "HEAD"), False)
    (repo / "a.py").write_text("x = 3\n")  # edited, not committed
    store._GIT_STATE.clear()
    assert store.git_state(repo)[1] is True
    store._GIT_STATE.clear()
    assert store.git_state(tmp_path / "not-a-checkout") == (None, None)


def test_a_record_names_the_commit_and_whether_it_was_changed(tiny_recipe, tmp_path):
    assert main(["run", str(tiny_recipe()), "--plain"]) == 0
    for p in (tmp_path / "runs").glob("*/*/record.json"):
        prov = json.loads(p.read_text())["provenance"]
        assert (prov["git_commit"], prov["git_dirty"]) == store.git_state()
