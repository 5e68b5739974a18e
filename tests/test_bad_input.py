"""Bad recipes and bad data: exit status 2, one clear message that names the file and the fix,
no traceback. Most cases run the CLI in this process (an exception escaping ``main`` would fail
the test just as a traceback would); two run it as a real subprocess."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import add_plugin, run_kdbench
from kdbench.api import KDModel, ModelOutput
from kdbench.cli import main


def _recipe(tiny_recipe, *edits: tuple[str, str], extra: str = "") -> Path:
    """The tiny test recipe with ``old -> new`` text replacements (each must apply)."""
    path = tiny_recipe(extra=extra)
    text = path.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def _fails(capsys, args, *needles: str) -> str:
    """``kdbench ARGS`` exits 2 with one 'kdbench: error:' message containing every needle."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("kdbench: error: ") and err.count("kdbench: error:") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


# ------------------------------------------------------------------------------------------------
# The recipe file itself
# ------------------------------------------------------------------------------------------------
def test_not_toml_empty_missing_and_folder(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = not [toml")
    _fails(capsys, ["run", str(bad)], str(bad), "not valid TOML")
    empty = tmp_path / "empty.toml"
    empty.write_text("\n  \n")
    _fails(capsys, ["run", str(empty)], str(empty), "empty", "recipes/smoke.toml")
    _fails(capsys, ["run", str(tmp_path / "missing.toml")], "missing.toml")
    _fails(capsys, ["validate", str(tmp_path)], str(tmp_path), "folder")


@pytest.mark.parametrize("where, edit, message", [
    ("top", ('name = "tiny"', 'name = "tiny"\noutptu = "x"'), "outptu: unknown key (did you mean 'output'?)"),
    ("dataset", ("num_classes = 4", "num_clases = 4"), "dataset.num_clases: unknown key for 'synthetic' (did you mean 'num_classes'?)"),
    ("pairs", ('label = "T→S"', 'lable = "T→S"'), "pairs[0].lable: unknown key (did you mean 'label'?)"),
    ("model", ('teacher = { name = "wrn_16_2", width_mult = 0.25 }',
               'teacher = { name = "wrn_16_2", widht_mult = 0.25 }'),
     "pairs[0].teacher.widht_mult: unknown key for 'wrn_16_2' (did you mean 'width_mult'?)"),
    ("objective", ('[[teacher_objectives]]\nname = "ce"', '[[teacher_objectives]]\nname = "ce"\nlamda = 1'),
     "teacher_objectives[0].lamda: unknown key for 'ce'"),
    ("method set", ('label = "KD"', 'labl = "KD"'), "method_sets[1].labl: unknown key (did you mean 'label'?)"),
    ("method", ('{ name = "kd", weight = 0.9 }', '{ name = "kd", weight = 0.9, temprature = 4 }'),
     "method_sets[1].methods[1].temprature: unknown key for 'kd' (did you mean 'temperature'?)"),
    ("schedule", ("[teacher_schedule]\nepochs = 2", "[teacher_schedule]\nepoch = 2"),
     "teacher_schedule.epoch: unknown key (did you mean 'epochs'?)"),
    ("reference", ('table = "Table 1"', 'tabel = "Table 1"'), "reference.tabel: unknown key (did you mean 'table'?)"),
])
def test_unknown_keys_at_every_level(tiny_recipe, capsys, where, edit, message):
    recipe = _recipe(tiny_recipe, edit)
    _fails(capsys, ["validate", str(recipe)], str(recipe), message, "line ")
    _fails(capsys, ["run", str(recipe)], message)


@pytest.mark.parametrize("edit, message", [
    (("[teacher_schedule]\nepochs = 2", '[teacher_schedule]\nepochs = "two"'), "teacher_schedule.epochs: expected an integer, got 'two'"),
    (("seeds = [0]", 'seeds = "0"'), "seeds: expected an array"),
    (('device = "cpu"', 'device = "cpu"\ndeterministic = "maybe"'), "deterministic: expected true or false"),
    (("[student_schedule]\nepochs = 1\nbatch_size = 16\nlr = 0.05", "[student_schedule]\nepochs = 1\nbatch_size = 16\nlr = \"fast\""),
     "student_schedule.lr: expected a number, got 'fast'"),
    (('{ name = "kd", weight = 0.9 }', '{ name = "kd", weight = 0.9, temperature = "hot" }'), "temperature: expected a number"),
    (('teacher = { name = "wrn_16_2", width_mult = 0.25 }', "teacher = 3"), "pairs[0].teacher"),
    (("[teacher_schedule]\nepochs = 2", "[teacher_schedule]\nepochs = 0"), "teacher_schedule.epochs: Input should be greater than 0"),
    (("[teacher_schedule]\nepochs = 2", "[teacher_schedule]\nepochs = -3"), "teacher_schedule.epochs"),
    (("batch_size = 16", "batch_size = 0"), "teacher_schedule.batch_size"),
    (("lr = 0.05", "lr = -0.1"), "teacher_schedule.lr: Input should be greater than 0"),
    (("lr = 0.05", "lr = 0"), "teacher_schedule.lr"),
    (('device = "cpu"', 'device = "cpu"\ncheckpoint_every_steps = 0'), "checkpoint_every_steps"),
    (('{ name = "kd", weight = 0.9 }', '{ name = "kd", weight = 0.9, temperature = -1 }'), "temperature: Input should be greater than 0"),
    (('{ name = "kd", weight = 0.9 }', '{ name = "kdd", weight = 0.9 }'), "unknown student method 'kdd' (did you mean 'kd'?)"),
    (('[dataset]\nname = "synthetic"', '[dataset]\nname = "synthetc"'), "unknown dataset 'synthetc' (did you mean 'synthetic'?)"),
    (('name = "ce"', 'name = "margin"'), "teacher_objectives[0].name: unknown teacher objective 'margin'"),
    (('student = { name = "wrn_16_2", width_mult = 0.25 }', 'student = { name = "wrn_16_3" }'), "unknown model 'wrn_16_3'"),
    (('device = "cpu"', 'device = "cuda:99"'), "device = 'cuda:99'"),
    (('device = "cpu"', 'device = "tpu"'), "device = 'tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_wrong_types_values_and_names(tiny_recipe, capsys, edit, message):
    recipe = _recipe(tiny_recipe, edit)
    _fails(capsys, ["run", str(recipe)], str(recipe), message)


def test_device_that_does_not_exist(tiny_recipe, capsys):
    recipe = tiny_recipe()
    _fails(capsys, ["run", str(recipe), "--device", "cuda:99"], "'cuda:99'")
    _fails(capsys, ["run", str(recipe), "--device", "tpu"], "'tpu'", "use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    _fails(capsys, ["run", str(recipe), "--checkpoint-every", "0"], "--checkpoint-every")
    if not torch.cuda.is_available():
        _fails(capsys, ["run", str(recipe), "--device", "cuda"], "no CUDA device is available")
        cuda = _recipe(tiny_recipe, ('device = "cpu"', 'device = "cuda"'))
        _fails(capsys, ["run", str(cuda)], str(cuda), "no CUDA device is available here")


# ------------------------------------------------------------------------------------------------
# Data that does not exist or is broken; nets that do not take the data
# ------------------------------------------------------------------------------------------------
def _dataset(tiny_recipe, file: str | None = None, **table) -> Path:
    """The tiny recipe (at ``file``) with [dataset] = ``table`` in place of the synthetic data."""
    tiny = dict.fromkeys(("num_classes", "train_per_class", "test_per_class", "image_size"))
    return tiny_recipe(file=file, dataset={**tiny, **table})


def test_dataset_root_that_does_not_exist(tiny_recipe, tmp_path, capsys):
    """A root folder that is missing is found when the recipe is validated; one that exists but
    lacks the dataset's files, by the plugin when the run loads it."""
    root = tmp_path / "nowhere"
    recipe = _dataset(tiny_recipe, name="cifar10", root=root)
    _fails(capsys, ["run", str(recipe)], f"dataset.root: dataset folder '{root.as_posix()}' does not exist",
           "set download = true")
    root.mkdir()
    _fails(capsys, ["run", str(recipe)], f"CIFAR-10 not found at {root / 'cifar-10-batches-py'}",
           "fix dataset.root")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("record.json"))


def test_cifar_folder_with_a_truncated_batch_file(tiny_recipe, tmp_path, capsys):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(good)
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])  # a cut-off download
    recipe = _dataset(tiny_recipe, name="cifar10", root=tmp_path / "cifar")
    _fails(capsys, ["run", str(recipe)], str(folder / "data_batch_3"), "truncated or corrupt",
           "download again")


def test_tiny_imagenet_without_val_annotations(tiny_recipe, tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    for wnid in ("n01", "n02"):
        (root / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (64, 64), (10, 20, 30)).save(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "val" / "images" / "val_0.JPEG")
    (root / "wnids.txt").write_text("n01\nn02\n")
    recipe = _dataset(tiny_recipe, name="tiny_imagenet", root=root, cache=False)
    _fails(capsys, ["run", str(recipe)], str(root / "val" / "val_annotations.txt"), "missing")


def test_nets_that_do_not_take_the_images(tiny_recipe, tmp_path, capsys):
    """1-channel images for 3-channel nets: found by a forward of two images before training."""
    recipe = _dataset(tiny_recipe, name="synthetic", num_classes=4, train_per_class=4, test_per_class=2,
                      image_size=16, channels=1)
    _fails(capsys, ["run", str(recipe)], str(recipe), "teacher of pair 'T→S': model 'wrn_16_2' "
           "(width_mult=0.25) cannot take the dataset's images (1 channels, 16x16)")
    assert not list((tmp_path / "runs").rglob("record.json"))


def test_timm_model_with_a_fixed_input_size(tiny_recipe, capsys):
    """A ViT built for 224x224 images paired with a 16x16 student on 16x16 data."""
    recipe = _recipe(tiny_recipe, ('teacher = { name = "wrn_16_2", width_mult = 0.25 }',
                                   'teacher = { name = "timm", model = "vit_tiny_patch16_224" }'))
    _fails(capsys, ["run", str(recipe)], str(recipe), "teacher of pair 'T→S': model 'timm' "
           "(model='vit_tiny_patch16_224') cannot take the dataset's images (3 channels, 16x16)",
           "Input height (16) doesn't match model (224)")


class Fixed32(KDModel):
    """A model that only takes 32x32 inputs (like a ViT with a fixed img_size): declares it."""

    input_size = 32

    def __init__(self, num_classes, params):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, num_classes)

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        return ModelOutput(logits, [x], [x], x.flatten(1))


class NonDeterministic(Fixed32):
    """Uses an op without a deterministic implementation (as some pooling and upsampling
    backward ops are on CUDA)."""

    input_size = None

    def __init__(self, num_classes, params):
        super().__init__(num_classes, params)
        self.fc = nn.Linear(3 * 16 * 16, num_classes)

    def forward(self, x):
        if torch.is_grad_enabled():  # put_ without accumulate has no deterministic version
            torch.zeros(2, device=x.device).put_(torch.tensor([0, 0], device=x.device),
                                                 torch.ones(2, device=x.device))
        return super().forward(x)


def _add_model(monkeypatch, name, factory):
    add_plugin(monkeypatch, "model", name, factory)


def test_deterministic_with_an_op_that_has_no_deterministic_implementation(tiny_recipe, monkeypatch,
                                                                            capsys):
    _add_model(monkeypatch, "nondet", NonDeterministic)
    recipe = _recipe(tiny_recipe, ('teacher = { name = "wrn_16_2", width_mult = 0.25 }',
                                   'teacher = { name = "nondet" }'),
                     ('device = "cpu"', 'device = "cpu"\ndeterministic = true'))
    _fails(capsys, ["run", str(recipe)], str(recipe), "teacher of pair 'T→S': model 'nondet': "
           "deterministic = true, but put_ does not have a deterministic implementation",
           "set deterministic = false")


def test_pair_whose_nets_need_another_input_size(tiny_recipe, monkeypatch, capsys):
    _add_model(monkeypatch, "fixed32", Fixed32)
    recipe = _recipe(tiny_recipe, ('student = { name = "wrn_16_2", width_mult = 0.25 }',
                                   'student = { name = "fixed32" }'))
    _fails(capsys, ["run", str(recipe)], str(recipe), "student of pair 'T→S': model 'fixed32' takes "
           "32x32 images, but the dataset 'synthetic' has 16x16 images")


# ------------------------------------------------------------------------------------------------
# The real process: status 2 and no traceback
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_subprocess_exit_2_without_traceback(tiny_recipe, tmp_path):
    bad = _recipe(tiny_recipe, ("batch_size = 16", "batch_size = -4"))
    # Its own file: both were tiny.toml once, the second overwrote the first, untested then.
    missing = _dataset(tiny_recipe, "missing.toml", name="cifar100", root=tmp_path / "no")
    for recipe in (bad, missing):
        proc = run_kdbench("run", recipe, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("kdbench: error: ") and "Traceback" not in proc.stderr
