"""Batched, device-side strong augmentation: RandAugment(num_ops=2, magnitude=10) + Cutout.

This is the "strong" view of MLLD (Jin, Wang & Lin 2023) and of FixMatch-style methods. The
engine calls :func:`strong_augment` on uint8 (N, C, H, W) batches after the crop+flip and before
normalisation.

RandAugment
    Same op set, magnitude table and sampling as ``torchvision.transforms.RandAugment`` with its
    defaults (``num_magnitude_bins=31``, nearest interpolation, fill 0): each sample draws, for
    each of ``num_ops`` rounds, one of the 14 ops uniformly — Identity, ShearX, ShearY,
    TranslateX, TranslateY, Rotate, Brightness, Color, Contrast, Sharpness, Posterize, Solarize,
    AutoContrast, Equalize — and, for the signed ops, a sign with p = 0.5. At magnitude 10 of
    31 bins: shear 0.1 (applied as atan, as torchvision does), translate
    int(150/331 · size / 3) pixels (4 at 32 px, 9 at 64 px), rotate 10°, the enhance factors
    1 ± 0.3, posterize to 7 bits, solarize at 170.

    Batching: draws are tensors (no per-sample Python). The batch is grouped by (op, sign) with
    one argsort and one ``bincount(...).tolist()`` (one host sync per round), and each group is
    transformed by one call of ``torchvision.transforms.v2.functional`` with the same scalar
    arguments that torchvision's per-sample op uses. Because the magnitude is fixed and only the
    sign varies per sample, no per-sample geometry (affine_grid) is needed: the geometric ops keep
    torchvision's nearest interpolation and fill 0 exactly.

    Differences from torchvision's per-sample ``RandAugment`` (tests/test_strong_augment.py checks
    each op, and a whole replayed pipeline, against both):
      * against ``torchvision.transforms.v2.RandAugment``'s per-image ops: bit-identical for every
        op, except that Solarize uses the v1 threshold 170.0 where v2 computes 255 · 0.6666667
        (170.00001 in float32, so a pixel of exactly 170 is inverted here and not in v2);
      * against ``torchvision.transforms.RandAugment`` (v1): bit-identical for every op except
        Color, Sharpness and AutoContrast, which can differ by one grey level (the v2 kernels
        round when converting back to uint8, the v1 kernels truncate);
      * the random numbers come from the given generator on the images' device (the draws are
        ops, then signs, then Cutout centres), not from torch's global CPU generator, so the same
        seed does not give the same choices as torchvision;
      * the magnitude is fixed (``magnitude=10``), as in ``RandAugment(2, 10)``; no random
        magnitude per op (which FixMatch-style implementations, ``RandAugmentMC``, use).

Cutout (DeVries & Taylor 2017)
    One square hole of side ``round(cutout · H)`` × ``round(cutout · W)`` (16 × 16 at 32 px with
    the default ``cutout=0.5``, 32 × 32 at 64 px), centre uniform over all pixels, the box
    ``[c - side//2, c + side//2)`` clipped at the borders (so a hole near an edge is smaller), as
    in the DeVries code. Filled with ``cutout_fill`` (0).

    Note on the fill value: DeVries' ``Cutout`` multiplies the *normalised* tensor by the mask, so
    its hole is 0 in normalised units, i.e. the dataset mean colour; here the hole is cut before
    normalisation, so fill 0 is black (pass ``cutout_fill`` = the mean colour in 0..255 to mimic
    DeVries exactly). The MLLD repository's own CIFAR loader could not be inspected; forks of the
    same mdistiller lineage use a FixMatch-style ``RandAugment(2, 10)`` (random magnitudes) with a
    ``CutoutAbs`` of random size up to half the image filled with grey (125, 123, 114). This module
    follows the torchvision op set and magnitudes by design.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED: frozenset[str] = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
     "Sharpness"}
)
_NEAREST = InterpolationMode.NEAREST


def op_magnitude(name: str, magnitude: int, height: int, width: int, num_bins: int = 31) -> float:
    """The unsigned magnitude torchvision's RandAugment uses for op ``name`` at bin ``magnitude``
    (computed with the same float32 tensors, so the value is bit-identical)."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude must be in 0..{num_bins - 1}, got {magnitude}")
    table = {
        "ShearX": lambda: torch.linspace(0.0, 0.3, num_bins),
        "ShearY": lambda: torch.linspace(0.0, 0.3, num_bins),
        "TranslateX": lambda: torch.linspace(0.0, 150.0 / 331.0 * width, num_bins),
        "TranslateY": lambda: torch.linspace(0.0, 150.0 / 331.0 * height, num_bins),
        "Rotate": lambda: torch.linspace(0.0, 30.0, num_bins),
        "Brightness": lambda: torch.linspace(0.0, 0.9, num_bins),
        "Color": lambda: torch.linspace(0.0, 0.9, num_bins),
        "Contrast": lambda: torch.linspace(0.0, 0.9, num_bins),
        "Sharpness": lambda: torch.linspace(0.0, 0.9, num_bins),
        "Posterize": lambda: 8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int(),
        "Solarize": lambda: torch.linspace(255.0, 0.0, num_bins),
    }
    if name not in table:  # Identity, AutoContrast, Equalize take no magnitude
        return 0.0
    return float(table[name]()[magnitude].item())


