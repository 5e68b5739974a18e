"""FT (Kim et al. 2018): the factor loss and the paraphraser's reconstruction loss vs plain
loops and a hand value, the paraphraser's and translator's layers, what trains in each stage
(init: the paraphraser alone; main: the translator and the student's features, never the
paraphraser, the classifier or the teacher), state, errors, and real runs: the init stage
before the main schedule, and a run stopped inside the stage resuming bit-identical.

Tolerances: hand value rel 1e-12 (float64); the plain loops rel 1e-9 on float64 factors, rel 1e-5
on the float32 modules' outputs.
"""
from __future__ import annotations

import io
import math
import shutil
import signal

import numpy as np
import pytest
import torch
from torch import nn

from kdbench.api import ModelOutput, UserError
from kdbench_plugins.students.ft import FT, FTParams, ft_loss
from stage_runs import pair_outputs, run as run_recipe, stage_recipe, student_record
from stand_ins import adaptive_avg_pool_np, batch, make_pair, make_setup, setup_from_nets

torch.set_num_threads(1)


def factor_loop(f, p1):
    """(B, H·W): at each position the channel mean of f^p1, divided by its L2 norm (floor 1e-12)."""
    b, c, h, w = f.shape
    out = np.zeros((b, h * w))
    for n in range(b):
        q = np.array([sum(f[n, ch, y, x] ** p1 for ch in range(c)) / c for y in range(h) for x in range(w)])
        out[n] = q / max(math.sqrt(float((q ** 2).sum())), 1e-12)
    return out


def ft_loop(fs, ft, p1=2.0, p2=1):
    h, w = min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3])
    fs = adaptive_avg_pool_np(fs, h, w) if fs.shape[2:] != (h, w) else fs
    ft = adaptive_avg_pool_np(ft, h, w) if ft.shape[2:] != (h, w) else ft
    d = factor_loop(fs, p1) - factor_loop(ft, p1)
    return float(np.abs(d).mean()) if p2 == 1 else float((d ** p2).mean())


def test_class_attributes_and_defaults():
    assert FT.default_weight == 200.0  # run_cifar_distill.sh -b 200
    assert FT.needs_teacher and FT.views == () and not FT.teacher_train_mode
    p = FTParams()
    assert (p.rate, p.p1, p.p2, p.init_epochs, p.init_lr) == (0.5, 2.0, 1, 30, 0.01)


def test_hand_value():
    # Factors of one channel at two positions: student (1, 1) -> φ = (1, 1)/√2; teacher (1, 0)
    # -> φ = (1, 0); mean |Δ| = ((1 − 1/√2) + 1/√2) / 2 = 1/2
    fs = torch.tensor([1.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2)
    ft = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    assert ft_loss(fs, ft, 2.0, 1).item() == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("p1,p2", [(2.0, 1), (1.0, 2)])
@pytest.mark.parametrize("geometry", ["same", "teacher_larger", "student_larger"])
def test_factor_loss_matches_a_plain_loop(p1, p2, geometry):
    gen = torch.Generator().manual_seed(0)
    t_hw = {"same": 4, "teacher_larger": 8, "student_larger": 2}[geometry]
    fs = torch.rand(3, 4, 4, 4, generator=gen, dtype=torch.float64)
    ft = torch.rand(3, 4, t_hw, t_hw, generator=gen, dtype=torch.float64)
    got = ft_loss(fs, ft, p1, p2).item()
    want = ft_loop(fs.numpy(), ft.numpy(), p1, p2)
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-9)


def _nets(seed=1):
    student, teacher = make_pair(seed=seed, s_chans=(3, 4), t_chans=(5, 6))
    return student, teacher, FT(FTParams(), setup_from_nets(student, teacher))


def test_modules_follow_the_reference_layers():
    _, _, method = _nets()
    convs = lambda seq: [(m.in_channels, m.out_channels, type(m)) for m in seq if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]  # noqa: E731
    c, k = 6, 3  # teacher's last stage, int(0.5 · 6)
    assert convs(method.paraphraser.encoder) == [(c, c, nn.Conv2d), (c, k, nn.Conv2d), (k, k, nn.Conv2d)]
    t = nn.ConvTranspose2d
    assert convs(method.paraphraser.decoder) == [(k, k, t), (k, c, t), (c, c, t)]
    assert convs(method.translator) == [(4, 4, nn.Conv2d), (4, k, nn.Conv2d), (k, k, nn.Conv2d)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in method.paraphraser.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in method.translator.modules()) == 3
    slopes = {m.negative_slope for m in method.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}


def test_main_loss_and_gradients():
    student, teacher, method = _nets(2)
    x = torch.randn(4, 3, 8, 8)
    method.train()
    s_out, t_out = pair_outputs(student, teacher, x)
    terms = method(s_out, t_out, batch(x), {})
    assert set(terms) == {"ft"}
    fs = method.translator(s_out.feats[-1]).detach().numpy().astype(np.float64)
    ft = method.paraphraser.encoder(t_out.feats[-1]).detach().numpy().astype(np.float64)
    assert terms["ft"].item() == pytest.approx(ft_loop(fs, ft), rel=1e-5)
    terms["ft"].backward()
    learning = [(n, p) for n, p in student.named_parameters() if not n.startswith("fc.")]
    for name, p in learning + list(method.translator.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in student.fc.parameters())
    assert all(p.grad is None for p in method.paraphraser.parameters())  # frozen after its stage
    assert all(p.grad is None for p in teacher.parameters())


