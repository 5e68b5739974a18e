"""A refactor keeps results: the smoke recipe's grid, trained now, has the run ids, final top-1
and weights (``weights_sha256``) that main had before the engine-seams refactor (issue 12).

The values below were recorded at commit f928047 (before the refactor), on this project's CPU
machine (AMD EPYC, torch 2.14.1), with one thread:

    OMP_NUM_THREADS=1 KDBENCH_ONLY_DISTS=kdbench kdbench run recipes/smoke.toml --threads 1 \
        --output /tmp/base/smoke1

One run id changed on purpose since: the CRD row's (issue 18 made negatives from other classes
CRD's default, as the reference loader draws them): it is checked to be the only new id.
Issue 15 changed the intra-class and margin teachers' ids on purpose (the default embedding's
resolved name "pooled" became "pooled_normalized"; the margin pipeline re-encodes on BatchNorm
running statistics and no longer forwards the queued second view): their two teachers and the
three students distilled from them have new ids, recorded below from the same command (the
CE-teacher runs kept their ids and bit-identical weights; the intra-class teacher and its
student have exactly their old weights under the new ids: only the name changed). Their ids
changed once more, weights equal, when both objectives declared ``revision = 1``. The DOT row
(KD trained with the DOT optimizer) was added to the recipe later: its run is new, and the
change to the shared training step that came with it left every other id and weight as here.

Bit-identity holds only for the same torch build, CPU model and thread count (README, "What a run
writes"); on another machine the test says so instead of comparing numbers that cannot match.
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECORDED_WITH = {"torch": "2.14.1", "cpu": "AMD EPYC"}

# run id -> (weights_sha256, final top-1)
RECORDED = {
    "s-0bc415587972ca1f": ("2449ed3f207a9b8ae30634b6a86d980539b64ffa2441a3244907955977f0ea39", 6.25),
    "s-1d92b10c51e67810": ("22e9e970278cbaadbff7a7a440af43bb423fdca3e822f6e336db2039658b8c94", 12.5),
    "s-3c30b20b0641589b": ("5195e6cef7a6a82151723cc0b3acb4840f317a8253e26a2a7dc74c46f4c45b6d", 19.791666666666668),
    "s-3c709002af005546": ("12d65047ee11df64f74763b94049224d0d040526258ad5c2d5225a648d16ec25", 19.791666666666668),
    "s-7a41d20e10c40e06": ("8657380d08b81fe929979a55550aca2f12eb25394b32f009e70ed6647bb4a0f8", 18.75),
    "s-cec749ca053026a0": ("7626e87d2c2764dd3723635ef3292822151f504c99f1d72c102142e3b20ef1fe", 22.916666666666668),
    "s-dec5abd529f8d94d": ("a6131afef36e26736f23783a2de82d5a75f871ad9b262517b0380796fb6c6898", 18.75),
    "s-ed1dae5616d9ba62": ("48c58669b9c3687c3c3138cf4c2686eac0317b6433374a8671413aed10b5afd3", 12.5),
    "t-3616aca91737a35e": ("86a7e81e51a7bfdefc0775171cf2aaa6ecd63a2b40531572d965ca01f5e4b64d", 18.75),
    # since issue 15 (see the module docstring):
    "s-024c3a997f813444": ("7925edd386dcda5a76d60571871685a8f3c77e51eea6e471ace6f18097fe1653", 12.5),
    "s-6424085d9db6c263": ("968bac80ad8a28a9f86945290572aab1e3d68aab82e3d3819740281e3322ea7a", 12.5),
    "s-ade86e87a25c717e": ("564f1e90724327885377850422fc22ea5ad35e1e497bd98f234087273e095559", 12.5),
    "t-f397475dea5455b3": ("e252c209859b0f2264ba6f70f685f3620a0651a331d548fbbbb9279226045922", 16.666666666666668),
    "t-95d4f039096ff5e6": ("270eb579b6ace04a50e3ba88717896cb9a8329d1cec7861a77913625372c4f9c", 16.666666666666668),
}
CHANGED_ON_PURPOSE = {"CRD": "s-8637d5bb4d74ed8d"}  # method set -> its run id before
ADDED = {"DOT"}  # method sets added to the recipe since (new runs; the others keep theirs)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@pytest.mark.slow
def test_smoke_grid_has_the_run_ids_and_weights_main_had(tmp_path):
    here = {"torch": torch.__version__.split("+")[0], "cpu": _cpu_model()}
    if here["torch"] != RECORDED_WITH["torch"] or not here["cpu"].startswith(RECORDED_WITH["cpu"]):
        pytest.skip(f"values recorded with {RECORDED_WITH}, this machine has {here}: float "
                    "results are only bit-identical on the same torch build and CPU model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDBENCH_ONLY_DISTS": "kdbench"}
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "kdbench", "run", str(ROOT / "recipes" / "smoke.toml"),
                           "--threads", "1", "--plain", "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/*/record.json")}
    new = {rec["meta"]["method_set"]: run_id for run_id, rec in records.items() if run_id not in RECORDED}
    assert set(records) >= set(RECORDED)  # the same run ids
    assert set(new) == set(CHANGED_ON_PURPOSE) | ADDED and all(new[k] != v for k, v in CHANGED_ON_PURPOSE.items())
    for run_id, (sha, top1) in RECORDED.items():
        rec = records[run_id]
        assert rec["status"] == "done", run_id
        assert rec["weights_sha256"] == sha, f"{run_id} ({rec['meta'].get('method_set') or rec['meta'].get('objective')}): weights changed"
        assert rec["final"]["top1"] == top1, run_id
