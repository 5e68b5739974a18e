"""The CPU stand-in of benchmarks/gpu_check.sh: every stage of the GPU check at tiny sizes, with
bf16 autocast (what precision "auto" means on CUDA), so that a dtype, layout or cast crash in a
benchmark is found here before a GPU is lent. 2-3 minutes on 2 shared cores (123 s measured)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("epoch", "table1", "parity", "logit_cache", "epoch_compiled", "step", "augment")
# Every row of Table 1's CIFAR-100 column (recipes/cifar100_homogeneous.toml), per pair.
TABLE1_ROWS = ("Teacher (ce)", "Teacher (margin)", "Student", "KD [ce teacher]", "Ours [margin teacher]",
               "FitNet [ce teacher]", "RKD [ce teacher]", "CRD [ce teacher]", "OFD [ce teacher]",
               "ReviewKD [ce teacher]", "VID [ce teacher]", "MLLD [ce teacher]",
               "Ours+RKD [margin teacher]")
PAIRS = ("ResNet50→ResNet34", "WRN-40-2→WRN-16-2", "VGG13→VGG8")


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


@pytest.mark.slow
def test_gpu_check_cpu_stand_in(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu",
                           "--precision", "bf16"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert (out / "summary.md").exists(), proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, f"{summary[:4000]}\n--- log tail ---\n{log[-4000:]}"
    assert summary.startswith("# kdbench gpu_check: cpu")

    # The targets, in ONE table, first: the KD epoch at batch 64 (eager, compiled, the
    # reference) and the Table 1 GPU-hours.
    targets = section(summary, "Targets")
    assert summary.index("## Targets") < summary.index("## Stages")
    assert targets.count("\n| ") >= 6  # header + 5 rows
    for row in ("wrn_40_2->wrn_16_2 KD, batch 64, one 50k-image epoch: kdbench eager (the engine)",
                "wrn_40_2->wrn_16_2 KD, batch 64, one 50k-image epoch: kdbench compiled",
                "wrn_40_2->wrn_16_2 KD, batch 64: reference (PIL DataLoader",
                "Table 1, CIFAR-100 column"):
        assert row in targets, row
    assert re.search(r"\*\*[0-9.]+x\*\* the reference", targets), targets
    assert "CPU-hours (this CPU)" in targets
    assert "error" not in targets.lower()

    # Every stage ran and succeeded, and left its table.
    stages = section(summary, "Stages")
    for name in STAGES:
        assert f"| {name} | 0 |" in stages, name
        assert "|---" in section(summary, name), name

    # Table 1: every row of every pair measured, teachers included.
    table1 = section(summary, "table1")
    for pair in PAIRS:
        for row in TABLE1_ROWS:
            assert any(line.startswith(f"| {pair} |") and row in line for line in table1.splitlines()), \
                (pair, row)
    assert "PARTIAL" not in table1 and "**error**" not in table1

    # The engine's bf16 path checked for every plugin; the bf16 teacher cast happened.
    parity = section(summary, "parity")
    assert "cpu bf16 autocast" in parity and "0 failed" in parity
    assert "(teacher cast once)" in parity
    # The logit cache stage (it crashed under bf16 before the builders) and its exactness.
    cache = section(summary, "logit_cache")
    assert "teacher cast once" in cache and "**exact**" in cache
    # step.py names the layouts it ran.
    step = section(summary, "step")
    assert "channels_last nets + batches" in step and "contiguous nets + batches" in step


@pytest.mark.slow
def test_methods_benchmark_quick_mode_covers_every_method(tmp_path):
    """benchmarks/methods.py --quick (CPU, tiny nets, one step): a row without error for every
    registered student method, one more for each method with an initialisation stage and for each
    optimizer plugin (KD trained with it), KD the
    1.00 of the ratios. About 15 s of CPU (45 s wall on the shared 2-core machine)."""
    import json

    from kdbench.registry import load_registry

    out = tmp_path / "methods.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--quick", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    registry = load_registry()
    names = set(registry.names("student_method"))
    staged = {n for n in names if registry.find("student_method", n).factory.init_stage
              is not registry.find("student_method", "kd").factory.init_stage}
    assert staged == {"ab", "ft", "fsp"}
    optimizers = {f"kd [optimizer {n}]" for n in registry.names("optimizer")}
    assert optimizers == {"kd [optimizer dot]"}
    assert set(rows) == names | {f"{n} [init stage]" for n in staged} | optimizers
    # DOT trains the same nets and modules as KD (no extra parameters); its step holds one more
    # set of gradients (the distillation ones, until the task loss's backward).
    assert rows["kd [optimizer dot]"]["extra_params"] == rows["kd"]["extra_params"]
    assert not [m for m, r in rows.items() if "error" in r]
    assert rows["kd"]["time_ratio"] == 1.0 and rows["kd"]["mem_ratio"] == 1.0
    assert rows["ft"]["extra_params"] > rows["ft [init stage]"]["extra_params"] > 0  # translator + paraphraser / paraphraser
    assert "| ft [init stage] |" in proc.stdout
