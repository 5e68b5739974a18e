"""``synthetic``: a built-in image dataset with learnable class *and* intra-class structure.

Used for smoke tests and quick method comparisons without downloading anything. Every class
has a smooth random prototype (random colours on a coarse grid, upsampled bilinearly) and a
few sub-modes (the prototype plus a mode-specific smooth pattern), so classes are multi-modal
the way real ones are, which is what intra-class-diversity objectives act on. A sample is one
sub-mode of its class, randomly shifted, plus a class-independent smooth "clutter" pattern,
a random per-channel gain and pixel noise, quantised to uint8.

Deterministic given the parameters: class prototypes come from ``seed`` alone; train and test
samples come from separate streams derived from ``(seed, split)``, so both splits follow the
same distribution with different samples.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from kdbench.api import ImageData, Params, hookimpl

_SPLIT_STREAM = {"train": 1, "test": 2}
_CHUNK = 4096  # samples generated at once: bounds memory for large configurations


class SyntheticParams(Params):
    num_classes: int = Field(10, ge=2)
    train_per_class: int = Field(64, ge=1)
    test_per_class: int = Field(32, ge=1)
    image_size: int = Field(32, ge=8, le=512)
    channels: int = Field(3, ge=1, le=16)
    modes_per_class: int = Field(
        3, ge=1, description="sub-prototypes per class (intra-class structure)"
    )
    noise: float = Field(0.25, ge=0.0, description="std of per-pixel Gaussian noise (0..1 units)")
    seed: int = Field(0, ge=0, description="fixes class prototypes and both splits")


_TRAIN_STATS: dict[SyntheticParams, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def _generator(*key: int) -> torch.Generator:
    # SeedSequence mixes the key well: (seed, split) streams are unrelated to each other.
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def _smooth(n: int, channels: int, grid: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n random low-frequency patterns (n, C, size, size) with values ~N(0, 1) on the grid."""
    coarse = torch.randn(n, channels, grid, grid, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


class _Design:
    """The class structure shared by both splits: per-mode canvases larger than the image by
    ``shift`` pixels on each side, so a random crop is a random translation."""

    def __init__(self, p: SyntheticParams):
        self.p = p
        self.grid = max(2, p.image_size // 8)  # coarse grid: 4x4 for 32x32 images
        self.shift = max(1, p.image_size // 4)  # up to +-8 px on 32x32
        self.canvas = p.image_size + 2 * self.shift
        gen = _generator(p.seed, 0)
        k, m, c = p.num_classes, p.modes_per_class, p.channels
        protos = _smooth(k, c, self.grid, self.canvas, gen)  # (K, C, S, S)
        # Sub-modes: the class prototype plus a mode-specific pattern slightly stronger than
        # it, so modes of one class are related (correlation ~0.4) but clearly distinct.
        # The constants (with shift, clutter and noise below) were tuned so that a
        # nearest-class-mean classifier gets ~65-80% and a small CNN ~50% after 10 epochs at
        # the defaults: learnable, but far from solved.
        modes = _smooth(k * m, c, self.grid, self.canvas, gen).view(k, m, c, self.canvas, -1)
        self.modes = 0.5 + 0.12 * (protos[:, None] + 1.2 * modes)  # (K, M, C, S, S), in [0,1]-ish

    def sample(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        p, n, size = self.p, labels.numel(), self.p.image_size
        mode = torch.randint(p.modes_per_class, (n,), generator=gen)
        dy, dx = torch.randint(2 * self.shift + 1, (2, n), generator=gen)
        # Each sample is a shifted crop of its mode's canvas. A loop of slices is several times
        # faster than one big advanced-indexing gather here.
        x = torch.empty(n, p.channels, size, size)
        for i, (y, m, r, c) in enumerate(zip(labels.tolist(), mode.tolist(), dy.tolist(),
                                             dx.tolist())):
            x[i] = self.modes[y, m, :, r:r + size, c:c + size]
        clutter = 0.15 * _smooth(n, p.channels, self.grid, size, gen)
        gain = 1.0 + 0.10 * torch.randn(n, p.channels, 1, 1, generator=gen)
        noise = p.noise * torch.randn(n, p.channels, size, size, generator=gen)
        x = (x + clutter - 0.5) * gain + 0.5 + noise
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _split(design: _Design, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = design.p
    per_class = p.train_per_class if split == "train" else p.test_per_class
    gen = _generator(p.seed, _SPLIT_STREAM[split])
    labels = torch.arange(p.num_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(labels.numel(), generator=gen)]  # shuffled, balanced
    images = torch.empty(labels.numel(), p.channels, p.image_size, p.image_size,
                         dtype=torch.uint8)
    for start in range(0, labels.numel(), _CHUNK):
        stop = start + _CHUNK
        images[start:stop] = design.sample(labels[start:stop], gen)
    return images, labels


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in 0..1 units, accumulated in chunks (no full float copy)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(_CHUNK):
        x = chunk.double() / 255
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean**2).clamp_min(1e-6).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def synthetic(params: SyntheticParams, split: str) -> ImageData:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    design = _Design(params)
    images, labels = _split(design, split)
    # Normalisation statistics of the *train* split, shared by both splits as with real
    # datasets. Remembered per parameter set, so loading train then test generates train once.
    if params not in _TRAIN_STATS:
        train = images if split == "train" else _split(design, "train")[0]
        _TRAIN_STATS[params] = _channel_stats(train)
    mean, std = _TRAIN_STATS[params]
    return ImageData(images=images, labels=labels, num_classes=params.num_classes,
                     mean=mean, std=std)


@hookimpl
def kdbench_register_datasets(register):
    register("synthetic", synthetic, params=SyntheticParams,
             help="built-in random images with multi-modal classes (no files; for smoke tests)")
