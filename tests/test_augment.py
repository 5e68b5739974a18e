"""The batched crop+flip is bit-identical to torchvision's RandomCrop(32, padding=4) +
RandomHorizontalFlip for the same offsets and flips, and the loader's epochs are seeded."""
import torch
import torchvision.transforms.v2.functional as TF

from kdbench.api import ImageData
from kdbench.data.augment import Normalizer, crop_flip, random_crop_flip
from kdbench.data.loader import DeviceData, subset_per_class


def _torchvision_crop_flip(img, top, left, flip, size=32, padding=4):
    # What RandomCrop(size, padding=padding) does once it has drawn (top, left): zero-pad, crop.
    padded = TF.pad(img, [padding, padding, padding, padding], fill=0)
    out = TF.crop(padded, top, left, size, size)
    return TF.horizontal_flip(out) if flip else out


def test_crop_flip_bit_identical_to_torchvision_for_every_offset():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (162, 3, 32, 32), dtype=torch.uint8, generator=g)
    # All 9 x 9 x 2 = 162 distinct (top, left, flip) views, one per image.
    combos = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)]
    offsets = torch.tensor([[t, l] for t, l, _ in combos])
    flips = torch.tensor([f for *_, f in combos])
    ours = crop_flip(images, offsets, flips)
    for i, (t, l, f) in enumerate(combos):
        assert torch.equal(ours[i], _torchvision_crop_flip(images[i], t, l, f)), (t, l, f)


def test_crop_flip_non_square_and_64px():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    offsets = torch.tensor([[0, 8], [8, 0], [3, 5], [4, 4]])
    flips = torch.tensor([True, False, True, False])
    ours = crop_flip(images, offsets, flips)
    for i in range(4):
        ref = _torchvision_crop_flip(images[i], *offsets[i].tolist(), bool(flips[i]), size=64)
        assert torch.equal(ours[i], ref)


def test_random_crop_flip_draws_offsets_in_range_and_flips_half():
    images = torch.zeros((4000, 1, 8, 8), dtype=torch.uint8)
    images[:, :, 0, 0] = 255  # a marker pixel: where it lands reveals the offset and flip
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=4)
    pos = (out[:, 0] == 255).flatten(1).float().argmax(1)
    visible = (out[:, 0] == 255).flatten(1).any(1)
    rows, cols = pos // 8, pos % 8
    # Marker visible only when the top offset <= 4 (5 of 9 values), in both axes: 25/81.
    assert abs(visible.float().mean().item() - 25 / 81) < 0.03
    assert rows[visible].max() == 4 and cols[visible].max() == 7


def test_normalizer_matches_formula():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    norm = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), torch.device("cpu"))
    ref = (x.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), ref, rtol=1e-6, atol=1e-6)


def _data(n=50, classes=5):
    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                     torch.arange(n) % classes, classes, (0.5,) * 3, (0.25,) * 3)


def test_epochs_are_permutations_and_reproducible(registry):
    dd = DeviceData(_data(), torch.device("cpu"), registry.view_makers())
    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return [b for b in dd.train_batches(16, g, views=("second",))]
    a, b, c = epoch(3), epoch(3), epoch(4)
    idx = torch.cat([x.index for x in a])
    assert sorted(idx.tolist()) == list(range(50))  # 16+16+16+2: every sample once
    assert all(torch.equal(x.x, y.x) and torch.equal(x.views["second"], y.views["second"])
               for x, y in zip(a, b))
    assert not torch.equal(torch.cat([x.index for x in c]), idx)
    assert not torch.equal(a[0].x, a[0].views["second"])  # the second view is a new draw
    assert dd.num_batches(16) == len(a) == 4


def test_single_sample_last_batch_is_dropped():
    dd = DeviceData(_data(n=33), torch.device("cpu"))
    batches = list(dd.train_batches(16, torch.Generator().manual_seed(0)))
    assert [b.y.shape[0] for b in batches] == [16, 16] and dd.num_batches(16) == 2


def test_subset_per_class_is_balanced_and_seeded():
    data = _data(n=100, classes=5)
    sub = subset_per_class(data, 7)
    assert torch.bincount(sub.labels).tolist() == [7] * 5
    assert torch.equal(sub.images, subset_per_class(data, 7).images)
