import os

import pytest
import torch

from kdbench.registry import ONLY_DISTS_ENV, load_registry

# Tests see only the plugins of the kdbench distribution itself (plus whatever a test adds):
# nothing the developer happens to have installed can leak in.
os.environ.setdefault("KDBENCH_ONLY_DISTS", "kdbench")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_RECIPE = """
name = "{name}"
output = "{output}"
device = "cpu"
seeds = {seeds}

[dataset]
name = "synthetic"
num_classes = 4
train_per_class = 12
test_per_class = 6
image_size = 16

[[pairs]]
teacher = {{ name = "wrn_16_2", width_mult = 0.25 }}
student = {{ name = "wrn_16_2", width_mult = 0.25 }}
label = "T→S"
ref_teacher = "WRN-40-2"
ref_student = "WRN-16-2"

[[teacher_objectives]]
name = "ce"
ref_teacher = true

[[method_sets]]
label = "Student"
ref_method = "student"
methods = [{{ name = "ce" }}]

[[method_sets]]
label = "KD"
ref_method = "KD"
methods = [{{ name = "ce", weight = 0.1 }}, {{ name = "kd", weight = 0.9 }}]
{extra}
[reference]
table = "Table 1"
dataset = "CIFAR-100"

[teacher_schedule]
epochs = 2
batch_size = 16
lr = 0.05
milestones = [1]

[student_schedule]
epochs = 1
batch_size = 16
lr = 0.05
"""


def builtin_registry():
    """The registry of kdbench's own plugins, whatever else is installed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ONLY_DISTS_ENV, "kdbench")
        return load_registry()


@pytest.fixture(scope="session")
def registry():
    reg = builtin_registry()
    assert not reg.broken, reg.broken
    return reg


@pytest.fixture
def tiny_recipe(tmp_path):
    def make(seeds=(0,), extra="", name="tiny"):
        path = tmp_path / f"{name}.toml"
        path.write_text(TINY_RECIPE.format(name=name, output=(tmp_path / "runs").as_posix(),
                                           seeds=list(seeds), extra=extra))
        return path
    return make
