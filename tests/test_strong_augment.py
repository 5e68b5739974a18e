"""Batched RandAugment(2, 10) + Cutout (kdbench.data.strong_augment) against torchvision's
per-image ops and a plain-Python DeVries Cutout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import autoaugment as tv_autoaugment

from kdbench.data.strong_augment import (OPS, SIGNED, apply_op, apply_ops, op_magnitude,
                                         rand_augment, random_cutout, strong_augment)

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
# v1 kernels truncate when converting back to uint8 where the v2 kernels round: <= 1 grey level
OFF_BY_ONE = {"Color", "Sharpness", "AutoContrast"}


def images(n=8, size=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[0] = x[0] // 3 + 60  # a low-contrast image, so AutoContrast/Equalize have work to do
    x[1] = 200  # a flat image
    return x.to(device)


def gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_shape_device_and_determinism(device):
    x = images(16, device=device)
    a = strong_augment(x, gen(1, device))
    b = strong_augment(x, gen(1, device))
    c = strong_augment(x, gen(2, device))
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.device == x.device
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x, images(16, device=device))  # input untouched


@pytest.mark.parametrize("device", DEVICES)
def test_images_actually_change(device):
    x = images(32, device=device)
    y = strong_augment(x, gen(0, device))
    changed = (y != x).flatten(1).float().mean(1)
    assert changed.mean() > 0.3  # Cutout alone changes ~25% of a random image
    assert (changed > 0).all()  # every image has at least its Cutout hole


def test_magnitude_table_at_10():
    mags = {name: op_magnitude(name, 10, 32, 32) for name in OPS}
    assert mags["ShearX"] == pytest.approx(0.1) and mags["ShearY"] == pytest.approx(0.1)
    assert int(mags["TranslateX"]) == 4 and int(op_magnitude("TranslateY", 10, 64, 64)) == 9
    assert mags["Rotate"] == pytest.approx(10.0)
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        assert mags[name] == pytest.approx(0.3)
    assert mags["Posterize"] == 7 and mags["Solarize"] == 170.0
    assert mags["Identity"] == mags["AutoContrast"] == mags["Equalize"] == 0.0
    # the same numbers torchvision's RandAugment draws from
    ra = tv_autoaugment.RandAugment(num_ops=2, magnitude=10)
    space = ra._augmentation_space(31, (32, 32))
    assert list(space) == list(OPS)
    for name, (table, signed) in space.items():
        assert signed == (name in SIGNED)
        if table.ndim > 0:
            assert op_magnitude(name, 10, 32, 32) == float(table[10].item()), name


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", OPS)
def test_each_op_against_torchvision(name, size):
    """Batched op on 6 images vs torchvision's per-image ``_apply_op`` (what
    ``transforms.RandAugment`` calls), for both signs of the magnitude-10 value."""
    x = images(6, size)
    for sign in (1.0, -1.0) if name in SIGNED else (1.0,):
        mag = sign * op_magnitude(name, 10, size, size)
        got = apply_op(x, name, mag)
        ref = torch.stack([tv_autoaugment._apply_op(im, name, mag, InterpolationMode.NEAREST, None)
                           for im in x])
        assert got.dtype == torch.uint8 and got.shape == x.shape
        diff = (got.int() - ref.int()).abs()
        if name in OFF_BY_ONE:
            assert diff.max() <= 1, (name, sign)
            assert (diff > 0).float().mean() < 0.05, (name, sign)
        elif name in GEOMETRIC:  # nearest sampling: allow a rare pixel at a rounding boundary
            assert (diff > 0).float().mean() <= 0.005, (name, sign)
        else:
            assert torch.equal(got, ref), (name, sign)
        if name != "Identity":
            assert not torch.equal(got, x), (name, sign)


def test_batched_round_equals_per_image_replay():
    """One round with mixed ops and signs == each image transformed alone with its draw."""
    x = images(64)
    op_index = torch.arange(64) % len(OPS)
    negative = (torch.arange(64) // len(OPS)) % 2 == 1
    got = apply_ops(x, op_index, negative)
    for i in range(64):
        name = OPS[int(op_index[i])]
        mag = op_magnitude(name, 10, 32, 32)
        if name in SIGNED and bool(negative[i]):
            mag = -mag
        assert torch.equal(got[i:i + 1], apply_op(x[i:i + 1], name, mag)), (i, name)


def test_full_pipeline_replays_with_torchvision():
    """rand_augment's draws replayed image by image through torchvision's own _apply_op:
    identical wherever neither op is one of the off-by-one colour ops."""
    x = images(48)
    y, (op_index, negative) = rand_augment(x, gen(3), return_params=True)
    assert op_index.shape == negative.shape == (2, 48)
    checked = 0
    for i in range(48):
        names = [OPS[int(op_index[r, i])] for r in range(2)]
        if set(names) & OFF_BY_ONE:
            continue
        im = x[i]
        for r, name in enumerate(names):
            mag = op_magnitude(name, 10, 32, 32)
            if name in SIGNED and bool(negative[r, i]):
                mag = -mag
            im = tv_autoaugment._apply_op(im, name, mag, InterpolationMode.NEAREST, None)
        assert torch.equal(y[i], im), (i, names)
        checked += 1
    assert checked > 20


def test_per_sample_op_choice_varies():
    x = images(64)
    _, (op_index, negative) = rand_augment(x, gen(0), return_params=True)
    assert len(op_index[0].unique()) >= 10 and len(op_index[1].unique()) >= 10
    assert not torch.equal(op_index[0], op_index[1])
    assert 0 < negative.float().mean() < 1
    # and so images that start equal end up different
    same = images(3)[2:3].expand(64, -1, -1, -1).contiguous()
    out = rand_augment(same, gen(0))
    assert len({bytes(o.numpy().tobytes()) for o in out}) > 20


def devries_cutout(img: np.ndarray, y: int, x: int, length: int) -> np.ndarray:
    """DeVries & Taylor's Cutout for one (C, H, W) image, written from their code."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return (img * mask[None]).astype(img.dtype)


