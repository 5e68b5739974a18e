"""Batched, device-side augmentation of uint8 image batches.

The standard CIFAR augmentation — ``RandomCrop(size, padding=4)`` (zero fill) followed by
``RandomHorizontalFlip(0.5)`` — is one gather per batch: the crop offsets and the flip are folded
into a single column index, so no per-sample Python runs and the result is bit-identical to
torchvision's transforms for the same offsets and flips (tests/test_augment.py proves it).
"""
from __future__ import annotations

import torch
from torch import Tensor


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int = 4) -> Tensor:
    """Crop (after zero padding) at per-sample ``offsets`` (N, 2) = (top, left) and mirror the
    samples where ``flips`` (N,) is true. ``images`` is uint8 (N, C, H, W); so is the result."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # (N, H)
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:2]  # (N, W)
    picked_rows = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return picked_rows.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def draw_crop_flip(n: int, device, generator: torch.Generator, padding: int = 4) -> tuple[Tensor, Tensor]:
    """Offsets (n, 2) uniform in 0..2·padding and flips (n,) with p = 0.5, in that order."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), device=device, generator=generator)
    flips = torch.rand(n, device=device, generator=generator) < 0.5
    return offsets, flips


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Draw offsets and flips (:func:`draw_crop_flip`), then :func:`crop_flip`."""
    return crop_flip(images, *draw_crop_flip(images.shape[0], images.device, generator, padding), padding)


# Each crop+flip view is one of (2·padding + 1)² · 2 combinations (162 for padding 4); its code
# numbers them, so a frozen teacher's outputs can be cached per (view code, image).
def crop_flip_code(offsets: Tensor, flips: Tensor, padding: int = 4) -> Tensor:
    return (offsets[:, 0] * (2 * padding + 1) + offsets[:, 1]) * 2 + flips.long()


def crop_flip_decode(code: Tensor, padding: int = 4) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`crop_flip_code`: (offsets, flips)."""
    side = 2 * padding + 1
    cell, flips = code.div(2, rounding_mode="floor"), code.remainder(2).bool()
    return torch.stack([cell.div(side, rounding_mode="floor"), cell.remainder(side)], 1), flips


def num_crop_flip_codes(padding: int = 4) -> int:
    return (2 * padding + 1) ** 2 * 2


class Normalizer:
    """uint8 -> float, (x/255 - mean)/std, as one fused multiply-add per element."""

    def __init__(self, mean, std, device, dtype=torch.float32):
        mean_t = torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.dtype = dtype

    def __call__(self, images_u8: Tensor) -> Tensor:
        return torch.addcmul(self.shift, images_u8.to(self.dtype), self.scale)