def test_init_stage_trains_the_paraphraser_alone():
    student, teacher, method = _nets(3)
    stage = method.init_stage()
    assert (stage.epochs, stage.lr, stage.student_train_mode) == (30, 0.01, False)
    assert stage.modules == [method.paraphraser]
    x = torch.randn(4, 3, 8, 8)
    s_out = student(x)
    with torch.no_grad():
        t_out = teacher(x)
    terms = stage.loss(s_out, t_out, batch(x))
    assert set(terms) == {"ft_rec"}
    rec = method.paraphraser(t_out.feats[-1]).detach().numpy()
    want = float(((rec - t_out.feats[-1].numpy()) ** 2).mean())
    assert terms["ft_rec"].item() == pytest.approx(want, rel=1e-5)
    terms["ft_rec"].backward()
    for name, p in method.paraphraser.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in method.translator.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert FT(FTParams(init_epochs=0), setup_from_nets(student, teacher)).init_stage() is None


def test_state_round_trip():
    student, teacher, method = _nets(4)
    x = torch.randn(3, 3, 8, 8)
    method.train()
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.1 * torch.randn_like(p))
        method(student(x), teacher(x), batch(x), {})  # moves the translator's BN statistics
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(7)
    other = FT(FTParams(), setup_from_nets(student, teacher))
    other.load_state_dict(torch.load(buf, weights_only=True))
    method.eval(), other.eval(), student.eval()
    s_out, t_out = student(x), teacher(x)
    a, b = method(s_out, t_out, batch(x), {})["ft"], other(s_out, t_out, batch(x), {})["ft"]
    assert a.item() == b.item() and math.isfinite(a.item())


def test_errors_name_the_problem():
    flat = ModelOutput(torch.zeros(2, 5), [torch.rand(2, 3, 4, 4), torch.rand(2, 6)], [], None)
    good = ModelOutput(torch.zeros(2, 5), [torch.rand(2, 3, 4, 4)], [], None)
    with pytest.raises(UserError, match=r"ft: teacher feats\[-1\] has shape \(2, 6\)"):
        FT(FTParams(), make_setup(good, flat))
    with pytest.raises(UserError, match="ft: rate 0.1 gives 0 factor channels"):
        FT(FTParams(rate=0.1), make_setup(good, good))
    with pytest.raises(ValueError):
        FTParams(p2=0)


def test_a_run_trains_the_stage_first(tiny_recipe, tmp_path):
    out = tmp_path / "ft_runs"
    recipe = stage_recipe(tiny_recipe, "ft", '{ name = "ft", init_epochs = 2 }', out)
    assert run_recipe(recipe) == 0
    rec = student_record(out)
    stage = rec["init_stages"]["ft"]["epochs"]
    assert [e["epoch"] for e in stage] == [1, 2]
    assert stage[1]["loss_ft_rec"] < stage[0]["loss_ft_rec"]  # the paraphraser learns to reconstruct
    assert {k for k in rec["epochs"][0] if k.startswith("loss_")} == {"loss_ce", "loss_ft"}


@pytest.mark.slow
def test_a_run_stopped_inside_its_stage_resumes_bit_identical(tiny_recipe, tmp_path, monkeypatch, capsys):
    """SIGTERM at the student's step 3, inside FT's 2-epoch stage (checkpoints every 2 steps; the
    teacher copied in, finished); the rerun resumes the stage and ends as the unbroken run."""
    ref_out, out = tmp_path / "reference", tmp_path / "stopped"
    method = '{ name = "ft", init_epochs = 2 }'
    assert run_recipe(stage_recipe(tiny_recipe, "reference", method, ref_out, checkpoint_every_steps=2)) == 0
    expected = student_record(ref_out)
    stopped = stage_recipe(tiny_recipe, "stopped", method, out, checkpoint_every_steps=2)
    out.mkdir()
    shutil.copytree(ref_out / "teachers", out / "teachers")
    monkeypatch.setenv("KDBENCH_TEST_KILL_AT_STEP", "3:TERM")
    assert run_recipe(stopped) == 128 + signal.SIGTERM
    assert list((out / "students").glob("*/init-ft/ckpt-*.pt"))
    monkeypatch.delenv("KDBENCH_TEST_KILL_AT_STEP")
    assert run_recipe(stopped) == 0
    got = student_record(out)
    assert got["id"] == expected["id"]
    for key in ("init_stages", "epochs", "final", "weights_sha256"):
        assert got[key] == expected[key], key
    assert "initialisation stage of ft" in capsys.readouterr().err


def test_registers_under_name_ft():
    from kdbench_plugins.students import ft

    seen = {}
    ft.kdbench_register_student_methods(lambda name, factory, **kw: seen.update({name: factory}))
    assert seen == {"ft": FT}