def apply_op(images: Tensor, name: str, magnitude: float) -> Tensor:
    """Apply one RandAugment op with the signed scalar ``magnitude`` to every image of a uint8
    batch (N, C, H, W), with the same arguments as torchvision's ``autoaugment._apply_op``."""
    if name == "Identity":
        return images
    if name == "ShearX":
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[math.degrees(math.atan(magnitude)), 0.0],
                         interpolation=_NEAREST, fill=None, center=[0, 0])
    if name == "ShearY":
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[0.0, math.degrees(math.atan(magnitude))],
                         interpolation=_NEAREST, fill=None, center=[0, 0])
    if name == "TranslateX":
        return TF.affine(images, angle=0.0, translate=[int(magnitude), 0], scale=1.0,
                         shear=[0.0, 0.0], interpolation=_NEAREST, fill=None)
    if name == "TranslateY":
        return TF.affine(images, angle=0.0, translate=[0, int(magnitude)], scale=1.0,
                         shear=[0.0, 0.0], interpolation=_NEAREST, fill=None)
    if name == "Rotate":
        return TF.rotate(images, magnitude, interpolation=_NEAREST, fill=None)
    if name == "Brightness":
        return TF.adjust_brightness(images, 1.0 + magnitude)
    if name == "Color":
        return TF.adjust_saturation(images, 1.0 + magnitude)
    if name == "Contrast":
        return TF.adjust_contrast(images, 1.0 + magnitude)
    if name == "Sharpness":
        return TF.adjust_sharpness(images, 1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(images, int(magnitude))
    if name == "Solarize":
        return TF.solarize(images, magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(images)
    if name == "Equalize":
        return TF.equalize(images)
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply_ops(images: Tensor, op_index: Tensor, negative: Tensor, magnitude: int = 10,
              num_bins: int = 31) -> Tensor:
    """One RandAugment round: sample ``i`` gets op ``OPS[op_index[i]]`` with its magnitude negated
    where ``negative[i]`` (ignored for unsigned ops). Each (op, sign) group is one batched call."""
    n, _, h, w = images.shape
    if n == 0:
        return images
    signed = torch.tensor([op in SIGNED for op in OPS], device=images.device)
    negative = negative.bool() & signed[op_index]
    key = op_index.long() * 2 + negative.long()
    order = torch.argsort(key)
    counts = torch.bincount(key, minlength=2 * len(OPS)).tolist()  # the round's one host sync
    out = images.clone()
    for k, idx in zip(range(2 * len(OPS)), torch.split(order, counts)):
        name = OPS[k // 2]
        if idx.numel() == 0 or name == "Identity":
            continue
        mag = op_magnitude(name, magnitude, h, w, num_bins)
        if k % 2:
            mag = -mag
        out.index_copy_(0, idx, apply_op(images.index_select(0, idx), name, mag))
    return out


def rand_augment(images: Tensor, generator: torch.Generator, num_ops: int = 2,
                 magnitude: int = 10, num_bins: int = 31, return_params: bool = False):
    """RandAugment on a uint8 batch; with ``return_params`` also returns the draws
    ``(op_index, negative)``, each (num_ops, N), so a test can replay them one image at a time."""
    _check(images, generator)
    n = images.shape[0]
    dev = images.device
    op_index = torch.randint(len(OPS), (num_ops, n), device=dev, generator=generator)
    negative = torch.randint(2, (num_ops, n), device=dev, generator=generator).bool()
    out = images
    for r in range(num_ops):
        out = apply_ops(out, op_index[r], negative[r], magnitude, num_bins)
    return (out, (op_index, negative)) if return_params else out


def cutout_box(height: int, width: int, centre_y: Tensor, centre_x: Tensor, fraction: float = 0.5):
    """Per-sample hole bounds ``(y1, y2, x1, x2)``, half-open, clipped at the borders."""
    side_h = int(round(fraction * height))
    side_w = int(round(fraction * width))
    y1 = (centre_y - side_h // 2).clamp(0, height)
    y2 = (centre_y + side_h // 2).clamp(0, height)
    x1 = (centre_x - side_w // 2).clamp(0, width)
    x2 = (centre_x + side_w // 2).clamp(0, width)
    return y1, y2, x1, x2


def random_cutout(images: Tensor, generator: torch.Generator, fraction: float = 0.5, fill: int = 0,
           return_params: bool = False):
    """DeVries Cutout, one hole per image (see the module docstring); uint8 in, uint8 out."""
    _check(images, generator)
    n, _, h, w = images.shape
    dev = images.device
    cy = torch.randint(h, (n,), device=dev, generator=generator)
    cx = torch.randint(w, (n,), device=dev, generator=generator)
    y1, y2, x1, x2 = cutout_box(h, w, cy, cx, fraction)
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    in_rows = (rows >= y1[:, None]) & (rows < y2[:, None])  # (N, H)
    in_cols = (cols >= x1[:, None]) & (cols < x2[:, None])  # (N, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    out = images.masked_fill(hole, fill)
    return (out, (cy, cx)) if return_params else out


def strong_augment(images: Tensor, generator: torch.Generator, num_ops: int = 2,
                   magnitude: int = 10, cutout: float = 0.5, cutout_fill: int = 0) -> Tensor:
    """RandAugment(``num_ops``, ``magnitude``) then Cutout (side ``cutout`` × image size) on a
    uint8 batch (N, C, H, W), on whatever device the images are; the generator must live on that
    device. Returns a new uint8 tensor of the same shape."""
    out = rand_augment(images, generator, num_ops=num_ops, magnitude=magnitude)
    if cutout > 0:
        out = random_cutout(out, generator, fraction=cutout, fill=cutout_fill)
    return out


def _check(images: Tensor, generator: torch.Generator) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("strong augmentation expects a uint8 tensor of shape (N, C, H, W)")
    if generator is not None and torch.device(generator.device).type != images.device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but the images on {images.device}: "
            "draws must come from a generator on the images' device"
        )
