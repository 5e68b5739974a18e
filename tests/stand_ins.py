"""Stand-in nets, fake outputs, set-ups and batches shared by the student-method tests.

Imported as ``from stand_ins import ...``: pytest's default (prepend) import mode puts tests/ on
sys.path. Every helper draws its random numbers exactly as the per-file copies it replaced did.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.api import Batch, KDModel, ModelOutput
from kdbench.engine.tasks import method_setup


# ------------------------------------------------------------------------------ nets
class TinyNet(KDModel):
    """stem conv+BN+ReLU, then one conv3x3+BN+ReLU per stage; BN before ReLU exposed;
    pooled = mean of the last map."""

    def __init__(self, stem: int, chans, strides, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem))
        convs, bns, c_in = [], [], stem
        for c, s in zip(chans, strides):
            convs.append(nn.Conv2d(c_in, c, 3, s, 1, bias=False))
            bns.append(nn.BatchNorm2d(c))
            c_in = c
        self.convs, self.bns = nn.ModuleList(convs), nn.ModuleList(bns)
        self.fc = nn.Linear(c_in, num_classes)
        self.chans = list(chans)

    def stage_channels(self):
        return list(self.chans)

    def bn_before_relu(self):
        return list(self.bns)

    def forward(self, x):
        pre = self.stem(x)
        out = F.relu(pre)
        feats, preacts = [out], [pre]
        for conv, bn in zip(self.convs, self.bns):
            pre = bn(conv(out))
            out = F.relu(pre)
            feats.append(out)
            preacts.append(pre)
        pooled = out.mean((2, 3))
        return ModelOutput(self.fc(pooled), feats, preacts, pooled)


def randomize_bn(model, gen):
    """Every BatchNorm2d's affine drawn from N(0, 1) with ``gen``."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))


def make_pair(seed=0, s_chans=(3, 4), t_chans=(5, 6), s_strides=(1, 2), t_strides=(1, 2),
              randomize_teacher_bn=False):
    """A student and a teacher TinyNet (stem 4) built after ``torch.manual_seed(seed)``; with
    ``randomize_teacher_bn`` the teacher's BN affine is then drawn (randomize_bn) from a
    generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = TinyNet(4, list(s_chans), list(s_strides))
    teacher = TinyNet(4, list(t_chans), list(t_strides))
    if randomize_teacher_bn:
        randomize_bn(teacher, gen)
    return student, teacher


# ------------------------------------------------------------------------------ outputs
def fake_out(shapes, gen, num_classes=5):
    """Uniform random feature maps of ``shapes`` (also the pre-activations), zero logits."""
    feats = [torch.rand(*s, generator=gen) for s in shapes]
    pooled = feats[-1].mean((2, 3))
    return ModelOutput(torch.zeros(shapes[0][0], num_classes), feats, feats, pooled)


def pooled_out(pooled, num_classes=5):
    """An output with only ``pooled`` (no feature maps) and zero logits."""
    return ModelOutput(torch.zeros(pooled.shape[0], num_classes), [], [], pooled)


# ------------------------------------------------------------------------------ set-ups
def make_setup(student_out, teacher_out, student=None, teacher=None, n=10, labels=None,
               num_classes=5, image_size=8):
    """A CPU MethodSetup over ``n`` training samples, labelled ``arange(n) % num_classes``
    unless ``labels`` are given."""
    labels = torch.arange(n) % num_classes if labels is None else labels
    return method_setup(student, teacher, student_out, teacher_out, labels, num_classes, image_size,
                        torch.device("cpu"))


def setup_from_nets(student, teacher, size=8):
    """make_setup from an eval-mode forward of both nets on a random batch of 2."""
    x = torch.randn(2, 3, size, size)
    student.eval(), teacher.eval()
    with torch.no_grad():
        s_out, t_out = student(x), teacher(x)
    return make_setup(s_out, t_out, student, teacher, image_size=size)


# ------------------------------------------------------------------------------ batches and steps
def batch_of(index, y=None):
    """A batch of blank 8x8 images: ``index`` is a count n (samples 0..n-1) or the indices."""
    index = torch.arange(index) if isinstance(index, int) else torch.as_tensor(index)
    y = torch.zeros_like(index) if y is None else y
    return Batch(x=torch.zeros(len(index), 3, 8, 8), y=y, index=index)


def batch(x, epoch=0, epochs=1, index=None):
    """A batch of the images ``x``, labels 0, samples ``index`` (default 0..len(x)-1), at
    ``epoch`` of ``epochs``."""
    index = torch.arange(len(x)) if index is None else torch.as_tensor(index)
    return Batch(x=x, y=torch.zeros(len(x), dtype=torch.long), index=index, epoch=epoch, epochs=epochs)


def run(method, student, teacher, x, epoch=0, epochs=1, index=None):
    """One training-mode step on ``x``: the terms and both nets' outputs (teacher's no-grad)."""
    method.train()
    student.train()
    teacher.train() if method.teacher_train_mode else teacher.eval()
    s_out = student(x)
    with torch.no_grad():
        t_out = teacher(x)
    return method(s_out, t_out, batch(x, epoch, epochs, index), {}), s_out, t_out


def assert_gradients_route(student, teacher, method=None, untouched=("fc.",)):
    """After a backward: every student parameter whose name starts with one of ``untouched``
    has no gradient; every other one, and every parameter of ``method``, has a finite non-zero
    gradient; the teacher's parameters (still requiring grad) have none."""
    learning = [(n, p) for n, p in student.named_parameters() if not n.startswith(untouched)]
    for name, p in student.named_parameters():
        if name.startswith(untouched):
            assert p.grad is None, name
    for name, p in learning + list(method.named_parameters() if method is not None else []):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for name, p in teacher.named_parameters():
        assert p.requires_grad and p.grad is None, name


# ------------------------------------------------------------------------------ numpy reference
def adaptive_avg_pool_np(x, out_h, out_w):
    n, c, h, w = x.shape
    y = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        h0, h1 = (i * h) // out_h, -(-((i + 1) * h) // out_h)
        for j in range(out_w):
            w0, w1 = (j * w) // out_w, -(-((j + 1) * w) // out_w)
            y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return y


class OneConvNet(KDModel):
    """conv + BN + ReLU + pool + linear: the smallest net with every ModelOutput field."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        pre = self.bn(self.conv(x))
        h = F.relu(pre)
        pooled = h.mean((2, 3))
        return ModelOutput(self.fc(pooled), [h], [pre], pooled)