@pytest.mark.parametrize("size,side", [(32, 16), (64, 32)])
def test_cutout_zeroes_the_devries_square(size, side):
    x = torch.full((40, 3, size, size), 255, dtype=torch.uint8)
    y, (cy, cx) = random_cutout(x, gen(7), fraction=0.5, return_params=True)
    full = 0
    for i in range(40):
        ref = devries_cutout(x[i].numpy(), int(cy[i]), int(cx[i]), side)
        assert np.array_equal(y[i].numpy(), ref), i
        zero = (y[i] == 0).all(0)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert zero.sum() == len(rows) * len(cols)  # one axis-aligned box, all channels
        assert len(rows) <= side and len(cols) <= side
        if side // 2 <= cy[i] <= size - side // 2 and side // 2 <= cx[i] <= size - side // 2:
            assert len(rows) == len(cols) == side  # a full square when not clipped
            full += 1
    assert full > 5
    # strong_augment with no RandAugment ops is exactly this Cutout
    assert torch.equal(strong_augment(x, gen(7), num_ops=0), y)


def test_cutout_centres_cover_the_image_and_clip():
    x = torch.full((400, 1, 32, 32), 255, dtype=torch.uint8)
    y, (cy, cx) = random_cutout(x, gen(0), return_params=True)
    assert cy.min() == 0 and cy.max() == 31 and cx.min() == 0 and cx.max() == 31
    holes = (y == 0).flatten(1).sum(1)
    assert holes.max() == 256 and holes.min() < 256  # clipped near the borders
    assert torch.equal(strong_augment(x, gen(0), num_ops=0, cutout=0.0), x)


def test_generator_on_another_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ValueError, match="device"):
        strong_augment(images(2), gen(0, "cuda"))


def test_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        strong_augment(images(2).float(), gen(0))
